"""Scaling out on GPUs (docs/scaling.md): every engine with 2 GPUs against one GPU holding the whole batch.

    python scripts/gpu_distributed_check.py                               # >= 2 CUDA GPUs: every engine below
    python scripts/gpu_distributed_check.py --engines torchrun fsdp2      # a subset
    python scripts/gpu_distributed_check.py --device cpu --engines torchrun   # dry run of the same code (gloo, CPU)

Engines (each launches tests/dist_worker.py on 2 processes; NCCL on GPUs):
    torchrun  torchrun + Trainer (DDP) with average_tokens_across_devices on/off and with accumulation;
              DistributedConfig FSDP2 + Trainer; tensor parallel and expert parallel (all_to_all) logits
    ddp       accelerate launch --config_file configs/accelerate/ddp.yaml
    fsdp2     accelerate launch --config_file configs/accelerate/fsdp2.yaml   (accelerate's FSDP2: GPU only)
    zero2     accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml   (needs deepspeed)
    zero3     accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml   (needs deepspeed)

Prints one line per check and writes bench_results/gpu_distributed_check.json. Exit status 1 when a check fails, 0
when all pass (or, without 2 GPUs and without --device cpu, after saying so).
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import dist_worker as W  # noqa: E402

from modeling_sparse_moe import SparseMoEForCausalLM  # noqa: E402

ACCELERATE_CONFIGS = {
    "ddp": "ddp.yaml",
    "fsdp2": "fsdp2.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
}
# fp32 on GPUs: other kernels and reduction orders than CPU; a rank-local router loss is off by > 1e-3.
LOSS_ATOL, WEIGHT_ATOL, LOGITS_ATOL = 1e-4, 1e-4, 1e-4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine: str, workdir: Path, scenarios: list[str]) -> tuple[int, str]:
    worker = [str(ROOT / "tests" / "dist_worker.py"), str(workdir), *scenarios]
    port = str(free_port())
    if engine == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        config = str(ROOT / "configs" / "accelerate" / ACCELERATE_CONFIGS[engine])
        # fp32 to compare with the fp32 reference (the configs train in bf16). On a machine without CUDA accelerate
        # runs these configs as DDP on CPU (its FSDP and DeepSpeed need GPUs): the CPU dry run checks the plumbing.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                   "--main_process_port", port, "--mixed_precision", "no"]
    done = subprocess.run(command + worker, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return done.returncode, done.stderr[-4000:]


def load(workdir: Path, scenario: str) -> list[dict]:
    return [torch.load(workdir / "out" / f"{scenario}.rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def check_training(workdir: Path, scenario: str, reference: dict) -> dict:
    ranks = load(workdir, scenario)
    if any("error" in r for r in ranks):
        return {"ok": False, "error": next(r["error"] for r in ranks if "error" in r)[-2000:]}
    trace = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    loss_dev = max(abs(a - b) for a, b in zip(trace, reference["losses"]))
    biases_equal = all(torch.equal(r["biases"][k], v) for r in ranks for k, v in reference["biases"].items())
    reloaded = SparseMoEForCausalLM.from_pretrained(workdir / "out" / f"{scenario}-model")
    state = reloaded.state_dict()
    weight_dev = max((state[k].float() - v.float().cpu()).abs().max().item() for k, v in reference["state"].items())
    with torch.no_grad():
        logits = reloaded.eval()(W.family_batch(123)).logits
    reload_dev = (logits - ranks[0]["logits"]).abs().max().item()
    ok = len(trace) == len(reference["losses"]) and loss_dev <= LOSS_ATOL and biases_equal
    ok = ok and weight_dev <= WEIGHT_ATOL and reload_dev <= LOGITS_ATOL
    return {"ok": ok, "engine": ranks[0].get("engine"), "loss_dev": loss_dev, "biases_equal": biases_equal,
            "weight_dev": weight_dev, "reload_logits_dev": reload_dev}


def check_logits(workdir: Path, scenario: str) -> dict:
    """TP: every rank's logits of the same batch; EP: each rank's logits of its own batch, vs one process (CPU)."""
    ranks = load(workdir, scenario)
    if any("error" in r for r in ranks):
        return {"ok": False, "error": next(r["error"] for r in ranks if "error" in r)[-2000:]}
    figures = {}
    for family in W.FAMILIES:
        model = SparseMoEForCausalLM.from_pretrained(workdir / "ckpt" / family)
        worst = 0.0
        for rank, result in enumerate(ranks):
            ids = W.family_batch(1 if scenario == "tp" else 10 + rank)
            with torch.no_grad():
                for mode, logits in (("train", model.train()(ids).logits), ("eval", model.eval()(ids).logits)):
                    worst = max(worst, (result[f"{family}/{mode}"] - logits).abs().max().item())
        figures[family] = worst
    return {"ok": all(v <= LOGITS_ATOL for v in figures.values()), "logits_dev": figures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["torchrun", *ACCELERATE_CONFIGS])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--output", default="bench_results/gpu_distributed_check.json")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print("gpu_distributed_check: needs 2 CUDA GPUs (or --device cpu for a dry run); nothing run.")
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        W.write_checkpoints(workdir)
        references = {}
        for grad_accum in (1, 2):  # one device (cuda:0 or CPU), the whole batch
            torch.manual_seed(0)
            model = SparseMoEForCausalLM.from_pretrained(workdir / "ckpt" / "train")
            run = W.run_trainer(model, workdir / f"single-{grad_accum}", 4 // grad_accum, grad_accum=grad_accum)
            run["state"] = {k: v.detach().cpu() for k, v in run.pop("trainer").model.state_dict().items()}
            references[grad_accum] = run
        for engine in args.engines:
            if engine in ("zero2", "zero3"):
                try:
                    import deepspeed  # noqa: F401
                except ImportError:
                    results[engine] = {"ok": None, "skipped": "deepspeed is not installed"}
                    continue
            scenarios = list(W.SCENARIOS) if engine == "torchrun" else ["ddp"]
            returncode, stderr = launch(engine, workdir, scenarios)
            if returncode != 0:
                results[engine] = {"ok": False, "error": stderr}
                continue
            for scenario in scenarios:
                if scenario in ("tp", "ep"):
                    result = check_logits(workdir, scenario)
                else:
                    result = check_training(workdir, scenario, references[2 if scenario == "ddp_accum" else 1])
                results[f"{engine}/{scenario}"] = result
            (workdir / "out").rename(workdir / f"out-{engine}")  # the next engine writes afresh
    for name, result in results.items():
        status = {True: "ok  ", False: "FAIL", None: "skip"}[result["ok"]]
        print(f"{status} {name:22s} " + json.dumps({k: v for k, v in result.items() if k != "ok"})[:400])
    output = ROOT / args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"device": args.device, "results": results}, indent=2, default=str))
    return 1 if any(result["ok"] is False for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
