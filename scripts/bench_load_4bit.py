"""Peak memory of a 4-bit load (`from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True))`) of a sharded bf16
checkpoint: the streaming load (each expert stack packed as the loader sets it) against quantizing after a full
load (what the load did before), each in a fresh subprocess, with the same logits checked.

    python scripts/bench_load_4bit.py            # 1.7 GB bf16 checkpoint (hidden 1024, 8 layers, 32 experts x 1024)
    python scripts/bench_load_4bit.py --smoke    # a few MB, seconds
    python scripts/bench_load_4bit.py --mixtral  # also from a native Mixtral checkpoint: convert_folder, then load

Memory is read from /proc/self/status in the loading process: VmHWM (peak resident set, reset after the imports
through /proc/self/clear_refs) and RssAnon sampled every 2 ms (anonymous memory: what the process allocated, without
the checkpoint's file pages that safetensors maps and the kernel can drop). Growth is measured from the resident set
after the imports. The target is growth <= 1.5 x the 4-bit footprint + the largest shard. Prints a table and writes
JSON (default bench_results/bench_load_4bit.json).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: argv = mode, checkpoint folder, output prefix, scratch folder.
MEASURE = r"""
import json, sys, threading, time
import torch
import modeling_sparse_moe  # first: it quiets bitsandbytes' offline kernel-fetch warning (quantization.py)
import bitsandbytes.functional as BF
from modeling_sparse_moe.interop.conversion import convert_folder, from_hf
from modeling_sparse_moe.quantization import quantize_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

mode, folder, out, scratch, shard = sys.argv[1:6]
KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in KEYS:
                fields[key] = int(value.split()[0]) * 1024
    return fields

BF.quantize_4bit(torch.randn(64, 64))  # bitsandbytes' lazy set-up, not part of the load
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
start = status()
peak = {"RssAnon": start["RssAnon"], "RssFile": start["RssFile"]}
running = True

def sample():
    while running:
        now = status()
        for key in peak:
            peak[key] = max(peak[key], now[key])
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
t0 = time.perf_counter()
if mode == "stream":
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
elif mode == "after_full_load":
    model = quantize_model(AutoModelForCausalLM.from_pretrained(folder), config)
elif mode == "mixtral_convert_folder":
    convert_folder(folder, scratch, max_shard_size=shard)  # streams tensor by tensor, holds one shard to write
    model = AutoModelForCausalLM.from_pretrained(scratch, quantization_config=config)
elif mode == "mixtral_from_hf":
    model = quantize_model(from_hf(folder), config)
else:
    raise SystemExit(f"unknown mode {mode}")
seconds = time.perf_counter() - t0
running = False
sampler.join()
end = status()
input_ids = torch.arange(3, 35).reshape(2, 16)
with torch.no_grad():
    torch.save(model(input_ids).logits, out + ".pt")
result = {
    "mode": mode, "seconds": seconds, "footprint_bytes": model.get_memory_footprint(),
    "peak_growth_bytes": end["VmHWM"] - start["VmRSS"],
    "peak_anon_growth_bytes": peak["RssAnon"] - start["RssAnon"],
    "peak_file_growth_bytes": peak["RssFile"] - start["RssFile"],
    "expert_quantization": model.config.expert_quantization["modules"][:1],
}
with open(out + ".json", "w") as f:
    json.dump(result, f)
"""


def model_config(args):
    from modeling_sparse_moe import SparseMoEConfig

    return SparseMoEConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, intermediate_size=args.ffn, moe_intermediate_size=args.ffn, num_experts=args.experts,
        num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.02,
    )


def build_checkpoint(args, folder: Path) -> None:
    import torch

    from modeling_sparse_moe import SparseMoEForCausalLM

    torch.manual_seed(0)
    model = SparseMoEForCausalLM._from_config(model_config(args), dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=args.max_shard_size)
    del model


def build_mixtral(folder: Path, mixtral: Path, max_shard_size: str) -> None:
    from modeling_sparse_moe.interop.conversion import convert_folder

    convert_folder(folder, mixtral, to="mixtral", max_shard_size=max_shard_size)


def shard_sizes(folder: Path) -> list[int]:
    return [p.stat().st_size for p in folder.glob("*.safetensors")]


def measure(mode: str, folder: Path, work: Path, max_shard_size: str) -> dict:
    out = work / mode
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    subprocess.run(
        [sys.executable, "-c", MEASURE, mode, str(folder), str(out), str(work / f"{mode}_converted"), max_shard_size],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )
    return json.loads(out.with_suffix(".json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=1024, help="moe_intermediate_size (and the dense width)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--max_shard_size", default="256MB")
    parser.add_argument("--smoke", action="store_true", help="hidden 128, 2 layers, 8 experts x 128, 1MB shards")
    parser.add_argument("--mixtral", action="store_true", help="also load from a native Mixtral checkpoint")
    parser.add_argument("--skip_old", action="store_true", help="measure the streaming load only")
    parser.add_argument("--output", default="bench_results/bench_load_4bit.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.experts, args.ffn, args.vocab, args.max_shard_size = 128, 2, 8, 128, 256, "1MB"

    import torch

    results = {"args": vars(args), "torch": torch.__version__, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "bf16"
        t0 = time.perf_counter()
        build_checkpoint(args, folder)
        shards = shard_sizes(folder)
        results.update(checkpoint_bytes=sum(shards), largest_shard_bytes=max(shards), shards=len(shards),
                       build_seconds=time.perf_counter() - t0)
        modes = [("stream", folder)] + ([] if args.skip_old else [("after_full_load", folder)])
        if args.mixtral:
            build_mixtral(folder, work / "mixtral", args.max_shard_size)
            modes += [("mixtral_convert_folder", work / "mixtral"), ("mixtral_from_hf", work / "mixtral")]
        for mode, source in modes:
            results["runs"][mode] = measure(mode, source, work, args.max_shard_size)
        reference = torch.load(work / "stream.pt")
        for mode in results["runs"]:
            other = torch.load(work / f"{mode}.pt")
            results["runs"][mode]["max_abs_logit_diff_vs_stream"] = (other - reference).abs().max().item()

    gib = 2**30
    footprint = results["runs"]["stream"]["footprint_bytes"]
    budget = 1.5 * footprint + results["largest_shard_bytes"]
    results["budget_bytes"] = budget
    print(f"checkpoint {results['checkpoint_bytes'] / gib:.2f} GiB bf16 in {results['shards']} shards (largest "
          f"{results['largest_shard_bytes'] / gib:.3f} GiB); 4-bit footprint {footprint / gib:.3f} GiB; budget "
          f"1.5 x footprint + largest shard = {budget / gib:.3f} GiB")
    print(f"{'load':<24}{'seconds':>9}{'peak growth':>13}{'/budget':>9}{'/footprint':>12}{'anon growth':>13}"
          f"{'/budget':>9}{'max|dlogit|':>13}")
    for mode, run in results["runs"].items():
        growth, anon = run["peak_growth_bytes"], run["peak_anon_growth_bytes"]
        print(f"{mode:<24}{run['seconds']:>9.1f}{growth / gib:>12.3f}G{growth / budget:>9.2f}"
              f"{growth / footprint:>12.2f}{anon / gib:>12.3f}G{anon / budget:>9.2f}"
              f"{run['max_abs_logit_diff_vs_stream']:>13.3g}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
