"""The MoE-vs-dense study: variants of one shape (dense, MoE, fine-grained) trained on the same token blocks in the
same order, with the same optimizer, schedule and seed, in lock-step; validation curves, expert shares, steps and
seconds to reach the dense model's final loss, and seeds run apart merged into one table.

    python scripts/compare_dense.py --steps 600 --seeds 0,1,2 --output_dir out/compare_dense
    python scripts/compare_dense.py --smoke --output_dir out/compare_dense_smoke

From Python: `study.run_dense_comparison(study.StudyArguments(...))`. Results and how to read them: docs/study.md.
"""

from __future__ import annotations

import dataclasses
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
from .data import load_bible_corpus, train_tokenizer
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
    validation_split_percentage: int = field(default=5, metadata={"help": "Percent of chapters held out."})
    smoke: bool = field(default=False, metadata={"help": "Tiny shapes, 20 steps, 200k characters (tests)."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: leave as is)."})
    merge: str | None = field(
        default=None,
        metadata={"help": "Comma-separated study folders (seeds run as separate processes): join their results.json "
                  "into one table in --output_dir; trains nothing."},
    )


# Keys a variant may carry besides config fields: how its router is optimised and initialised, not what it is.
RUN_KEYS = ("router_lr_scale", "router_init_std")
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
    return tokenizer, train_BL, val_BL[: args.eval_blocks], {
        "train_chapters": len(train_texts), "validation_chapters": len(val_texts),
        "train_tokens": train_tokens, "validation_tokens": val_tokens,
        "train_chars": sum(map(len, train_texts)), "eval_tokens_used": int(val_BL[: args.eval_blocks].numel()),
    }


class _StudyRun:
    def __init__(self, name: str, config, args: StudyArguments, seed: int, options: dict | None = None):
        from .training import RouterTelemetry

        options = options or {}
        set_seed(seed)
        self.name = name
        self.config = config
        self.model = AutoModelForCausalLM.from_config(config)
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
            groups.append({"params": router, "weight_decay": 0.0, "lr": args.learning_rate * router_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2))
        self.scheduler = transformers.get_cosine_schedule_with_warmup(self.optimizer, args.warmup_steps, args.steps)
        self.telemetry = RouterTelemetry(self.model) if router else None
        self.seconds = 0.0
        self.seconds_at: list[float] = [0.0]  # cumulative training seconds after each step
        self.train_loss: list[tuple[int, float]] = []
        self.eval_loss: list[tuple[int, float]] = []
        self.imbalance: list[tuple[int, float]] = []
        # per evaluation: assignments per expert of every MoE layer over the steps since the previous evaluation
        self.loads: list[tuple[int, list[list[int]]]] = []
        self._loss_sum = 0.0

    def step(self, input_ids) -> None:
        from ..modeling_sparse_moe import update_router_biases

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
    def evaluate(self, step: int, val_BL, every: int) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for chunk in val_BL.split(32):
            logits = self.model(input_ids=chunk).logits
            total += float(ForCausalLMLoss(logits, chunk, logits.shape[-1])) * chunk.shape[0]
            count += chunk.shape[0]
        self.model.train()
        loss = total / count
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

    per_seed = []
    for seed in seeds:
        runs = {name: _StudyRun(name, config, args, seed, options[name]) for name, config in configs.items()}
        generator = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(len(train_BL), generator=generator)
                           for _ in range(math.ceil(args.steps * args.batch_size / len(train_BL)))])
        names = list(runs)
        wall = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = train_BL[order[(step - 1) * args.batch_size : step * args.batch_size]]
            shift = step % len(names)  # rotate who goes first, so no model always runs on a warm cache
            for name in names[shift:] + names[:shift]:
                runs[name].step(batch)
            if step % args.eval_every == 0 or step == args.steps:
                losses = {name: run.evaluate(step, val_BL, args.eval_every) for name, run in runs.items()}
                logger.info("seed %d step %d (%.0f s): %s", seed, step, time.perf_counter() - wall,
                            ", ".join(f"{n} {v:.4f}" for n, v in losses.items()))
        per_seed.append(_seed_result(seed, runs, baseline, args))
        _write_study(out, args, configs, variants, corpus, per_seed, baseline)
    return _write_study(out, args, configs, variants, corpus, per_seed, baseline)


def _study_configs(args: StudyArguments) -> tuple[dict, dict, dict]:
    """The study's configs, variant specs and per-variant run options (`RUN_KEYS`), by variant name."""
    base = dict(SMOKE_BASE if args.smoke else STUDY_BASE)
    if args.base_overrides:
        base.update(parse_config_overrides(args.base_overrides))
    variants = _parse_variants(args.variants) if args.variants else (SMOKE_VARIANTS if args.smoke else STUDY_VARIANTS)
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
    ignored = {"output_dir", "seeds", "threads", "merge"}
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
    target = runs[baseline].eval_loss[-1][1]
    dense_seconds = runs[baseline].seconds
    models = {}
    for name, run in runs.items():
        reached = steps_to_reach(run.eval_loss, target)
        seconds = _seconds_at(run, reached) if reached is not None else None
        shares = expert_shares(run.loads[-1][1]) if run.loads else None
        models[name] = {
            "final_eval_loss": run.eval_loss[-1][1],
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
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


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
    lines = [
        f"Corpus: World English Bible, {corpus['train_tokens']:,} train tokens ({corpus['train_chapters']} chapters), "
        f"{corpus['eval_tokens_used']:,} validation tokens used ({corpus['validation_chapters']} held-out chapters); "
        f"{args.steps} steps x {args.batch_size} x {args.block_size} tokens, seeds {[r['seed'] for r in per_seed]}.",
        "",
        f"| model | params | active params | final val loss | steps to {baseline} final (x {baseline}) | time to "
        f"{baseline} final (x {baseline}) | s/step | final imbalance (max/mean) | min expert share, last "
        f"{args.eval_every} steps (x uniform) | max expert share (x uniform) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in configs:
        rows = [r["models"][name] for r in per_seed]
        finals = [m["final_eval_loss"] for m in rows]
        step_ratios = [m["step_ratio"] for m in rows if m["step_ratio"] is not None]
        time_ratios = [m["time_ratio"] for m in rows if m["time_ratio"] is not None]
        missed = sum(m["step_ratio"] is None for m in rows)
        note = f" ({missed} of {len(rows)} never reached)" if missed else ""
        imbalance = [m["load_imbalance"][-1][1] for m in rows if m["load_imbalance"]]
        min_share = [m["final_min_share"] for m in rows if m.get("final_min_share") is not None]
        max_share = [m["final_max_share"] for m in rows if m.get("final_max_share") is not None]
        lines.append(
            f"| {name} | {shapes[name]['params'] / 1e6:.2f}M | {shapes[name]['active_params'] / 1e6:.2f}M | "
            f"{_mean_std(finals)} | {_mean_std(step_ratios)}{note} | {_mean_std(time_ratios)}{note} | "
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
        lines.append(f"- seed {r['seed']}: {baseline} final {r['target']:.4f}; {cells}")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    result["table"] = table
    try:
        from .plotting import plot_loss_curves

        last = per_seed[-1]
        curves = {n: {"train": m["train_loss"], "eval": m["eval_loss"]} for n, m in last["models"].items()}
        result["plot"] = str(plot_loss_curves(
            curves, out / "loss_curves.png", target=last["target"],
            title=f"MoE vs dense on the World English Bible (seed {last['seed']}; dotted: dense final)"))
    except ImportError as error:
        logger.warning("No plot (%s)", error)
    return result


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}"
