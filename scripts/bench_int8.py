"""int8 experts against the fp32 model, same weights, one run: greedy batch-1 decode tokens/s and prefill tokens/s,
eager and compiled, and (with a pretrained model) validation perplexity on held-out World English Bible text.

    python scripts/bench_int8.py --threads 1                      # quickstart "small" shape, random weights
    python scripts/bench_int8.py --quick                          # smoke run (2 layers, eager only, seconds)
    python scripts/bench_int8.py --model_name_or_path out/quickstart/pretrain/model --threads 1   # + perplexity
    python scripts/bench_int8.py --model_name_or_path out/base --heldout_prompts 16   # + greedy tokens vs fp32

Variants: `fp32` (the model as loaded), `int8` (`quantize_experts_int8(model)`: routed and shared experts) and
`int8+linears` (`quantize_experts_int8(model, linears=True, lm_head=True)`: attention projections and the output
head as well). Shape without `--model_name_or_path`: the quickstart's "small" model (configs/demo with 4 layers and
vocab 4096: 4 x 256, 8 experts x 512, top-2), `--config_name demo` (6 layers, vocab 8192) or `--config_name bench`
(scripts/bench_model.py's shape: 4 x 512, 8 experts x 1408, vocab 8192). Compiled decode is
`generate(cache_implementation="static")` with a `CompileConfig` that compiles the decode step on CPU too (as
scripts/bench_compile.py); compiled prefill is `torch.compile(model, dynamic=False)`. Timed calls are interleaved
over the variants of a measure (median of `--repeats`), and each is timed twice: wall clock, and the process's CPU
time (`time.process_time`), which moves far less than the wall clock when other processes share the cores. Ratios
are against fp32 in the same mode. Perplexity: mean next-token cross-entropy of the LM head alone (no router losses)
over the held-out validation blocks of `modeling_sparse_moe.recipes.pretraining` (the split pretraining evaluates on).
Writes JSON (default bench_results/bench_int8.json).
"""

import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_model import parse_workload, run_and_report, workload_parser  # noqa: E402

from modeling_sparse_moe.recipes import pretraining  # noqa: E402
from modeling_sparse_moe.configs import config_path  # noqa: E402
from modeling_sparse_moe.int8_experts import quantize_experts_int8  # noqa: E402


SHAPES = {
    "small": ("demo", dict(num_hidden_layers=4, vocab_size=4096, max_position_embeddings=512)),  # the quickstart's
    "demo": ("demo", dict(max_position_embeddings=512)),
    # scripts/bench_model.py's shape: wider experts, so they make most of a decode step's weight bytes
    "bench": ("demo", dict(num_hidden_layers=4, hidden_size=512, head_dim=64, moe_intermediate_size=1408,
                           intermediate_size=1408, vocab_size=8192, max_position_embeddings=512)),
    "quick": ("demo", dict(num_hidden_layers=2, vocab_size=2048, max_position_embeddings=512)),
}
VARIANTS = {
    "fp32": None,
    "int8": dict(),
    "int8+linears": dict(linears=True, lm_head=True),
}


