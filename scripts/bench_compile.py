"""`torch.compile` vs eager, whole model: `SparseMoEForCausalLM` against transformers' `MixtralForCausalLM`
(default experts implementation, "grouped_mm") with the same config and weights (the `scripts/bench_model.py` shape),
in one run: training step, prefill and decode, each eager and compiled, plus compile times.

    python scripts/bench_compile.py            # 4 layers, hidden 512, 8 experts x 1408, top-2, fp32
    python scripts/bench_compile.py --quick    # 2 layers, small batches (a few minutes: mostly compiling)
    python scripts/bench_compile.py --measures train_step

The full run took 191 s on the idle 2-core VM with a cold inductor cache (89 s warm), and ~25 min when the VM's
cores were shared with other test runs (load average 10-18).

Compiled means `torch.compile(model, dynamic=False)` for the training step (forward + backward; the optimizer, fused
AdamW as `Trainer` uses by default, stays eager, the same in both) and for prefill; decode is
`generate(cache_implementation="static")` with a `CompileConfig` that lets generate auto-compile its decode step on
CPU too (`_compile_all_devices`), against eager `generate()` with the dynamic
cache. Compile time is the first compiled call's wall time minus an eager call's (after one small warm-up compile, so
that inductor's start-up is not charged to the first model). Timed calls are interleaved over the four contestants of
a measure (median of `--repeats`). On CPU in fp32, compiled Mixtral runs its experts through transformers'
`grouped_mm_fallback` custom op (the compiler cannot trace `grouped_mm` outside bf16); ours through the planned path's
custom ops (`sparse_moe::planned_up` / `planned_down` / `planned_inference` in `moe_dispatch.py`). Writes JSON
(default bench_results/bench_compile.json).
"""

import sys
import time
from pathlib import Path

import torch

from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_model import (  # noqa: E402
    DTYPES, MODEL, QUICK_MODEL, build_models, check_same_logits, generate_fn, parse_workload,
    run_and_report, workload_parser,
)
from bench_moe import synchronize, time_interleaved  # noqa: E402


MODELS = ("ours", "mixtral")
MEASURES = ("train_step", "prefill", "decode")


def train_step(model, ids, compiled: bool):
    forward = torch.compile(model, dynamic=False) if compiled else model
    # NOTE: fused AdamW, as `Trainer` uses by default (torch >= 2.8): the foreach version's per-step temporaries (page
    # faults on every buffer above 32 MiB) made a quarter of the step and most of its run-to-run noise on CPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        model.train()
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def prefill(model, ids, compiled: bool):
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step():
        model.eval()
        with torch.no_grad():
            forward(input_ids=ids, use_cache=False)

    return step


def decode(model, ids, new_tokens: int, compiled: bool):
    if not compiled:
        return generate_fn(model, ids, new_tokens)
    compile_config = CompileConfig(dynamic=False)
    compile_config._compile_all_devices = True  # what generate does on its own on CUDA
    return generate_fn(model, ids, new_tokens, cache_implementation="static", compile_config=compile_config)


def _warm_up_compiler(device: str) -> None:
    """One small compiled forward + backward first: a process's first compile also pays for starting inductor (its
    imports and worker pool), which would otherwise be charged to whichever model compiles first."""
    x = torch.randn(8, 8, device=device, requires_grad=True)
    torch.compile(lambda t: (t.sin() @ t).relu().sum(), dynamic=False)(x).backward()


def first_call_s(step, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def run(args) -> dict:
    shape = QUICK_MODEL if args.quick else MODEL
    device = args.device
    models = dict(zip(MODELS, build_models(shape, DTYPES[args.dtype], device, "grouped_mm", args.seed)))
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, shape["vocab_size"], (args.batch, args.seq), generator=generator).to(device)
    prefill_ids = torch.randint(3, shape["vocab_size"], (1, args.prefill), generator=generator).to(device)
    prompt = ids[:1, : args.prompt]
    max_logit_diff = check_same_logits(models["ours"], models["mixtral"], ids[:1, :64])
    print(f"same weights: max |logits(ours) - logits(mixtral)| = {max_logit_diff:.2e}", flush=True)

    measures = (
        ("train_step", lambda m, c: train_step(m, ids, c), args.batch * args.seq),
        ("prefill", lambda m, c: prefill(m, prefill_ids, c), args.prefill),
        ("decode", lambda m, c: decode(m, prompt, args.new_tokens, c), args.new_tokens),
    )
    results = {}
    _warm_up_compiler(device)
    for label, make, tokens in measures:
        if label not in args.measures:
            continue
        steps, compile_s = {}, {}
        for name, model in models.items():
            eager = make(model, False)
            eager_s = first_call_s(eager, device)  # also the eager warm-up
            compiled = make(model, True)
            compile_s[name] = max(first_call_s(compiled, device) - eager_s, 0.0)
            steps[f"{name}_eager"], steps[f"{name}_compiled"] = eager, compiled
        seconds = time_interleaved(steps, device, args.repeats, min_sample_s=0.0, warmup=1)
        results[label] = {
            name: dict(seconds=s, tokens_per_s=tokens / s) for name, s in seconds.items()
        }
        for name in MODELS:
            results[label][f"{name}_compiled"]["compile_s"] = compile_s[name]
        line = "  ".join(f"{name} {s * 1e3:8.1f} ms" for name, s in seconds.items())
        print(f"[{label:10s}] {line}  (compile s: ours {compile_s['ours']:.0f}, mixtral {compile_s['mixtral']:.0f})",
              flush=True)
    return dict(max_logit_diff=max_logit_diff, results=results)


def print_table(report: dict, args) -> None:
    results = report["results"]
    print("\n| measure | ours eager | ours compiled | Mixtral eager | Mixtral compiled | compiled ours vs compiled "
          "Mixtral | ours compiled vs eager | compile s, ours / Mixtral |")
    print("|---|---|---|---|---|---|---|---|")
    for label, title in (("train_step", "training step tokens/s"), ("prefill", "prefill tokens/s"),
                         ("decode", "decode tokens/s")):
        if label not in results:
            continue
        r = results[label]
        tps = {name: r[name]["tokens_per_s"] for name in r}
        print(f"| {title} | {tps['ours_eager']:.1f} | {tps['ours_compiled']:.1f} | {tps['mixtral_eager']:.1f} "
              f"| {tps['mixtral_compiled']:.1f} | {tps['ours_compiled'] / tps['mixtral_compiled']:.2f}x "
              f"| {tps['ours_compiled'] / tps['ours_eager']:.2f}x "
              f"| {r['ours_compiled']['compile_s']:.0f} / {r['mixtral_compiled']['compile_s']:.0f} |")
    print(f"\ntrain batch {args.batch}x{args.seq} (forward + backward + AdamW, load-balancing loss on), prefill "
          f"1x{args.prefill}, decode 1x{args.prompt} prompt + {args.new_tokens} new tokens (greedy; compiled: static "
          f"cache), {args.dtype}, {args.threads} threads, median of {args.repeats}")


def parse_args(argv=None):
    parser = workload_parser(
        __doc__, repeats=7, json_file="bench_results/bench_compile.json", quick_help="2 layers, small batches, 2 repeats"
    )
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    return parse_workload(parser, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # NOTE: each model's forward is compiled for training, prefill and decode: more cache entries per code object
    # than dynamo's default limit of 8 once both models share transformers' wrappers; never fall back to eager here.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    return run_and_report(args, run, print_table)


if __name__ == "__main__":
    main()
