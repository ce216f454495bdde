"""Expert pruning / merging and fewer experts per token against the unpruned model, one run: held-out validation
loss (nats) per criterion and expert count, and greedy batch-1 decode tokens/s with top-k lowered and with
gate-threshold skipping.

    python scripts/pretrain.py --config_name demo --output_dir out/base --do_train --max_steps 120 \
        --per_device_train_batch_size 8 --block_size 128 --learning_rate 2e-3 --warmup_steps 12 \
        --lr_scheduler_type cosine --config_overrides num_hidden_layers=2,vocab_size=4096 --report_to none
    python scripts/bench_prune.py out/base --threads 2 --json bench_results/bench_prune.json
    python scripts/bench_prune.py out/base --quick      # smoke: few blocks, one count, short decode

Losses: mean next-token cross-entropy (the LM head alone, no router losses) over the held-out World English Bible
chapters of the pretraining recipe (`compression.calibration.heldout_texts`), `--eval_blocks` blocks of
`--block_size`. Calibration: `--calibration` corpora (default "generic": the Python docs CPython ships, text the
model never trained on), `--calibration_tokens` tokens. "random" is the mean over `--random_seeds` seeds (min-max
shown). Decode: `generate` greedy, batch 1, eager, a held-out prompt, median of `--repeats` interleaved calls, wall
and process CPU time (the CPU time moves less when other processes share the cores). Writes JSON.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from modeling_sparse_moe.compression.calibration import (  # noqa: E402
    calibration_texts,
    heldout_texts,
    token_blocks,
    validation_loss,
)
from modeling_sparse_moe.compression.pruning import (  # noqa: E402
    apply_expert_selection,
    collect_expert_statistics,
    expert_scores,
    merge_experts,
    moe_blocks,
    select_experts,
)
from modeling_sparse_moe.compression.routing import set_experts_per_token, set_skip_threshold  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a pretrained SparseMoE folder with its tokenizer")
    parser.add_argument("--experts", default="6,4", help="expert counts to prune / merge to")
    parser.add_argument("--criteria", default="reap,frequency,activation_norm,random")
    parser.add_argument("--calibration", default="generic", help="comma-separated corpora: generic, bible")
    parser.add_argument("--calibration_tokens", type=int, default=16384)
    parser.add_argument("--random_seeds", type=int, default=3)
    parser.add_argument("--thresholds", default="0.1,0.2,0.3,0.5", help="router_skip_threshold values")
    parser.add_argument("--eval_blocks", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--json", default="bench_results/bench_prune.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.experts, args.eval_blocks, args.calibration_tokens = "6", 4, 1024
        args.random_seeds, args.thresholds, args.new_tokens, args.repeats = 1, "0.3", 8, 1
    return args


def skipped_fraction(model, blocks) -> float:
    """Fraction of top-k assignments the experts skip on `blocks` (the dropped sentinel index E they receive)."""
    counts = [0, 0]

    def count(experts, args):
        index = args[1]
        counts[0] += int((index >= experts.num_experts).sum())
        counts[1] += index.numel()

    handles = [block.experts.register_forward_pre_hook(count) for _, block in moe_blocks(model)]
    with torch.no_grad():
        for ids in blocks:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return counts[0] / max(counts[1], 1)


def decode_times(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    outputs = {}
    with torch.no_grad():
        for name, model in models.items():  # warm-up, and the tokens each variant decodes
            outputs[name] = model.generate(prompt, **kwargs)[0, prompt.shape[1]:].tolist()
        wall = {n: [] for n in models}
        cpu = {n: [] for n in models}
        for _ in range(repeats):
            for name, model in models.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                model.generate(prompt, **kwargs)
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start_wall)
    base = models and next(iter(models))
    result = {}
    for name in models:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        result[name] = dict(tokens_per_s_wall=new_tokens / w, tokens_per_s_cpu=new_tokens / c,
                            same_tokens_as_base=outputs[name] == outputs[base])
    for name in models:
        result[name]["vs_base_wall"] = result[name]["tokens_per_s_wall"] / result[base]["tokens_per_s_wall"]
        result[name]["vs_base_cpu"] = result[name]["tokens_per_s_cpu"] / result[base]["tokens_per_s_cpu"]
    return result


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eval_blocks = token_blocks(tokenizer, heldout_texts("bible"), args.block_size,
                               max_tokens=args.eval_blocks * args.block_size)
    loss = lambda m: validation_loss(m, eval_blocks)  # noqa: E731
    report = dict(model=args.model, num_experts=model.config.num_experts, top_k=model.config.num_experts_per_tok,
                  eval_tokens=sum(b.numel() for b in eval_blocks), base_loss=loss(model), pruning={}, merging={})
    print(f"unpruned: {report['base_loss']:.4f} nats on {report['eval_tokens']} held-out tokens", flush=True)
    counts = [int(c) for c in args.experts.split(",") if c]
    criteria = [c for c in args.criteria.split(",") if c]
    for corpus in [c for c in args.calibration.split(",") if c]:
        calibration = token_blocks(tokenizer, calibration_texts(corpus), args.block_size, args.calibration_tokens)
        stats = collect_expert_statistics(model, calibration)
        for criterion in criteria:
            if criterion == "random" and corpus != args.calibration.split(",")[0]:
                continue  # random does not read calibration: once is enough
            seeds = range(args.random_seeds) if criterion == "random" else [None]
            for kept in counts:
                losses = []
                for seed in seeds:
                    scores = (expert_scores(model, "random", seed=seed) if criterion == "random"
                              else [s.score(criterion) for s in stats])
                    pruned = apply_expert_selection(copy.deepcopy(model), select_experts(scores, kept))
                    losses.append(loss(pruned))
                key = "random" if criterion == "random" else f"{criterion} ({corpus})"
                report["pruning"].setdefault(key, {})[kept] = dict(
                    loss=statistics.mean(losses), min=min(losses), max=max(losses),
                    delta=statistics.mean(losses) - report["base_loss"])
                print(f"prune {key} -> {kept}: {statistics.mean(losses):.4f}", flush=True)
        for kept in counts:
            merged = merge_experts(copy.deepcopy(model), kept, calibration)
            value = loss(merged)
            report["merging"][f"merge ({corpus})"] = {**report["merging"].get(f"merge ({corpus})", {}),
                                                      kept: dict(loss=value, delta=value - report["base_loss"])}
            print(f"merge ({corpus}) -> {kept}: {value:.4f}", flush=True)

    # fewer experts per token: loss, skipped share, decode speed
    variants = {"top-2 (base)": model, "top-1": set_experts_per_token(copy.deepcopy(model), 1)}
    for threshold in [float(t) for t in args.thresholds.split(",") if t]:
        variants[f"skip < {threshold:g} x top"] = set_skip_threshold(copy.deepcopy(model), threshold)
    report["per_token"] = {name: dict(loss=loss(m), skipped=skipped_fraction(m, eval_blocks[:2]))
                           for name, m in variants.items()}
    prompt = eval_blocks[0][:1, :16]
    for name, row in decode_times(variants, prompt, args.new_tokens, args.repeats).items():
        report["per_token"][name].update(row)
    return report


def print_tables(report: dict, args) -> None:
    counts = [int(c) for c in args.experts.split(",") if c]
    print(f"\nunpruned ({report['num_experts']} experts, top-{report['top_k']}): {report['base_loss']:.4f} nats, "
          f"{report['eval_tokens']} held-out tokens")
    print("\n| method | " + " | ".join(f"{k} experts: loss (delta)" for k in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for key, rows in list(report["pruning"].items()) + list(report["merging"].items()):
        cells = []
        for k in counts:
            r = rows.get(k) or rows.get(str(k))
            extra = f", {r['min']:.3f}-{r['max']:.3f}" if "min" in r and r["min"] != r["max"] else ""
            cells.append(f"{r['loss']:.4f} ({r['delta']:+.4f}{extra})")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("\n| experts per token | loss | skipped assignments | decode tok/s (wall) | vs base | "
          "decode tok/s (CPU) | vs base | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in report["per_token"].items():
        print(f"| {name} | {r['loss']:.4f} | {r['skipped']:.1%} | {r['tokens_per_s_wall']:.1f} | "
              f"{r['vs_base_wall']:.2f}x | {r['tokens_per_s_cpu']:.1f} | {r['vs_base_cpu']:.2f}x | "
              f"{'yes' if r['same_tokens_as_base'] else 'no'} |")
    print(f"decode: batch 1, 16-token held-out prompt + {args.new_tokens} greedy tokens, eager, {args.threads} threads, "
          f"median of {args.repeats}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print_tables(report, args)
    report["versions"] = dict(torch=torch.__version__, transformers=__import__("transformers").__version__)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