def parse_args(argv=None):
    parser = workload_parser(
        __doc__, repeats=7, json_file="bench_results/bench_int8.json",
        quick_help="smoke run: 2 layers, short prompt and decode, eager only, 2 repeats",
    )
    parser.add_argument("--config_name", default="small", choices=sorted(SHAPES), help="shape with random weights")
    parser.add_argument("--model_name_or_path", help="a pretrained folder (with tokenizer): adds perplexity")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument("--measures", default="prefill,decode", help="comma-separated: prefill, decode")
    parser.add_argument("--eval_blocks", type=int, default=256, help="validation blocks for the perplexity")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--heldout_prompts", type=int, default=0,
                        help="with --model_name_or_path: greedy-decode this many held-out prompts per variant and "
                             "count those identical to fp32")
    args = parse_workload(parser, argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.measures = [m for m in args.measures.split(",") if m]
    if args.quick:
        args.modes, args.prompt, args.eval_blocks = ["eager"], 8, 8
    if not set(args.modes) <= {"eager", "compiled"}:
        parser.error(f"--modes takes eager and/or compiled, got {args.modes}")
    return args


# ------------------------------------------------------------------------------------------------------ the models
def build_models(args) -> dict:
    if args.model_name_or_path:
        base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    else:
        name, overrides = SHAPES["quick" if args.quick else args.config_name]
        config = AutoConfig.from_pretrained(config_path(name), **overrides)
        torch.manual_seed(args.seed)
        base = AutoModelForCausalLM.from_config(config)
    base.eval()
    return {name: base if kw is None else quantize_experts_int8(copy.deepcopy(base), **kw)
            for name, kw in VARIANTS.items()}


# ----------------------------------------------------------------------------------------------------- the measures
def decode_fn(model, ids: torch.Tensor, new_tokens: int, compiled: bool):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:
        compile_config = CompileConfig(dynamic=False)
        compile_config._compile_all_devices = True  # what generate does on its own on CUDA
        kwargs.update(cache_implementation="static", compile_config=compile_config)

    def step():
        with torch.no_grad():
            return model.generate(ids, **kwargs)

    return step


def prefill_fn(model, ids: torch.Tensor, compiled: bool):
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step():
        with torch.no_grad():
            return forward(input_ids=ids, use_cache=False).logits

    return step


def time_both(steps: dict, repeats: int) -> dict:
    """Median wall and CPU seconds per call of each step, samples interleaved (A B C A B C ...)."""
    for step in steps.values():
        step()
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {name: dict(wall_s=statistics.median(wall[name]), cpu_s=statistics.median(cpu[name])) for name in steps}


def validation_blocks(model_dir: str, block_size: int, max_blocks: int) -> torch.Tensor:
    """(N, block_size) token ids: the held-out World English Bible chapters pretraining evaluates on."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_args = pretraining.DataTrainingArguments(block_size=block_size)
    raw = pretraining.load_raw_datasets(data_args)
    packed = pretraining.tokenize_and_pack(raw, tokenizer, block_size, data_args)["validation"]
    return torch.tensor(packed[: min(max_blocks, len(packed))]["input_ids"])


def perplexity(model, blocks: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch):
            ids = blocks[start : start + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:].reshape(-1)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def heldout_greedy(models: dict, args) -> dict:
    """Greedy decode (eager, `--new_tokens`) from the first 16 tokens of `--heldout_prompts` held-out validation
    blocks: per variant, how many prompts decode exactly the fp32 tokens, and the mean length of the common prefix."""
    blocks = validation_blocks(args.model_name_or_path, args.block_size, args.heldout_prompts)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    decoded = {name: [] for name in models}
    with torch.no_grad():
        for block in blocks:
            prompt = block[:16].unsqueeze(0)
            for name, model in models.items():
                decoded[name].append(model.generate(prompt, **kwargs)[0, 16:].tolist())

    def common_prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    reference = decoded["fp32"]
    result = {name: dict(prompts=len(blocks), identical=sum(o == r for o, r in zip(outs, reference)),
                         mean_common_prefix=statistics.mean(common_prefix(o, r) for o, r in zip(outs, reference)))
              for name, outs in decoded.items()}
    for name, r in result.items():
        print(f"[held-out greedy] {name}: {r['identical']}/{r['prompts']} prompts identical to fp32, mean common "
              f"prefix {r['mean_common_prefix']:.1f}/{args.new_tokens} tokens", flush=True)
    return result


def run(args) -> dict:
    models = build_models(args)
    vocab = models["fp32"].config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, vocab, (1, args.prompt), generator=generator)
    prefill_ids = torch.randint(3, vocab, (1, args.prefill), generator=generator)
    report = {"footprint_bytes": {name: m.get_memory_footprint() for name, m in models.items()}, "results": {}}
    with torch.no_grad():
        reference = models["fp32"](prompt).logits
        report["max_logit_diff"] = {n: (m(prompt).logits - reference).abs().max().item() for n, m in models.items()}
    for mode in args.modes:
        compiled = mode == "compiled"
        for label, make, tokens in (
            ("prefill", lambda m: prefill_fn(m, prefill_ids, compiled), args.prefill),
            ("decode", lambda m: decode_fn(m, prompt, args.new_tokens, compiled), args.new_tokens),
        ):
            if label not in args.measures:
                continue
            steps = {name: make(model) for name, model in models.items()}
            first_s = {}
            for name, step in steps.items():  # compiles (and warms up) each variant before any timing
                start = time.perf_counter()
                out = step()
                first_s[name] = time.perf_counter() - start
                if label == "decode":
                    report.setdefault("decoded", {})[f"{name} {mode}"] = out[0, args.prompt :].tolist()
            times = time_both(steps, args.repeats)
            base = times["fp32"]
            report["results"][f"{label} {mode}"] = {
                name: dict(
                    **t, first_call_s=first_s[name], tokens_per_s_wall=tokens / t["wall_s"],
                    tokens_per_s_cpu=tokens / t["cpu_s"], vs_fp32_wall=base["wall_s"] / t["wall_s"],
                    vs_fp32_cpu=base["cpu_s"] / t["cpu_s"],
                )
                for name, t in times.items()
            }
            line = "  ".join(f"{n} {t['wall_s'] * 1e3:.1f} ms ({t['cpu_s'] * 1e3:.1f} cpu)" for n, t in times.items())
            print(f"[{label} {mode}] {line}", flush=True)
    if args.model_name_or_path and args.heldout_prompts:
        report["heldout_greedy"] = heldout_greedy(models, args)
    if args.model_name_or_path:
        blocks = validation_blocks(args.model_name_or_path, args.block_size, args.eval_blocks)
        ppl = {name: perplexity(model, blocks) for name, model in models.items()}
        report["perplexity"] = dict(
            blocks=blocks.shape[0], block_size=args.block_size, tokens=blocks[:, 1:].numel(), values=ppl,
            relative_change={n: p / ppl["fp32"] - 1 for n, p in ppl.items()},
        )
    return report


def print_table(report: dict, args) -> None:
    print("\n| measure | variant | tokens/s (wall) | vs fp32 (wall) | tokens/s (CPU time) | vs fp32 (CPU time) |")
    print("|---|---|---|---|---|---|")
    for measure, rows in report["results"].items():
        for name, r in rows.items():
            print(f"| {measure} | {name} | {r['tokens_per_s_wall']:.1f} | {r['vs_fp32_wall']:.2f}x "
                  f"| {r['tokens_per_s_cpu']:.1f} | {r['vs_fp32_cpu']:.2f}x |")
    print("\n| variant | footprint MB | max abs logit diff vs fp32 | perplexity | vs fp32 |")
    print("|---|---|---|---|---|")
    ppl = report.get("perplexity", {})
    for name, size in report["footprint_bytes"].items():
        p = ppl.get("values", {}).get(name)
        cells = (f"{p:.3f}", f"{ppl['relative_change'][name]:+.3%}") if p is not None else ("-", "-")
        print(f"| {name} | {size / 2**20:.1f} | {report['max_logit_diff'][name]:.2e} | {cells[0]} | {cells[1]} |")
    if ppl:
        print(f"\nperplexity on {ppl['blocks']} held-out blocks x {ppl['block_size']} tokens")
    print(f"decode: batch 1, {args.prompt}-token prompt + {args.new_tokens} greedy tokens; "
          f"prefill: 1 x {args.prefill}; fp32 activations, {args.threads} threads, median of {args.repeats}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run_and_report(args, run, print_table)


if __name__ == "__main__":
    main()
