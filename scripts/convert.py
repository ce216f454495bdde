"""Convert checkpoints between SparseMoE and transformers' MoE families, or upcycle a dense model.

    # Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE folder -> SparseMoE folder (family detected from config.json)
    python scripts/convert.py --from auto path/to/Mixtral-8x7B out/sparse-mixtral
    # SparseMoE folder -> folder of a transformers family (plain AutoModelForCausalLM, vLLM, SGLang, llama.cpp)
    python scripts/convert.py --to mixtral out/sparse-mixtral out/mixtral-again
    # dense Llama / Mistral / Qwen2 / Qwen3 folder -> SparseMoE folder (sparse upcycling)
    python scripts/convert.py --upcycle --num-experts 8 --top-k 2 path/to/Llama-3.2-1B out/llama-8x1b

Weights are streamed tensor by tensor from safetensors shards and written as sharded safetensors. DST is built in a
temporary folder next to it and renamed at the end: a failed run leaves no DST behind.
"""

import argparse
import sys

from modeling_sparse_moe.interop.conversion import MOE_FAMILIES, convert_folder, upcycle_folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from", dest="from_family", choices=("auto", *MOE_FAMILIES), help="convert SRC to SparseMoE")
    mode.add_argument("--to", dest="to_family", choices=MOE_FAMILIES, help="convert a SparseMoE SRC to this family")
    mode.add_argument("--upcycle", action="store_true", help="upcycle a dense llama/mistral/qwen2/qwen3 SRC")
    parser.add_argument("--num-experts", type=int, help="--upcycle: routed experts per MoE layer")
    parser.add_argument("--top-k", type=int, help="--upcycle: experts per token")
    parser.add_argument("--noise-std", type=float, default=0.0, help="--upcycle: relative noise on expert copies")
    parser.add_argument("--seed", type=int, default=0, help="--upcycle: seed of router init and noise")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("src", help="source checkpoint folder (safetensors)")
    parser.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    args = parser.parse_args(argv)
    if args.upcycle and (args.num_experts is None or args.top_k is None):
        parser.error("--upcycle needs --num-experts and --top-k")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.upcycle:
            upcycle_folder(
                args.src,
                args.dst,
                args.num_experts,
                args.top_k,
                noise_std=args.noise_std,
                seed=args.seed,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
            )
        elif args.to_family is not None:
            convert_folder(
                args.src, args.dst, to=args.to_family, max_shard_size=args.max_shard_size, overwrite=args.overwrite
            )
        else:
            convert_folder(
                args.src,
                args.dst,
                source_family=args.from_family,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
            )
    except Exception as error:  # a clear one-line message; the library already removed any partial output
        print(f"convert.py: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
