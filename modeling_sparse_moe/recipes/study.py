"""The MoE-vs-dense study: variants of one shape (dense, MoE, fine-grained) trained on the same token blocks in the
same order, with the same optimizer, schedule and seed, in lock-step; validation curves, expert shares, steps and
seconds to reach the dense model's final loss, and seeds run apart merged into one table.

    python scripts/compare_dense.py --steps 600 --seeds 0,1,2 --output_dir out/compare_dense
    python scripts/compare_dense.py --smoke --output_dir out/compare_dense_smoke
    python scripts/compare_dense.py --dataset_name bible-multilingual --languages en,fr,de,es,it,pt --arms main \
        --steps 600 --seeds 0 --threads 1 --output_dir out/study_main_s0

The low-noise protocol (`--share_init`, on by default): every arm of a seed starts from one seeded initialisation of
the parts they share (embeddings, attention, norms, output head: every parameter outside `.mlp.` whose name and shape
match), reads the same blocks in the same order, and is scored on the mean of its last `--final_evals` evaluations over
the whole held-out split; the table reports mean +/- std over seeds and the paired difference to the baseline.

From Python: `study.run_dense_comparison(study.StudyArguments(...))`. Results and how to read them: docs/study.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, set_seed
from transformers.loss.loss_utils import ForCausalLMLoss

from ..configuration_sparse_moe import SparseMoEConfig
from .data import MULTILINGUAL_DATASET, load_bible_corpus, load_multilingual_bible, parse_languages, train_tokenizer
from .pretraining import BALANCED_ROUTER, SPLIT_SEED, _split_top_level, apply_config_overrides, parse_config_overrides

logger = logging.getLogger(__name__)


# Shapes of the study (4 layers x 256, vocab 4096): the dense FFN is as wide as the K experts a token uses together,
# so every variant has the same active parameters per token (the router adds E x 256 per layer).
STUDY_BASE = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 256,
    **BALANCED_ROUTER,
}
STUDY_VARIANTS = {
    "dense": "num_experts=0,intermediate_size=1024",
    "moe-8x512-top2": "num_experts=8,num_experts_per_tok=2,moe_intermediate_size=512",
    "fine-32x128-top8": "num_experts=32,num_experts_per_tok=8,moe_intermediate_size=128",
}
SMOKE_BASE = {**STUDY_BASE, "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8}
SMOKE_VARIANTS = {
    "dense": "num_experts=0,intermediate_size=64",
    "moe-8x32-top2": "num_experts=8,num_experts_per_tok=2,moe_intermediate_size=32",
}

# The multilingual study (4 layers x 128, vocab 8192, six languages). Every MoE arm has the active FFN width of
# `dense-active` (512 per token: top-2 of 256-wide experts, or the shapes noted); `dense-total` has the MoE-8's total.
MULTILINGUAL_BASE = {
    "vocab_size": 8192,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 256,
    **BALANCED_ROUTER,
}
_MOE = "num_experts_per_tok=2,moe_intermediate_size=256"
STUDY_ARMS = {
    "main": {
        "dense-active": "num_experts=0,intermediate_size=512",
        "moe-8x256-top2": f"num_experts=8,{_MOE}",
        "dense-total": "num_experts=0,intermediate_size=2048",
    },
    "experts": {  # expert count at fixed active width; one expert is top-1 of 512 (a dense FFN behind a router)
        "dense-active": "num_experts=0,intermediate_size=512",
        "moe-1x512-top1": "num_experts=1,num_experts_per_tok=1,moe_intermediate_size=512",
        "moe-2x256-top2": f"num_experts=2,{_MOE}",
        "moe-4x256-top2": f"num_experts=4,{_MOE}",
        "moe-8x256-top2": f"num_experts=8,{_MOE}",
        "moe-16x256-top2": f"num_experts=16,{_MOE}",
    },
    "fine": {  # fine-grained: 32 experts of 64, 8 active; with a shared expert of 128 and 6 routed
        "dense-active": "num_experts=0,intermediate_size=512",
        "fine-32x64-top8": "num_experts=32,num_experts_per_tok=8,moe_intermediate_size=64",
        "fine-32x64-top6-shared128": "num_experts=32,num_experts_per_tok=6,moe_intermediate_size=64,"
                                     "num_shared_experts=1,shared_expert_intermediate_size=128",
    },
    # NOTE: the config has one pooled Switch aux loss (mean over layers); there is no per-layer aux loss option.
    "balance": {
        "dense-active": "num_experts=0,intermediate_size=512",
        "moe-aux": f"num_experts=8,{_MOE},router_aux_loss_coef=0.01,router_bias_update_rate=0",
        "moe-bias": f"num_experts=8,{_MOE},router_aux_loss_coef=0,router_bias_update_rate=0.005",
        "moe-aux+bias": f"num_experts=8,{_MOE},router_aux_loss_coef=0.01,router_bias_update_rate=0.005",
    },
}
SMOKE_ARMS = {
    "main": {
        "dense-active": "num_experts=0,intermediate_size=64",
        "moe-8x32-top2": "num_experts=8,num_experts_per_tok=2,moe_intermediate_size=32",
        "dense-total": "num_experts=0,intermediate_size=256",
    },
    "experts": {
        "dense-active": "num_experts=0,intermediate_size=64",
        "moe-2x32-top2": "num_experts=2,num_experts_per_tok=2,moe_intermediate_size=32",
        "moe-4x32-top2": "num_experts=4,num_experts_per_tok=2,moe_intermediate_size=32",
    },
}


@dataclass
class StudyArguments:
    """The MoE-vs-dense study: every variant trains on the same token blocks in the same order, with the same AdamW,
    cosine schedule and seed, in lock-step (one step of each model in turn, the order rotating every step) so that
    the shared machine's load falls on all of them alike."""

    output_dir: str = field(default="out/compare_dense", metadata={"help": "Where the table, JSON and PNG go."})
    steps: int = field(default=600, metadata={"help": "Optimizer steps per model."})
    batch_size: int = field(default=16, metadata={"help": "Blocks per step."})
    block_size: int = field(default=128, metadata={"help": "Tokens per block."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (all variants)."})
    router_lr_scale: float = field(
        default=1.0,
        metadata={"help": "Router weights' learning rate / learning_rate (a variant may set its own with "
                  "'router_lr_scale=...' among its overrides)."},
    )
    warmup_steps: int = field(default=30, metadata={"help": "Linear warmup before the cosine decay."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (Trainer's default is 0.999)."})
    preset: str | None = field(
        default=None,
        metadata={"help": "'quickstart': the quickstart's pretraining optimisation (400 steps, lr 2e-3, warmup 20, "
                  "no weight decay, beta2 0.999, as Trainer runs it; evaluation every 50 steps) instead of the "
                  "study's defaults; flags given explicitly win. The router-balance ablation uses it."},
    )
    eval_every: int = field(default=50, metadata={"help": "Validation loss every N steps (and at the last one)."})
    eval_blocks: int = field(default=128, metadata={"help": "Validation blocks (fixed, held-out chapters)."})
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds; each runs every variant."})
    variants: str | None = field(
        default=None,
        metadata={"help": "'name:k=v,k=v;name:k=v' variant overrides of the base shape; default: dense, 8x512 "
                  "top-2, 32x128 top-8 (the first is the baseline)."},
    )
    base_overrides: str | None = field(default=None, metadata={"help": "k=v overrides applied to every variant."})
    max_corpus_chars: int | None = field(default=None, metadata={"help": "Use only the first N characters."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "'bible-multilingual': complete Bibles in --languages (whole chapters held out in every "
                  "language; base shape MULTILINGUAL_BASE); default: the World English Bible (STUDY_BASE)."},
    )
    languages: str | None = field(
        default=None, metadata={"help": "With bible-multilingual: comma-separated codes (default en,fr,de,es,it,pt)."}
    )
    max_chapters: int | None = field(
        default=None, metadata={"help": "With bible-multilingual: the first N chapters of each language (quick runs)."}
    )
    arms: str | None = field(
        default=None,
        metadata={"help": f"A named set of variants instead of --variants: {', '.join(STUDY_ARMS)} (the first arm of "
                  "each set is the baseline)."},
    )
    share_init: bool = field(
        default=True,
        metadata={"help": "Start every arm of a seed from one seeded initialisation of the shared parts (every "
                  "parameter outside .mlp. whose name and shape match the first arm's)."},
    )
    final_evals: int = field(
        default=3,
        metadata={"help": "The final figure is the mean of the last N evaluations, each over all held-out blocks "
                  "(--final_eval_blocks); earlier evaluations use --eval_blocks."},
    )
    final_eval_blocks: int | None = field(
        default=None, metadata={"help": "Blocks of the final evaluations (default: every held-out block)."}
    )
    lr_sweep: str | None = field(
        default=None,
        metadata={"help": "Comma-separated peak learning rates: every variant runs at each (named 'arm@lr=...'); "
                  "run it short to pick each arm's rate."},
    )
    validation_split_percentage: int = field(default=5, metadata={"help": "Percent of chapters held out."})
    smoke: bool = field(default=False, metadata={"help": "Tiny shapes, 20 steps, 200k characters (tests)."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: leave as is)."})
    save_models: bool = field(
        default=False,
        metadata={"help": "Save every arm's final model with the study's tokenizer to "
                  "<output_dir>/models/seed<S>/<arm> (for fine-tuning them downstream)."},
    )
    merge: str | None = field(
        default=None,
        metadata={"help": "Comma-separated study folders (seeds run as separate processes): join their results.json "
                  "into one table in --output_dir; trains nothing."},
    )


# Keys a variant may carry besides config fields: how its router is optimised and initialised, not what it is.
RUN_KEYS = ("router_lr_scale", "router_init_std", "learning_rate")
# The quickstart's pretraining optimisation (quickstart.SIZES["small"] through Trainer's defaults).
QUICKSTART_PRESET = {"steps": 400, "learning_rate": 2e-3, "warmup_steps": 20, "weight_decay": 0.0,
                     "adam_beta2": 0.999, "eval_every": 50}


def _parse_variants(spec: str) -> dict[str, str]:
    variants = {}
    for item in spec.split(";"):
        if item.strip():
            name, _, overrides = item.partition(":")
            variants[name.strip()] = overrides.strip()
    return variants


def _split_run_options(overrides: str) -> tuple[str, dict[str, float]]:
    """A variant's overrides without the `RUN_KEYS`, and those keys' values."""
    kept, options = [], {}
    for item in _split_top_level(overrides or ""):
        key = item.partition("=")[0].strip()
        if key in RUN_KEYS:
            raw = item.partition("=")[2].strip()
            try:
                options[key] = float(raw)
            except ValueError:
                raise ValueError(f"--variants: {key}={raw!r} is not a number") from None
            if options[key] < 0:
                raise ValueError(f"--variants: {key}={raw} must be >= 0")
        elif item.strip():
            kept.append(item)
    return ",".join(kept), options


def _study_data(args: StudyArguments, vocab_size: int):
    if args.dataset_name == MULTILINGUAL_DATASET:
        return _multilingual_data(args, vocab_size)
    if args.dataset_name is not None or args.languages is not None:
        raise ValueError(f"--dataset_name {args.dataset_name!r} / --languages: the study reads "
                         f"'{MULTILINGUAL_DATASET}' (with --languages) or, without them, the World English Bible")
    texts = load_bible_corpus(max_chars=args.max_corpus_chars)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    held_out = max(1, round(len(texts) * args.validation_split_percentage / 100))
    val_texts = [texts[i] for i in sorted(order[:held_out])]
    train_texts = [texts[i] for i in sorted(order[held_out:])]
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)

    def blocks(chunk):
        ids: list[int] = []
        for text in chunk:
            ids.extend(tokenizer(text)["input_ids"])
            ids.append(tokenizer.eos_token_id)
        usable = len(ids) // args.block_size * args.block_size
        return torch.tensor(ids[:usable], dtype=torch.long).view(-1, args.block_size), len(ids)

    train_BL, train_tokens = blocks(train_texts)
    val_BL, val_tokens = blocks(val_texts)
    val_BL = val_BL[: args.final_eval_blocks] if args.final_eval_blocks else val_BL
    return tokenizer, train_BL, val_BL, {
        "name": "World English Bible", "languages": ["en"],
        "train_chapters": len(train_texts), "validation_chapters": len(val_texts),
        "train_tokens": train_tokens, "validation_tokens": val_tokens,
        "train_chars": sum(map(len, train_texts)), "eval_tokens_used": int(val_BL.numel()),
        "curve_eval_tokens": int(_curve_blocks(val_BL, args.eval_blocks).numel()),
        "val_languages": ["en"] * len(val_BL),
    }


def _pack(tokenizer, texts: list[str], block_size: int) -> tuple[torch.Tensor, int]:
    """Texts tokenised, each followed by EOS, concatenated and cut into (B, L) blocks; and the token count."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    usable = len(ids) // block_size * block_size
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, block_size), len(ids)


def _multilingual_data(args: StudyArguments, vocab_size: int):
    """Complete Bibles in `args.languages`: the tokenizer trained on the training chapters of every language; the
    training blocks packed over all languages (one language after the other, shuffled by the study's block order);
    the held-out blocks packed per language, so each validation block is one language (`val_languages`)."""
    codes = parse_languages(args.languages)
    splits = load_multilingual_bible(codes, validation_fraction=args.validation_split_percentage / 100,
                                     max_chapters=args.max_chapters)
    train_texts = [row["text"] for row in splits["train"]]
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)
    train_BL, train_tokens = _pack(tokenizer, train_texts, args.block_size)
    val_parts, val_languages, val_tokens = [], [], 0
    for code in codes:
        part, count = _pack(tokenizer, [r["text"] for r in splits["validation"] if r["language"] == code],
                            args.block_size)
        val_parts.append(part)
        val_languages += [code] * len(part)
        val_tokens += count
    val_BL = torch.cat(val_parts)
    if args.final_eval_blocks:  # an even stride keeps every language in the subset
        keep = _stride(len(val_BL), args.final_eval_blocks)
        val_BL, val_languages = val_BL[keep], [val_languages[i] for i in keep]
    return tokenizer, train_BL, val_BL, {
        "name": f"{len(codes)} complete Bibles ({', '.join(codes)})", "languages": list(codes),
        "train_chapters": len(train_texts), "validation_chapters": len(splits["validation"]),
        "train_tokens": train_tokens, "validation_tokens": val_tokens,
        "train_chars": sum(map(len, train_texts)), "eval_tokens_used": int(val_BL.numel()),
        "curve_eval_tokens": int(_curve_blocks(val_BL, args.eval_blocks).numel()), "val_languages": val_languages,
    }


def _stride(total: int, keep: int) -> list[int]:
    """`keep` indices spread evenly over range(total) (all of them when keep >= total)."""
    if keep >= total:
        return list(range(total))
    return [i * total // keep for i in range(keep)]


def _curve_blocks(val_BL: torch.Tensor, eval_blocks: int) -> torch.Tensor:
    """The held-out blocks of the intermediate evaluations: `eval_blocks` spread evenly over all of them."""
    return val_BL[_stride(len(val_BL), eval_blocks)]


def study_batch_order(num_blocks: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """The block indices every arm of `seed` reads, step after step: seeded permutations of the training blocks,
    one per pass, concatenated; shape (steps * batch_size,)."""
    generator = torch.Generator().manual_seed(seed)
    passes = math.ceil(steps * batch_size / num_blocks)
    return torch.cat([torch.randperm(num_blocks, generator=generator) for _ in range(passes)])[: steps * batch_size]


def shared_parameter_names(model: torch.nn.Module) -> list[str]:
    """The parameters every arm shares: everything outside the FFN blocks (`.mlp.`), that is embeddings, attention,
    norms and the output head."""
    return [name for name, _ in model.named_parameters() if ".mlp." not in name]


@torch.no_grad()
def copy_shared_parameters(source: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    """Copy `source`'s shared parameters (`shared_parameter_names`) into `target` where name and shape match;
    returns the names copied."""
    source_params = dict(source.named_parameters())
    copied = []
    for name, param in target.named_parameters():
        if ".mlp." in name or name not in source_params or source_params[name].shape != param.shape:
            continue
        param.copy_(source_params[name])
        copied.append(name)
    return copied


@torch.no_grad()
def language_expert_counts(model: torch.nn.Module, val_BL: torch.Tensor, val_languages: list[str],
                           languages: list[str], max_blocks_per_language: int = 64) -> list[list[list[int]]]:
    """Top-k assignments of every MoE layer's router, by expert and language, over (at most `max_blocks_per_language`
    of) each language's held-out blocks: counts[layer][expert][language]. Eval mode, so no capacity dropping."""
    from ..modeling_sparse_moe import SparseMoERouter

    routers = [module for module in model.modules() if isinstance(module, SparseMoERouter)]
    if not routers:
        return []
    counts = [[[0] * len(languages) for _ in range(router.num_experts)] for router in routers]
    current = {"language": 0}
    handles = []
    for layer, router in enumerate(routers):
        def hook(module, args, output, layer=layer):
            index_TK = output[2]
            per_expert = torch.bincount(index_TK.reshape(-1), minlength=module.num_experts).tolist()
            for expert, count in enumerate(per_expert):
                counts[layer][expert][current["language"]] += int(count)

        handles.append(router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for column, code in enumerate(languages):
            rows = [i for i, lang in enumerate(val_languages) if lang == code][:max_blocks_per_language]
            current["language"] = column
            for chunk in val_BL[rows].split(32):
                model(input_ids=chunk)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counts


def language_shares(counts: list[list[list[int]]]) -> list[list[list[float]]]:
    """Each expert's assignments split over languages, after dividing by each language's total assignments in the
    layer (so a language with more tokens does not look favoured): shares[layer][expert][language], each row sums to
    1 (1 / languages everywhere = no specialisation)."""
    shares = []
    for layer in counts:
        totals = [sum(expert[j] for expert in layer) or 1 for j in range(len(layer[0]))]
        rows = []
        for expert in layer:
            rates = [count / total for count, total in zip(expert, totals)]
            norm = sum(rates)
            rows.append([rate / norm if norm else 0.0 for rate in rates])
        shares.append(rows)
    return shares


class _StudyRun:
    def __init__(self, name: str, config, args: StudyArguments, seed: int, options: dict | None = None,
                 shared_from: torch.nn.Module | None = None):
        from .training import RouterTelemetry

        options = options or {}
        set_seed(seed)
        self.name = name
        self.config = config
        self.model = AutoModelForCausalLM.from_config(config)
        self.shared = copy_shared_parameters(shared_from, self.model) if shared_from is not None else []
        learning_rate = options.get("learning_rate", args.learning_rate)
        if "router_init_std" in options:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param_name, param in self.model.named_parameters():
                    if param_name.endswith("mlp.gate.weight"):
                        param.copy_(torch.randn(param.shape, generator=generator) * options["router_init_std"])
        router_lr_scale = options.get("router_lr_scale", args.router_lr_scale)
        self.model.train()
        router, decay, no_decay = [], [], []
        for param_name, param in self.model.named_parameters():
            if param_name.endswith("mlp.gate.weight"):
                router.append(param)
            elif param.dim() >= 2:
                decay.append(param)
            else:
                no_decay.append(param)
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if router:
            groups.append({"params": router, "weight_decay": 0.0, "lr": learning_rate * router_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, args.adam_beta2))
        self.scheduler = transformers.get_cosine_schedule_with_warmup(self.optimizer, args.warmup_steps, args.steps)
        self.telemetry = RouterTelemetry(self.model) if router else None
        self.seconds = 0.0
        self.seconds_at: list[float] = [0.0]  # cumulative training seconds after each step
        self.train_loss: list[tuple[int, float]] = []
        self.eval_loss: list[tuple[int, float]] = []
        self.imbalance: list[tuple[int, float]] = []
        # per evaluation: assignments per expert of every MoE layer over the steps since the previous evaluation
        self.loads: list[tuple[int, list[list[int]]]] = []
        self.final_losses: list[tuple[int, float]] = []  # evaluations over every held-out block
        self._loss_sum = 0.0
        # a running digest of every batch read, so a test (and the results) can show that arms read the same data
        self.data_digest = hashlib.sha1()

    def step(self, input_ids) -> None:
        from ..modeling_sparse_moe import update_router_biases

        self.data_digest.update(input_ids.numpy().tobytes())
        begin = time.perf_counter()
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.router_bias_update_rate > 0:
            update_router_biases(self.model)
        self.seconds += time.perf_counter() - begin
        self.seconds_at.append(self.seconds)
        self._loss_sum += float(loss.detach())

    @torch.no_grad()
    def evaluate(self, step: int, val_BL, every: int, curve: list[int] | None = None, final: bool = False) -> float:
        """Validation loss on the curve's blocks (`curve`: indices into `val_BL`; None: all), recorded in `eval_loss`;
        with `final`, every block of `val_BL` is scored and the mean over all of them also goes to `final_losses`."""
        self.model.eval()
        rows = list(range(len(val_BL))) if final or curve is None else curve
        per_block = {}
        for start in range(0, len(rows), 32):
            index = rows[start : start + 32]
            chunk = val_BL[index]
            logits = self.model(input_ids=chunk).logits
            for row, block in zip(index, range(len(index))):
                per_block[row] = float(ForCausalLMLoss(logits[block : block + 1], chunk[block : block + 1],
                                                       logits.shape[-1]))
        self.model.train()
        curve_rows = list(range(len(val_BL))) if curve is None else curve
        loss = sum(per_block[row] for row in curve_rows) / len(curve_rows)
        if final:
            self.final_losses.append((step, sum(per_block.values()) / len(per_block)))
        self.eval_loss.append((step, loss))
        window = step - (self.train_loss[-1][0] if self.train_loss else 0)
        self.train_loss.append((step, self._loss_sum / max(1, window)))
        self._loss_sum = 0.0
        if self.telemetry is not None:
            summary = self.telemetry.summary(per_expert=False)
            loads = self.telemetry.loads()
            self.telemetry.reset()
            if summary:
                self.imbalance.append((step, summary["router/load_imbalance"]))
                self.loads.append((step, [loads[layer] for layer in sorted(loads)]))
        return loss


def expert_shares(counts: list[list[int]]) -> list[list[float]]:
    """Each expert's share of its layer's assignments as a multiple of the uniform share (1.0 = 1/E)."""
    shares = []
    for layer in counts:
        total = sum(layer)
        shares.append([count * len(layer) / total if total else 0.0 for count in layer])
    return shares


def steps_to_reach(eval_loss: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the validation curve reaches `target`, linearly interpolated between evaluations; None
    when it never does."""
    previous = None
    for step, loss in eval_loss:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def _seconds_at(run: _StudyRun, step: float) -> float:
    low = int(math.floor(step))
    high = min(low + 1, len(run.seconds_at) - 1)
    return run.seconds_at[low] + (step - low) * (run.seconds_at[high] - run.seconds_at[low])


def _apply_preset(args: StudyArguments) -> None:
    if args.preset is None:
        return
    if args.preset != "quickstart":
        raise ValueError(f"--preset {args.preset!r}: the only preset is 'quickstart'")
    defaults = StudyArguments()
    for key, value in QUICKSTART_PRESET.items():
        if getattr(args, key) == getattr(defaults, key):  # a flag given explicitly wins over the preset
            setattr(args, key, value)


def run_dense_comparison(args: StudyArguments) -> dict:
    """Train the variants (the first is the dense baseline) and measure, for each other one, the steps and the
    training seconds it needs to reach the baseline's final validation loss. Writes `results.json`, `results.md`
    and `loss_curves.png` to `args.output_dir`; returns the results dict."""
    import modeling_sparse_moe  # noqa: F401  (registers the Auto classes)

    if args.merge:
        return merge_dense_comparisons([f for f in args.merge.split(",") if f.strip()], args.output_dir)
    if args.smoke:
        args.steps, args.eval_every, args.batch_size, args.block_size = min(args.steps, 20), 5, 4, 64
        args.max_corpus_chars = args.max_corpus_chars or 200_000
        args.max_chapters = args.max_chapters or 8
        args.eval_blocks, args.warmup_steps = min(args.eval_blocks, 16), 2
    _apply_preset(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs, variants, options = _study_configs(args)
    base = configs[next(iter(configs))]
    baseline = next(iter(configs))
    tokenizer, train_BL, val_BL, corpus = _study_data(args, base.vocab_size)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("Study: %s; %d train blocks, %d eval blocks, seeds %s", list(configs), len(train_BL), len(val_BL), seeds)

    curve = _stride(len(val_BL), args.eval_blocks)
    eval_steps = [step for step in range(1, args.steps + 1) if step % args.eval_every == 0 or step == args.steps]
    if args.final_evals < 1:
        raise ValueError(f"--final_evals {args.final_evals} must be >= 1")
    final_steps = set(eval_steps[-args.final_evals :])
    per_seed = []
    for seed in seeds:
        reference = None
        if args.share_init:
            set_seed(seed)
            reference = AutoModelForCausalLM.from_config(base)
        runs = {name: _StudyRun(name, config, args, seed, options[name], shared_from=reference)
                for name, config in configs.items()}
        del reference
        order = study_batch_order(len(train_BL), args.steps, args.batch_size, seed)
        names = list(runs)
        wall = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = train_BL[order[(step - 1) * args.batch_size : step * args.batch_size]]
            shift = step % len(names)  # rotate who goes first, so no model always runs on a warm cache
            for name in names[shift:] + names[:shift]:
                runs[name].step(batch)
            if step in eval_steps:
                losses = {name: run.evaluate(step, val_BL, args.eval_every, curve, final=step in final_steps)
                          for name, run in runs.items()}
                logger.info("seed %d step %d (%.0f s): %s", seed, step, time.perf_counter() - wall,
                            ", ".join(f"{n} {v:.4f}" for n, v in losses.items()))
                # curves so far, so that a run stopped early still leaves its evidence
                (out / f"progress_seed{seed}.json").write_text(json.dumps({
                    "seed": seed, "step": step, "wall_seconds": time.perf_counter() - wall,
                    "models": {n: {"eval_loss": r.eval_loss, "final_evals": r.final_losses, "train_seconds": r.seconds}
                               for n, r in runs.items()}}, indent=1))
        result = _seed_result(seed, runs, baseline, args)
        if args.save_models:
            for name, run in runs.items():
                folder = out / "models" / f"seed{seed}" / name
                run.model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                result["models"][name]["model_dir"] = str(folder)
        if len(corpus["languages"]) > 1:
            for name, run in runs.items():
                counts = language_expert_counts(run.model, val_BL, corpus["val_languages"], corpus["languages"])
                if counts:
                    result["models"][name]["language_counts"] = counts
        per_seed.append(result)
        _write_study(out, args, configs, variants, corpus, per_seed, baseline)
    return _write_study(out, args, configs, variants, corpus, per_seed, baseline)


def _study_configs(args: StudyArguments) -> tuple[dict, dict, dict]:
    """The study's configs, variant specs and per-variant run options (`RUN_KEYS`), by variant name."""
    if args.smoke:
        base = dict(SMOKE_BASE)
    else:
        base = dict(MULTILINGUAL_BASE if args.dataset_name == MULTILINGUAL_DATASET else STUDY_BASE)
    if args.base_overrides:
        base.update(parse_config_overrides(args.base_overrides))
    if args.arms and args.variants:
        raise ValueError("--arms and --variants both name the variants: give one")
    if args.arms:
        registry = SMOKE_ARMS if args.smoke else STUDY_ARMS
        if args.arms not in registry:
            raise ValueError(f"--arms {args.arms!r}: choose from {', '.join(registry)}")
        variants = dict(registry[args.arms])
    else:
        variants = _parse_variants(args.variants) if args.variants else (SMOKE_VARIANTS if args.smoke else STUDY_VARIANTS)
    if args.lr_sweep:
        try:
            rates = [float(r) for r in args.lr_sweep.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--lr_sweep {args.lr_sweep!r}: give comma-separated numbers such as 1e-3,2e-3") from None
        if not rates or any(r <= 0 for r in rates):
            raise ValueError(f"--lr_sweep {args.lr_sweep!r}: every rate must be > 0")
        variants = {f"{name}@lr={rate:g}": (f"{spec},learning_rate={rate:g}" if spec else f"learning_rate={rate:g}")
                    for name, spec in variants.items() for rate in rates}
    configs, options = {}, {}
    for name, spec in variants.items():
        overrides, options[name] = _split_run_options(spec)
        configs[name] = apply_config_overrides(SparseMoEConfig(**base), overrides) if overrides else SparseMoEConfig(**base)
    return configs, variants, options


def merge_dense_comparisons(folders: list[str], output_dir: str) -> dict:
    """One table over studies that ran the same variants, flags and corpus for different seeds (each seed in its own
    process and folder): their `results.json` files joined, written as `results.json` / `results.md` /
    `loss_curves.png` to `output_dir`. Folders that differ in anything but the seeds are refused."""
    if len(folders) < 2:
        raise ValueError("--merge needs at least two study folders")
    studies = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--merge: {path} not found (has that study finished a seed?)")
        studies.append(json.loads(path.read_text()))
    first = studies[0]
    ignored = {"output_dir", "seeds", "threads", "merge", "save_models"}
    for folder, study in zip(folders[1:], studies[1:]):
        differ = sorted(k for k in set(first["args"]) | set(study["args"])
                        if k not in ignored and first["args"].get(k) != study["args"].get(k))
        if differ or study["baseline"] != first["baseline"] or list(study["shapes"]) != list(first["shapes"]):
            raise ValueError(f"--merge: {folder} is not the same study as {folders[0]} "
                             f"(differs in {', '.join(differ) or 'variants'})")
    per_seed = sorted((r for study in studies for r in study["seeds"]), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in per_seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--merge: seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} appear twice")
    known = {f.name for f in dataclasses.fields(StudyArguments)}
    args = StudyArguments(**{k: v for k, v in first["args"].items() if k in known})
    args.output_dir, args.seeds, args.merge = output_dir, ",".join(map(str, seeds)), ",".join(folders)
    configs, variants, _ = _study_configs(args)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write_study(out, args, configs, variants, first["corpus"], per_seed, first["baseline"])


def _seed_result(seed: int, runs: dict, baseline: str, args: StudyArguments) -> dict:
    # NOTE: steps / time to target compare curves on the same (curve) blocks: the target is the baseline's last curve
    # loss, not the full-split mean that the table reports as the final figure.
    target = runs[baseline].eval_loss[-1][1]
    dense_seconds = runs[baseline].seconds
    models = {}
    for name, run in runs.items():
        reached = steps_to_reach(run.eval_loss, target)
        seconds = _seconds_at(run, reached) if reached is not None else None
        shares = expert_shares(run.loads[-1][1]) if run.loads else None
        finals = [loss for _, loss in run.final_losses] or [run.eval_loss[-1][1]]
        models[name] = {
            # the mean of the last `final_evals` evaluations over every held-out block
            "final_eval_loss": sum(finals) / len(finals),
            "final_evals": run.final_losses,
            "data_digest": run.data_digest.hexdigest(),
            "shared_parameters": len(run.shared),
            "eval_loss": run.eval_loss,
            "train_loss": run.train_loss,
            "load_imbalance": run.imbalance,
            "expert_loads": run.loads,
            # over the last evaluation window (the last `eval_every` steps), as multiples of the uniform share
            "final_expert_shares": shares,
            "final_min_share": min(min(layer) for layer in shares) if shares else None,
            "final_max_share": max(max(layer) for layer in shares) if shares else None,
            "train_seconds": run.seconds,
            "seconds_per_step": run.seconds / args.steps,
            "steps_to_target": reached,
            "seconds_to_target": seconds,
            "step_ratio": reached / args.steps if reached is not None else None,
            "time_ratio": seconds / dense_seconds if seconds is not None else None,
        }
    return {"seed": seed, "target": target, "models": models}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _write_study(out: Path, args: StudyArguments, configs: dict, variants: dict, corpus: dict, per_seed: list,
                 baseline: str) -> dict:
    from dataclasses import asdict

    shapes = {
        name: {
            "overrides": variants[name],
            "params": config.num_parameters(),
            "active_params": config.num_active_parameters(),
        }
        for name, config in configs.items()
    }
    result = {"args": asdict(args), "corpus": corpus, "shapes": shapes, "baseline": baseline, "seeds": per_seed}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    final_evals = getattr(args, "final_evals", 1)
    lines = [
        f"Corpus: {corpus.get('name', 'World English Bible')}, {corpus['train_tokens']:,} train tokens "
        f"({corpus['train_chapters']} chapters), {corpus['eval_tokens_used']:,} validation tokens in the final "
        f"evaluations ({corpus['validation_chapters']} held-out chapters); "
        f"{args.steps} steps x {args.batch_size} x {args.block_size} tokens, seeds {[r['seed'] for r in per_seed]}. "
        f"Final val loss: mean of the last {final_evals} evaluations; paired difference: the arm's final minus "
        f"{baseline}'s in the same seed (negative: better than {baseline}).",
        "",
        f"| model | params | active params | final val loss | paired diff vs {baseline} | steps to {baseline} final "
        f"(x {baseline}) | time to {baseline} final (x {baseline}) | s/step | final imbalance (max/mean) | min expert "
        f"share, last {args.eval_every} steps (x uniform) | max expert share (x uniform) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in configs:
        rows = [r["models"][name] for r in per_seed]
        finals = [m["final_eval_loss"] for m in rows]
        paired = [r["models"][name]["final_eval_loss"] - r["models"][baseline]["final_eval_loss"] for r in per_seed]
        step_ratios = [m["step_ratio"] for m in rows if m["step_ratio"] is not None]
        time_ratios = [m["time_ratio"] for m in rows if m["time_ratio"] is not None]
        missed = sum(m["step_ratio"] is None for m in rows)
        note = f" ({missed} of {len(rows)} never reached)" if missed else ""
        imbalance = [m["load_imbalance"][-1][1] for m in rows if m["load_imbalance"]]
        min_share = [m["final_min_share"] for m in rows if m.get("final_min_share") is not None]
        max_share = [m["final_max_share"] for m in rows if m.get("final_max_share") is not None]
        lines.append(
            f"| {name} | {shapes[name]['params'] / 1e6:.2f}M | {shapes[name]['active_params'] / 1e6:.2f}M | "
            f"{_mean_std(finals)} | {_mean_std(paired) if name != baseline else '–'} | "
            f"{_mean_std(step_ratios)}{note} | {_mean_std(time_ratios)}{note} | "
            f"{_mean_std([m['seconds_per_step'] for m in rows])} | {_mean_std(imbalance)} | {_mean_std(min_share)} | "
            f"{_mean_std(max_share)} |"
        )
    lines += ["", f"Per seed (steps to target / time to target as fractions of the {baseline} run):", ""]
    for r in per_seed:
        cells = ", ".join(
            f"{n}: final {m['final_eval_loss']:.4f}, steps {_fmt(m['step_ratio'])}, time {_fmt(m['time_ratio'])}"
            + (f", min share {m['final_min_share']:.2f}" if m.get("final_min_share") is not None else "")
            for n, m in r["models"].items() if n != baseline
        )
        lines.append(f"- seed {r['seed']}: {baseline} final {r['models'][baseline]['final_eval_loss']:.4f} "
                     f"(curve target {r['target']:.4f}); {cells}")
    languages = corpus.get("languages") or []
    specialised = {}
    for name in configs:
        # NOTE: per seed, then averaged: expert k of one seed has nothing to do with expert k of another
        values = [language_specialisation(language_shares(r["models"][name]["language_counts"]))
                  for r in per_seed if r["models"][name].get("language_counts")]
        if values:
            specialised[name] = _mean_std(values)
    if specialised:
        lines += ["", f"Language specialisation (mean over layers and experts of an expert's largest language share, "
                  f"after normalising by each language's tokens, per seed; {1 / len(languages):.3f} = none, 1.0 = one "
                  f"language per expert): " + ", ".join(f"{n} {v}" for n, v in specialised.items())]
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    result["table"] = table
    result["plots"] = _study_plots(out, configs, corpus, per_seed, baseline)
    return result


def language_specialisation(shares: list) -> float:
    """Mean over layers and experts of an expert's largest language share (`language_shares`)."""
    tops = [max(expert) for layer in shares for expert in layer]
    return sum(tops) / len(tops)


def _study_plots(out: Path, configs: dict, corpus: dict, per_seed: list, baseline: str) -> dict[str, str]:
    """loss_curves.png (validation, mean and min-max over seeds), language_experts.png (the first MoE arm with
    language counts, its last seed) and loss_vs_experts.png (when two or more expert counts ran)."""
    try:
        from . import plotting
    except ImportError as error:
        logger.warning("No plots (%s)", error)
        return {}
    plots = {}
    name = corpus.get("name", "World English Bible")
    curves = {arm: [r["models"][arm]["eval_loss"] for r in per_seed] for arm in configs}
    finals = {arm: [r["models"][arm]["final_eval_loss"] for r in per_seed] for arm in configs}
    plots["loss_curves"] = str(plotting.plot_seed_bands(
        curves, out / "loss_curves.png",
        title=f"Validation loss, {name}\n(mean over seeds {[r['seed'] for r in per_seed]}; band: min-max)"))
    for arm in configs:
        seeds = [r for r in per_seed if r["models"][arm].get("language_counts")]
        if seeds and configs[arm].num_experts > 1:  # one seed's experts (expert k differs between seeds)
            plots["language_experts"] = str(plotting.plot_language_experts(
                language_shares(seeds[-1]["models"][arm]["language_counts"]), corpus["languages"],
                out / "language_experts.png",
                title=f"{arm}, seed {seeds[-1]['seed']}: each language's share of every expert's tokens "
                      f"(held-out chapters, %)"))
            break
    experts = {configs[arm].num_experts: finals[arm] for arm in configs if configs[arm].num_experts >= 1}
    if len(experts) >= 2:
        references = {arm: finals[arm] for arm in configs if configs[arm].num_experts == 0}
        plots["loss_vs_experts"] = str(plotting.plot_loss_vs_experts(experts, out / "loss_vs_experts.png", references))
    return plots


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}"
