"""Whole-model benchmark: `SparseMoEForCausalLM` against transformers' `MixtralForCausalLM` with the same config and
the same weights (copied by `copy_mixtral_weights` below): training-step tokens/s, prefill time, decode tokens/s in
`generate()`, and peak RSS.

    python scripts/bench_model.py              # 4 layers, hidden 512, 8 experts x 1408, top-2, fp32 (~1.5 min)
    python scripts/bench_model.py --quick      # smoke run, well under a minute

Timings are interleaved between the models in one process (median of `--repeats`); peak RSS is measured in one fresh
subprocess per model running forward + backward on the training batch and then the generation, so each number is that
model's alone (the optimizer step is left out of it: see `rss_worker`). Mixtral
uses transformers' default experts implementation ("grouped_mm") unless `--mixtral-experts` says otherwise. The
training step is forward + backward + AdamW step, with the load-balancing loss on in both models (Mixtral needs
`output_router_logits=True` for it). Writes JSON (default `bench_results/bench_model.json`).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_moe import machine_info, synchronize, time_interleaved  # noqa: E402

from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM  # noqa: E402


MODEL = dict(
    vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
    moe_intermediate_size=1408, num_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
)
# Smoke size: same structure, a quarter of the width (a smoke run checks that everything runs, not the figures).
QUICK_MODEL = {**MODEL, "num_hidden_layers": 2, "hidden_size": 256, "moe_intermediate_size": 512, "vocab_size": 2048}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------ the models
def build_configs(shape: dict) -> tuple[SparseMoEConfig, MixtralConfig]:
    common = dict(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=shape["max_position_embeddings"],
        num_experts_per_tok=shape["num_experts_per_tok"], rms_norm_eps=1e-5, rope_parameters=None,
        router_aux_loss_coef=0.001, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    ours = SparseMoEConfig(
        **common, intermediate_size=shape["moe_intermediate_size"], num_experts=shape["num_experts"],
        moe_intermediate_size=shape["moe_intermediate_size"], norm_topk_prob=True, router_type="softmax",
    )
    mixtral = MixtralConfig(
        **common, intermediate_size=shape["moe_intermediate_size"], num_local_experts=shape["num_experts"],
        output_router_logits=True,
    )
    ours.rope_parameters = dict(mixtral.rope_parameters)  # same RoPE theta in both
    return ours, mixtral


def copy_mixtral_weights(mixtral: MixtralForCausalLM, ours: SparseMoEForCausalLM) -> None:
    """Mixtral -> SparseMoE. The parameter names and layouts coincide (`mlp.gate.weight`, `mlp.experts.gate_up_proj`
    (E, 2F, D) = [gate; up], `mlp.experts.down_proj` (E, D, F), attention, norms, embeddings, head); only our router's
    selection bias is extra and stays zero."""
    missing, unexpected = ours.load_state_dict(mixtral.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(name.endswith("e_score_correction_bias") for name in missing), missing


def build_models(shape: dict, dtype: torch.dtype, device: str, mixtral_experts: str, seed: int = 0):
    """(ours, mixtral) with identical weights."""
    ours_config, mixtral_config = build_configs(shape)
    torch.manual_seed(seed)
    mixtral = MixtralForCausalLM._from_config(mixtral_config, experts_implementation=mixtral_experts)
    ours = SparseMoEForCausalLM(ours_config)
    copy_mixtral_weights(mixtral, ours)
    return ours.to(device=device, dtype=dtype), mixtral.to(device=device, dtype=dtype)


def build_one(name: str, shape: dict, dtype: torch.dtype, device: str, mixtral_experts: str, seed: int = 0):
    """Only one of the two models (for the RSS workers: the other must not count towards the peak)."""
    ours_config, mixtral_config = build_configs(shape)
    torch.manual_seed(seed)
    if name == "ours":
        model = SparseMoEForCausalLM(ours_config)
    else:
        model = MixtralForCausalLM._from_config(mixtral_config, experts_implementation=mixtral_experts)
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------- the measures
def train_step_fn(model, ids: torch.Tensor):
    """One optimizer step: forward with labels (LM + load-balancing loss), backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def step():
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def prefill_fn(model, ids: torch.Tensor):
    def step():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True)

    return step


