"""GPU validation of the "sparse_moe" experts: correctness against the eager reference in bf16 (and fp32), the
compiled model against eager, then the benchmarks the performance issue asks for, in bf16. Designed to finish in
under 8 minutes on one H100/H200: a benchmark section starts only if its estimated cost fits in the time budget
(`--budget-s`, default 460 s; `SECTION_COST_S`), and is reported as skipped otherwise.

    python scripts/gpu_check.py                      # on a CUDA machine
    python scripts/gpu_check.py --device cpu --quick # dry run of the same code paths on CPU (tiny sizes)

What it runs:
  1. Correctness, bf16 and fp32, block and whole model, ours vs the eager loop. On CUDA "ours" is the static,
     sync-free path (`moe_dispatch.static_experts_forward`); on the CPU dry run that path is forced, so the dry run
     checks what the GPU runs.
  2. Compiled correctness (skipped with `--skip-bench`): a small model under `torch.compile(fullgraph=True)`,
     forward + backward in bf16 against eager; static-cache `generate()` (auto-compiled on CUDA, CUDA graphs through
     the default `mode="reduce-overhead"`) against dynamic-cache `generate()`; CUDA-graph skips are reported.
  3. MoE block (scripts/bench_moe.py): ours vs the dense FFN of equal active FLOPs vs Mixtral `grouped_mm` (and its
     eager loop) at 1/8/512/4096/16384 tokens, shapes A and B, inference and training, peak memory.
  4. Whole model, ~1B active parameters (8 layers, hidden 2560, 8 experts x 6912, top-2): training-step tokens/s and
     MFU (6 x active matmul parameters + causal attention, per token, against the GPU's dense bf16 peak), prefill,
     and decode tokens/s with the static cache + compile, each ours vs `MixtralForCausalLM` ("grouped_mm") the same
     way; training and prefill compile each decoder layer (regional compilation, the same for both models), decode is
     what `generate(cache_implementation="static")` compiles by itself; peak memory per measure.

Without CUDA (and without `--device cpu`) it prints a message and exits 0. Exit status 1 means a correctness check
failed. Writes bench_results/gpu_check.json plus bench_results/gpu_bench_moe.json.
"""

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

from transformers import CompileConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_model  # noqa: E402
import bench_moe  # noqa: E402

from modeling_sparse_moe import SparseMoEForCausalLM, moe_dispatch  # noqa: E402
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEBlock  # noqa: E402


BLOCK_TOKENS = (1, 8, 512, 4096, 16384)
# ~1B active parameters: per layer 15.7M attention + 2 x 53.1M experts, x 8 layers, + the 82M LM head.
BIG_MODEL = dict(
    vocab_size=32000, hidden_size=2560, num_hidden_layers=8, num_attention_heads=20, num_key_value_heads=4,
    moe_intermediate_size=6912, num_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
)
QUICK_BIG_MODEL = dict(
    vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
)
# Seconds a whole-model section may take on one H100/H200 (compiles included), by our estimate; a section starts only
# if it fits in what is left of `--budget-s`.
SECTION_COST_S = {"moe": 90, "train_step": 150, "prefill": 60, "decode": 150}
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device-name substring.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


@contextlib.contextmanager
def static_path(force: bool):
    """On the CPU dry run, make "sparse_moe" take the static path that accelerators take."""
    if not force:
        yield
        return
    saved = moe_dispatch._use_static_path, moe_dispatch._use_gathered_path
    moe_dispatch._use_static_path = lambda device, act_fn=None: True
    moe_dispatch._use_gathered_path = lambda *args: False  # CPU-only decode path: not what a GPU runs
    try:
        yield
    finally:
        moe_dispatch._use_static_path, moe_dispatch._use_gathered_path = saved


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-12)).item()


