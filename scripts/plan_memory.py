"""Memory planner: weights with bf16 / int8 / NF4 experts, the QLoRA training footprint, and which GPUs hold them,
for any model config, computed from the model's own tensor shapes on the meta device (no weights, no GPU).

    python scripts/plan_memory.py mixtral-8x7b olmoe-1b-7b qwen3-30b-a3b     # shipped configs, by name
    python scripts/plan_memory.py path/to/Mixtral-8x7B-v0.1/config.json     # Hub config.json: Mixtral, Qwen-MoE, OLMoE
    python scripts/plan_memory.py demo --lora_r 64 --lora_target attention,experts --per_device_train_batch_size 4 \
        --block_size 1024 --double_quant --json plan.json
    python scripts/plan_memory.py mixtral-8x7b --pruned_experts 6,4      # adds rows for 6 and 4 experts per layer

Layouts, the QLoRA terms and the activation formula are documented in modeling_sparse_moe/compression/memory_planner.py and
docs/quantization-int8-and-planning.md. Prints one table per config; `--json` writes every figure in bytes.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_sparse_moe.compression.memory_planner import GPU_SIZES, LORA_TARGETS, plan_memory  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="shipped config names, folders or config.json paths")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora_target", default="attention,experts",
                        help=f"comma-separated LoRA targets among {', '.join(LORA_TARGETS)}")
    parser.add_argument("--per_device_train_batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=2048, help="training sequence length")
    parser.add_argument("--double_quant", action="store_true", help="NF4 with double-quantized absmax")
    parser.add_argument("--overhead_gib", type=float, default=1.0, help="CUDA context and allocator allowance")
    parser.add_argument("--no_upcast", action="store_true",
                        help="do not count prepare_model_for_kbit_training's fp32 copies of non-4-bit weights")
    parser.add_argument("--gpus", default=",".join(str(s) for s in GPU_SIZES), help="GPU sizes in GB (GiB)")
    parser.add_argument("--pruned_experts", default="",
                        help="comma-separated expert counts: add weight rows for the model pruned to each (e.g. 6,4)")
    parser.add_argument("--json", help="write every figure (bytes) to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        gpus = tuple(int(s) for s in args.gpus.split(",") if s)
        targets = tuple(t for t in args.lora_target.split(",") if t)
        plans = [
            plan_memory(spec, double_quant=args.double_quant, rank=args.lora_r, targets=targets,
                        batch_size=args.per_device_train_batch_size, seq_len=args.block_size,
                        overhead_gib=args.overhead_gib, upcast=not args.no_upcast, gpu_sizes_gib=gpus,
                        pruned_experts=tuple(int(s) for s in args.pruned_experts.split(",") if s))
            for spec in args.configs
        ]
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for plan in plans:
        print(plan.table() + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([p.to_dict() for p in plans], indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