def generate_fn(model, ids: torch.Tensor, new_tokens: int, **generate_kwargs):
    """Greedy `generate()` of exactly `new_tokens` tokens (`generate_kwargs`: e.g. the cache and compile config)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    kwargs.update(generate_kwargs)

    def step():
        model.eval()
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        assert out.shape[1] == ids.shape[1] + new_tokens

    return step


def train_breakdown(models: dict, ids: torch.Tensor, device: str, repeats: int) -> dict:
    """Median ms of the forward, backward and optimizer step of a training step, per model (interleaved)."""
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True) for name, m in models.items()}
    samples = {name: {"forward": [], "backward": [], "optimizer": []} for name in models}
    for i in range(repeats + 1):
        for name, model in models.items():
            model.train()
            ticks = [time.perf_counter()]
            loss = model(input_ids=ids, labels=ids).loss
            synchronize(device)
            ticks.append(time.perf_counter())
            loss.backward()
            synchronize(device)
            ticks.append(time.perf_counter())
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            synchronize(device)
            ticks.append(time.perf_counter())
            if i:  # the first round warms up (and creates the optimizer state)
                for part, start, end in zip(("forward", "backward", "optimizer"), ticks, ticks[1:]):
                    samples[name][part].append((end - start) * 1e3)
    return {name: {part: statistics.median(v) for part, v in parts.items()} for name, parts in samples.items()}


def moe_share_of_decode(models: dict, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    """Fraction of `generate()` wall time spent inside the MoE blocks (`layers[i].mlp`), per model, timed with
    forward hooks in a separate run (the hooks add a little time of their own)."""
    shares = {}
    for name, model in models.items():
        spent, handles = [0.0], []

        def pre_hook(module, args):
            synchronize(device)
            module._bench_start = time.perf_counter()

        def post_hook(module, args, output):
            synchronize(device)
            spent[0] += time.perf_counter() - module._bench_start

        for layer in model.model.layers:
            handles.append(layer.mlp.register_forward_pre_hook(pre_hook))
            handles.append(layer.mlp.register_forward_hook(post_hook))
        step = generate_fn(model, ids, new_tokens)
        step()
        spent[0] = 0.0
        start = time.perf_counter()
        step()
        shares[name] = spent[0] / (time.perf_counter() - start)
        for handle in handles:
            handle.remove()
    return shares


def check_same_logits(ours, mixtral, ids: torch.Tensor) -> float:
    with torch.no_grad():
        diff = (ours.eval()(input_ids=ids).logits.float() - mixtral.eval()(input_ids=ids).logits.float()).abs().max()
    return diff.item()


def rss_worker(args) -> dict:
    """Runs in a fresh process: one model's forward + backward (with loss) and a generation, then its peak RSS.
    NOTE: the optimizer step is left out: AdamW's temporaries depend only on the parameter count (equal here) and,
    being larger than the activations, would set the same peak for both models."""
    torch.set_num_threads(args.threads)
    shape = QUICK_MODEL if args.quick else MODEL
    model = build_one(args.rss_worker, shape, DTYPES[args.dtype], args.device, args.mixtral_experts, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, shape["vocab_size"], (args.batch, args.seq), generator=generator).to(args.device)
    prompt = ids[:1, : args.prompt]
    after_build = _current_rss_mb()
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    peak_train = _peak_rss_mb()
    generate_fn(model, prompt, args.new_tokens)()
    return dict(model=args.rss_worker, rss_after_build_mb=after_build, peak_rss_train_mb=peak_train,
                peak_rss_mb=_peak_rss_mb())


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def _current_rss_mb() -> float:
    return _proc_status_mb("VmRSS")


def _peak_rss_mb() -> float:
    # NOTE: VmHWM, not getrusage's ru_maxrss: a child started by fork + exec inherits the parent's ru_maxrss (the
    # parent holds both models and their optimizer states), while VmHWM belongs to the new address space.
    peak = _proc_status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_rss(args, name: str) -> dict:
    command = [sys.executable, __file__, "--rss-worker", name, *_forwarded_args(args)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _forwarded_args(args) -> list[str]:
    forwarded = ["--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads),
                 "--mixtral-experts", args.mixtral_experts, "--seed", str(args.seed), "--batch", str(args.batch),
                 "--seq", str(args.seq), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
    return forwarded + (["--quick"] if args.quick else [])


# ---------------------------------------------------------------------------------------------------------- running
def run(args) -> dict:
    shape = QUICK_MODEL if args.quick else MODEL
    dtype, device = DTYPES[args.dtype], args.device
    ours, mixtral = build_models(shape, dtype, device, args.mixtral_experts, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, shape["vocab_size"], (args.batch, args.seq), generator=generator).to(device)
    prompt = ids[:1, : args.prompt]
    prefill_ids = torch.randint(3, shape["vocab_size"], (1, args.prefill), generator=generator).to(device)
    max_logit_diff = check_same_logits(ours, mixtral, ids[:1, :64])
    print(f"same weights: max |logits(ours) - logits(mixtral)| = {max_logit_diff:.2e}", flush=True)

    results = {}
    measures = (
        ("train_step", train_step_fn, (ids,), args.batch * args.seq),
        ("prefill", prefill_fn, (prefill_ids,), args.prefill),
        ("decode", generate_fn, (prompt, args.new_tokens), args.new_tokens),
    )
    for label, make, make_args, unit in measures:
        steps = {"ours": make(ours, *make_args), "mixtral": make(mixtral, *make_args)}
        seconds = time_interleaved(steps, device, args.repeats, min_sample_s=0.0, warmup=1)
        results[label] = {name: dict(seconds=s, tokens_per_s=unit / s) for name, s in seconds.items()}
        line = "  ".join(f"{name} {s * 1e3:9.1f} ms ({unit / s:8.1f} tok/s)" for name, s in seconds.items())
        print(f"[{label:10s}] {line}", flush=True)
        synchronize(device)
    models = {"ours": ours, "mixtral": mixtral}
    results["train_breakdown_ms"] = train_breakdown(models, ids, device, args.repeats)
    results["moe_share_of_decode"] = moe_share_of_decode(models, prompt, args.new_tokens, device)
    del ours, mixtral, models
    if not args.no_rss and device == "cpu":
        results["rss"] = {name: measure_rss(args, name) for name in ("ours", "mixtral")}
    return dict(max_logit_diff=max_logit_diff, results=results)


def print_table(report: dict, args) -> None:
    results = report["results"]
    rows = [
        ("training step tokens/s", "train_step", "tokens_per_s", ">= 1.5x"),
        ("prefill time, ms", "prefill", "seconds", ">= 1.0x (faster)"),
        ("decode tokens/s in generate()", "decode", "tokens_per_s", ">= 1.2x"),
    ]
    print("\n| measure | ours | mixtral | ours vs mixtral | target |")
    print("|---|---|---|---|---|")
    for title, key, field, target in rows:
        ours, mixtral = results[key]["ours"][field], results[key]["mixtral"][field]
        if field == "seconds":
            print(f"| {title} | {ours * 1e3:.1f} | {mixtral * 1e3:.1f} | {mixtral / ours:.2f}x | {target} |")
        else:
            print(f"| {title} | {ours:.1f} | {mixtral:.1f} | {ours / mixtral:.2f}x | {target} |")
    if "rss" in results:
        ours, mixtral = results["rss"]["ours"], results["rss"]["mixtral"]
        cells = [f"{r['peak_rss_mb']:.0f} ({r['rss_after_build_mb']:.0f})" for r in (ours, mixtral)]
        print(f"| peak RSS, MiB: fwd+bwd then generate (after build) | {cells[0]} | {cells[1]} "
              f"| {ours['peak_rss_mb'] / mixtral['peak_rss_mb']:.3f}x | <= 1.0x |")
    print("\nWhere the time goes: a training step's parts (ms, median), and the share of generate() time spent in the "
          "MoE blocks")
    print("\n| model | forward | backward | optimizer (AdamW) | MoE blocks' share of decode |")
    print("|---|---|---|---|---|")
    for name in ("ours", "mixtral"):
        parts = results["train_breakdown_ms"][name]
        print(f"| {name} | {parts['forward']:.1f} | {parts['backward']:.1f} | {parts['optimizer']:.1f} "
              f"| {results['moe_share_of_decode'][name]:.0%} |")
    print(f"\ntrain batch {args.batch}x{args.seq}, prefill 1x{args.prefill}, decode 1x{args.prompt} prompt + "
          f"{args.new_tokens} new tokens (greedy), {args.dtype}, {args.threads} threads, mixtral experts "
          f"'{args.mixtral_experts}', median of {args.repeats}")


def workload_parser(description: str, repeats: int, json_file: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags the whole-model benchmarks share (dtype, device, threads, batch shapes, repeats, seed, JSON,
    `--quick`); parse with `parse_workload`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=json_file)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def parse_workload(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse; `--quick` shrinks the batches and repeats to a smoke run."""
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.prefill, args.new_tokens, args.repeats = 1, 64, 64, 8, 2
    return args


def parse_args(argv=None):
    parser = workload_parser(
        __doc__, repeats=9, json_file="bench_results/bench_model.json",
        quick_help="smoke run: 2 layers of width 256, small batches, 2 repeats",
    )
    parser.add_argument("--mixtral-experts", default="grouped_mm", help="Mixtral's experts_implementation")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--rss-worker", choices=["ours", "mixtral"], help=argparse.SUPPRESS)
    return parse_workload(parser, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rss_worker:
        print(json.dumps(rss_worker(args)))
        return {}
    torch.set_num_threads(args.threads)
    return run_and_report(args, run, print_table)


def run_and_report(args, run, print_table) -> dict:
    """`run(args)` -> report; print its table, add the arguments, the machine and the wall time, write `args.json`."""
    start = time.perf_counter()
    report = run(args)
    print_table(report, args)
    report.update(args=vars(args), machine=machine_info(args.device), wall_s=time.perf_counter() - start)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