def block_results(block: SparseMoEBlock, implementation: str, dtype: torch.dtype, x: torch.Tensor, grad: torch.Tensor):
    """Output and gradients (input, router, gate_up_proj, down_proj) of a copy of `block` run in `dtype`."""
    twin = copy.deepcopy(block).to(dtype)
    twin.config._experts_implementation = implementation
    x = x.detach().to(dtype).clone().requires_grad_(True)
    out = twin(x)
    out.backward(grad.to(dtype))
    experts = twin.experts
    return [out.detach(), x.grad, twin.gate.weight.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


def check_block(shape_name: str, num_tokens: int, capacity_factor, device: str) -> dict:
    """bf16 ours vs bf16 eager, both against fp32 eager on the same (bf16-representable) weights and input: ours must
    be as accurate as the reference (error <= 2x eager's + 1e-3). fp32 ours vs fp32 eager must agree to 1e-4."""
    shape = bench_moe.SHAPES[shape_name]
    config = bench_moe.sparse_moe_config(shape, capacity_factor=capacity_factor)
    torch.manual_seed(num_tokens)
    block = SparseMoEBlock(config)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02)
    block = block.to(device).bfloat16().float()  # bf16-representable: every run routes identically
    block.train()  # capacity dropping (when configured) happens in training only
    x = torch.randn(1, num_tokens, shape["hidden_size"], device=device).bfloat16().float()
    grad = torch.randn_like(x).bfloat16().float()
    exact = block_results(block, "eager", torch.float32, x, grad)
    eager_bf16 = block_results(block, "eager", torch.bfloat16, x, grad)
    with static_path(device == "cpu"):
        ours_fp32 = block_results(block, "sparse_moe", torch.float32, x, grad)
        ours_bf16 = block_results(block, "sparse_moe", torch.bfloat16, x, grad)
    names = ("output", "grad input", "grad router", "grad gate_up_proj", "grad down_proj")
    report, ok = {}, True
    for name, e, o32, e16, o16 in zip(names, exact, ours_fp32, eager_bf16, ours_bf16):
        fp32_error, bf16_error, eager_error = relative_error(o32, e), relative_error(o16, e), relative_error(e16, e)
        passed = fp32_error < 1e-4 and bf16_error <= 2 * eager_error + 1e-3
        ok &= passed
        report[name] = dict(fp32=fp32_error, bf16=bf16_error, eager_bf16=eager_error, passed=passed)
    return dict(shape=shape_name, tokens=num_tokens, capacity_factor=capacity_factor, ok=ok, errors=report)


def check_model(device: str) -> dict:
    """Whole `SparseMoEForCausalLM` in bf16 with capacity dropping: loss and logits of ours vs eager."""
    config = bench_model.build_configs(bench_model.QUICK_MODEL)[0]
    config.capacity_factor = 1.0
    torch.manual_seed(0)
    reference = SparseMoEForCausalLM._from_config(copy.deepcopy(config), experts_implementation="eager")
    ours = SparseMoEForCausalLM._from_config(copy.deepcopy(config), experts_implementation="sparse_moe")
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(3, config.vocab_size, (2, 128), device=device)
    results = {}
    for name, model in (("eager", reference), ("ours", ours)):
        model = model.to(device=device, dtype=torch.bfloat16).train()
        with static_path(device == "cpu"):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.logits.detach().float(), out.loss.item(), grads)
    logits_error = relative_error(results["ours"][0], results["eager"][0])
    grads_ours, grads_eager = results["ours"][2], results["eager"][2]
    grad_error = max(relative_error(grads_ours[n], grads_eager[n]) for n in grads_eager) if grads_ours.keys() == \
        grads_eager.keys() else float("inf")
    ok = logits_error < 2e-2 and abs(results["ours"][1] - results["eager"][1]) < 2e-2 and grad_error < 5e-2
    return dict(ok=ok, logits_error=logits_error, loss=(results["ours"][1], results["eager"][1]), grad_error=grad_error)


