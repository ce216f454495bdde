"""GPU validation of the "sparse_moe" experts dispatch: correctness against the eager reference in bf16 (and fp32),
then the MoE-block and whole-model benchmarks in bf16. Finishes in well under 8 minutes on one modern GPU.

    python scripts/gpu_check.py                      # on a CUDA machine
    python scripts/gpu_check.py --device cpu --quick # dry run of the same code paths on CPU (tiny sizes)

Without CUDA (and without `--device cpu`) it prints a message and exits 0. Exit status 1 means a correctness check
failed. Writes bench_results/gpu_check.json plus the two benchmarks' JSON files.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_model  # noqa: E402
import bench_moe  # noqa: E402

from modeling_sparse_moe import SparseMoEForCausalLM  # noqa: E402
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEBlock  # noqa: E402


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
    ours_fp32 = block_results(block, "sparse_moe", torch.float32, x, grad)
    eager_bf16 = block_results(block, "eager", torch.bfloat16, x, grad)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small token counts, few repeats (and 2-layer model)")
    parser.add_argument("--skip-bench", action="store_true", help="correctness checks only")
    parser.add_argument("--json", default="bench_results/gpu_check.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available here; nothing to check. Run it on a GPU machine, or pass "
              "`--device cpu --quick` for a dry run of the code paths on CPU.")
        return 0
    start = time.perf_counter()
    device = args.device
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
        common = ["--device", device, "--dtype", "bf16"]
        moe_args = common + ["--json", "bench_results/gpu_bench_moe.json"]
        moe_args += ["--quick"] if args.quick else ["--repeats", "7", "--min-sample-s", "0.02"]
        bench["moe"] = bench_moe.main(moe_args)
        model_args = common + ["--no-rss", "--json", "bench_results/gpu_bench_model.json"]
        model_args += ["--quick"] if args.quick else ["--batch", "8", "--seq", "512", "--prefill", "2048"]
        bench["model"] = bench_model.main(model_args)

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(ok=ok, checks=checks, machine=bench_moe.machine_info(device), wall_s=time.perf_counter() - start)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\ncorrectness: {'all passed' if ok else 'FAILED'}; wrote {out} ({payload['wall_s']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