def _build_pair(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """(ours, Mixtral "grouped_mm") with the same weights, built on `device` in `dtype` (no fp32 copy on the host)."""
    ours_config, mixtral_config = bench_model.build_configs(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        mixtral = MixtralForCausalLM._from_config(mixtral_config, experts_implementation="grouped_mm", dtype=dtype)
        ours = SparseMoEForCausalLM._from_config(ours_config, experts_implementation="sparse_moe", dtype=dtype)
    bench_model.copy_mixtral_weights(mixtral, ours)
    return ours, mixtral


def _cudagraph_skips() -> int:
    return int(sum(torch._dynamo.utils.counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)))


def check_compiled(device: str) -> dict:
    """The small benchmark model (capacity dropping, router losses) in bf16 under `torch.compile(fullgraph=True)`,
    training forward + backward, judged as the eager checks are: against fp32 eager on the same bf16-representable
    weights, its error must be at most twice eager bf16's (+ slack). (bf16 compiled vs bf16 eager directly differs by
    more: inductor keeps fused intermediates in fp32, and a flipped near-tie in routing moves whole rows.) Then greedy
    static-cache generation, compiled by `generate` itself, against dynamic-cache generation."""
    config = bench_model.build_configs(bench_model.QUICK_MODEL)[0]
    config.capacity_factor, config.router_z_loss_coef = 1.0, 1e-3
    torch.manual_seed(0)
    with torch.device(device):
        model = SparseMoEForCausalLM._from_config(config, experts_implementation="sparse_moe")
    model = model.to(torch.bfloat16).float()  # bf16-representable weights: the fp32 run is the exact reference
    ids = torch.randint(3, config.vocab_size, (2, 128), device=device)
    results = {}
    with static_path(device == "cpu"):
        for name, dtype, compiled in (("exact", torch.float32, False), ("eager", torch.bfloat16, False),
                                      ("compiled", torch.bfloat16, True)):
            model = model.to(dtype).train()
            model.zero_grad(set_to_none=True)
            forward = torch.compile(model, fullgraph=True) if compiled else model
            out = forward(input_ids=ids, labels=ids)
            out.loss.backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
            results[name] = dict(logits=out.logits.detach().float(), loss=out.loss.float().reshape(1), **grads)
    errors = {
        key: (relative_error(results["compiled"][key], exact), relative_error(results["eager"][key], exact))
        for key, exact in results["exact"].items()
    }
    failed = [key for key, (compiled_error, eager_error) in errors.items() if compiled_error > 2 * eager_error + 2e-2]
    worst = max(errors, key=lambda key: errors[key][0] - 2 * errors[key][1])
    model.eval()
    prompt = ids[:1, :32]
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad(), static_path(device == "cpu"):
        dynamic = model.generate(prompt, **kwargs)
        compile_config = CompileConfig()
        compile_config._compile_all_devices = device == "cpu"  # CUDA compiles without being told
        skips_before = _cudagraph_skips()
        static = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
        static_eager = model.generate(prompt, cache_implementation="static", disable_compile=True, **kwargs)
    # NOTE: bf16 compiled vs eager may break a near-tie of two logits differently and then diverge (this model's
    # random weights give nearly flat logits); the fractions are reported, and the first generated token (same
    # prompt, same prefill) must agree.
    new_dynamic, new_static = dynamic[0, prompt.shape[1]:], static[0, prompt.shape[1]:]
    agreement = (new_dynamic == new_static).float().mean().item()
    agreement_static_eager = (static_eager[0, prompt.shape[1]:] == new_static).float().mean().item()
    ok = not failed and bool(new_dynamic[0] == new_static[0])
    return dict(ok=ok, failed=failed, worst=worst, worst_errors=errors[worst], logits_errors=errors["logits"],
                loss_errors=errors["loss"], static_generate_token_agreement=agreement,
                static_compiled_vs_static_eager_agreement=agreement_static_eager,
                cudagraph_skips=_cudagraph_skips() - skips_before)


def _active_matmul_params(model) -> int:
    """Parameters a token multiplies with: everything but the input embeddings, experts counted K/E."""
    config, total = model.config, 0
    top_k = config.num_experts_per_tok
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    for name, param in model.named_parameters():
        if "embed_tokens" in name or "norm" in name:
            continue
        total += param.numel() * top_k // num_experts if ".experts." in name else param.numel()
    return total


def _peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _fits(deadline: float, section: str) -> bool:
    return time.perf_counter() + SECTION_COST_S[section] < deadline


def bench_whole_model(device: str, quick: bool, deadline: float) -> dict:
    """Training step (tokens/s, MFU), prefill and static-cache compiled decode, ours vs Mixtral, both in bf16 with
    the same weights; a measure that would not end before `deadline` (perf_counter) is skipped."""
    shape = QUICK_BIG_MODEL if quick else BIG_MODEL
    batch, seq, prefill_len, prompt_len, new_tokens, repeats = (1, 64, 64, 8, 8, 2) if quick else (
        4, 2048, 4096, 128, 128, 5)
    ours, mixtral = _build_pair(shape, device, torch.bfloat16)
    models = {"ours": ours, "mixtral": mixtral}
    active = _active_matmul_params(ours)
    assert active == _active_matmul_params(mixtral)
    layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    # causal attention: QK^T and AV, 2 x 2 x S/2 x D FLOPs per token per layer forward, x3 with backward
    train_flops_per_token = 6 * active + 6 * layers * seq * hidden
    ids = torch.randint(3, shape["vocab_size"], (batch, seq), device=device)
    report = dict(active_params=active, train_flops_per_token=train_flops_per_token, skipped=[])
    timing = dict(repeats=repeats, min_sample_s=0.0, warmup=1)

    for model in models.values():  # regional compilation: one compiled decoder layer serves all layers
        for layer in model.model.layers:
            layer.compile(dynamic=False)

    if _fits(deadline, "train_step"):
        steps, peaks, compile_s = {}, {}, {}
        for name, model in models.items():
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as Trainer's default

            def step(model=model, optimizer=optimizer):
                model.train()
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            _reset_peak(device)
            start = time.perf_counter()
            step()  # compiles
            bench_moe.synchronize(device)
            compile_s[name] = time.perf_counter() - start
            peaks[name] = _peak_gib(device)
            steps[name] = step
        seconds = bench_moe.time_interleaved(steps, device, **timing)
        peak = _peak_flops(device)
        report["train_step"] = {
            name: dict(tokens_per_s=batch * seq / s, mfu=None if peak is None else batch * seq / s *
                       train_flops_per_token / peak, first_call_s=compile_s[name], peak_gib=peaks[name])
            for name, s in seconds.items()
        }
        for model in models.values():
            model.zero_grad(set_to_none=True)
    else:
        report["skipped"].append("train_step")

    if _fits(deadline, "prefill"):
        prefill_ids = torch.randint(3, shape["vocab_size"], (1, prefill_len), device=device)
        steps, peaks = {}, {}
        for name, model in models.items():
            def step(model=model):
                model.eval()
                with torch.no_grad():
                    model(input_ids=prefill_ids, use_cache=False, logits_to_keep=1)

            _reset_peak(device)
            step()
            peaks[name] = _peak_gib(device)
            steps[name] = step
        seconds = bench_moe.time_interleaved(steps, device, **timing)
        report["prefill"] = {name: dict(ms=s * 1e3, tokens_per_s=prefill_len / s, peak_gib=peaks[name])
                             for name, s in seconds.items()}
    else:
        report["skipped"].append("prefill")

    if _fits(deadline, "decode"):
        for model in models.values():  # generate compiles the whole forward for its decode step
            for layer in model.model.layers:
                layer._compiled_call_impl = None
        prompt = ids[:1, :prompt_len]
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        compile_config = CompileConfig()
        compile_config._compile_all_devices = device == "cpu"
        steps, peaks, compile_s = {}, {}, {}
        for name, model in models.items():
            for mode, extra in (("eager", {}), ("static_compiled", dict(cache_implementation="static",
                                                                        compile_config=compile_config))):
                def step(model=model, extra=extra):
                    model.eval()
                    with torch.no_grad():
                        model.generate(prompt, **kwargs, **extra)

                _reset_peak(device)
                start = time.perf_counter()
                step()
                bench_moe.synchronize(device)
                compile_s[f"{name}_{mode}"] = time.perf_counter() - start
                peaks[f"{name}_{mode}"] = _peak_gib(device)
                steps[f"{name}_{mode}"] = step
        seconds = bench_moe.time_interleaved(steps, device, **timing)
        report["decode"] = {key: dict(tokens_per_s=new_tokens / s, first_call_s=compile_s[key], peak_gib=peaks[key])
                            for key, s in seconds.items()}
    else:
        report["skipped"].append("decode")
    return report


def print_whole_model(report: dict) -> None:
    print(f"\nwhole model, bf16, {report['active_params'] / 1e9:.2f}B active matmul parameters")
    if "train_step" in report:
        r = report["train_step"]
        for name in ("ours", "mixtral"):
            mfu = r[name]["mfu"]
            print(f"  train step {name:8s}: {r[name]['tokens_per_s']:10.0f} tok/s, MFU "
                  f"{'n/a' if mfu is None else f'{mfu:.1%}'}, first call {r[name]['first_call_s']:.0f} s, peak "
                  f"{r[name]['peak_gib']} GiB")
        print(f"  train step ours / Mixtral: {r['ours']['tokens_per_s'] / r['mixtral']['tokens_per_s']:.2f}x")
    if "prefill" in report:
        r = report["prefill"]
        print(f"  prefill ms: ours {r['ours']['ms']:.1f}, Mixtral {r['mixtral']['ms']:.1f} "
              f"({r['mixtral']['ms'] / r['ours']['ms']:.2f}x)")
    if "decode" in report:
        r = report["decode"]
        for mode in ("eager", "static_compiled"):
            ours, mixtral = r[f"ours_{mode}"]["tokens_per_s"], r[f"mixtral_{mode}"]["tokens_per_s"]
            print(f"  decode {mode:15s}: ours {ours:8.1f} tok/s, Mixtral {mixtral:8.1f} tok/s ({ours / mixtral:.2f}x)")
    if report["skipped"]:
        print(f"  skipped (time budget): {', '.join(report['skipped'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small token counts, few repeats (and 2-layer model)")
    parser.add_argument("--skip-bench", action="store_true", help="eager correctness checks only")
    parser.add_argument("--budget-s", type=float, default=460.0,
                        help="CUDA: a benchmark section that would not end within this many seconds of the start (by "
                             "SECTION_COST_S) is skipped and reported as such")
    parser.add_argument("--json", default="bench_results/gpu_check.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available here; nothing to check. Run it on a GPU machine, or pass "
              "`--device cpu --quick` for a dry run of the code paths on CPU.")
        return 0
    start = time.perf_counter()
    device = args.device
    # NOTE: compiled training, prefill and decode graphs of two models; never fall back to eager for want of cache room
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    if device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")

    tokens = (1, 7, 64) if args.quick else (1, 7, 512, 2048)
    capacities = (1.0,) if args.quick else (None, 1.0)
    checks = [check_block(shape, t, cf, device) for shape in ("A", "B") for t in tokens for cf in capacities]
    checks.append(dict(model=check_model(device)))
    ok = all(c.get("ok", c.get("model", {}).get("ok")) for c in checks)
    for c in checks:
        if "model" in c:
            m = c["model"]
            print(f"[{'ok' if m['ok'] else 'FAIL'}] whole model bf16: logits rel err {m['logits_error']:.2e}, "
                  f"loss ours/eager {m['loss'][0]:.4f}/{m['loss'][1]:.4f}, "
                  f"worst parameter-grad rel err {m['grad_error']:.2e}")
            continue
        worst = max(c["errors"].values(), key=lambda e: e["bf16"])
        print(f"[{'ok' if c['ok'] else 'FAIL'}] block {c['shape']} T={c['tokens']} capacity={c['capacity_factor']}: "
              f"worst bf16 rel err {worst['bf16']:.2e} (eager {worst['eager_bf16']:.2e}), "
              f"fp32 rel err {max(e['fp32'] for e in c['errors'].values()):.1e}")

    bench = {}
    if not args.skip_bench:
        deadline = start + args.budget_s if device.startswith("cuda") else float("inf")  # the dry run runs all
        compiled = check_compiled(device)
        ok &= compiled["ok"]
        print(f"[{'ok' if compiled['ok'] else 'FAIL'}] compiled (fullgraph) bf16, rel err vs fp32 (compiled / eager "
              f"bf16): logits {compiled['logits_errors'][0]:.2e} / {compiled['logits_errors'][1]:.2e}, loss "
              f"{compiled['loss_errors'][0]:.2e} / {compiled['loss_errors'][1]:.2e}, worst {compiled['worst']} "
              f"{compiled['worst_errors'][0]:.2e} / {compiled['worst_errors'][1]:.2e}; "
              f"static-cache compiled generate vs dynamic: "
              f"{compiled['static_generate_token_agreement']:.0%} of tokens agree (vs static eager: "
              f"{compiled['static_compiled_vs_static_eager_agreement']:.0%}), cudagraph skips "
              f"{compiled['cudagraph_skips']}", flush=True)
        bench["compiled_checks"] = compiled
        moe_args = ["--device", device, "--dtype", "bf16", "--json", "bench_results/gpu_bench_moe.json"]
        moe_args += ["--quick"] if args.quick else ["--tokens", *map(str, BLOCK_TOKENS), "--repeats", "7",
                                                    "--min-sample-s", "0.02"]
        if _fits(deadline, "moe"):
            bench["moe"] = bench_moe.main(moe_args)
        else:
            print("MoE block benchmark: skipped (time budget)")
        bench["model"] = bench_whole_model(device, args.quick, deadline)
        print_whole_model(bench["model"])

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(ok=ok, checks=checks, bench=bench, machine=bench_moe.machine_info(device),
                   wall_s=time.perf_counter() - start)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\ncorrectness: {'all passed' if ok else 'FAILED'}; wrote {out} ({payload['wall_s']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
