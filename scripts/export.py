"""Export a trained SparseMoE model for serving: the transformers family that holds it exactly (vLLM, SGLang, plain
AutoModelForCausalLM), with tokenizer, chat template and generation config, and optionally a GGUF file (llama.cpp).

    # full model folder -> native family folder (family picked automatically) + f16 GGUF inside it
    python scripts/export.py out/quickstart/pretrain out/serve --gguf
    # LoRA adapter folder, merged into its base on the way, with a Q8_0 GGUF
    python scripts/export.py out/sft-adapter out/serve-sft --base out/quickstart/pretrain --gguf q8_0
    # Q4_K_M needs llama.cpp's quantizer (llama-cpp-python installed, or llama-quantize on PATH)
    python scripts/export.py out/quickstart/translation out/serve-q4 --gguf Q4_K_M

DST is built in a temporary folder next to it and renamed at the end: a failed run leaves no DST behind.
"""

import argparse
import sys

from modeling_sparse_moe.interop.conversion import MOE_FAMILIES
from modeling_sparse_moe.interop.export import GGUF_TYPES, LLAMA_QUANTIZE_TYPES, export_for_serving


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="SparseMoE model folder, or a LoRA adapter folder (with --base)")
    parser.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--to", dest="family", default="auto", choices=("auto", *MOE_FAMILIES),
                        help="target transformers family (default: the first that holds the model exactly)")
    parser.add_argument("--base", help="base SparseMoE folder of an adapter (default: the adapter config's "
                        "base_model_name_or_path)")
    parser.add_argument("--tokenizer", help="folder to take the tokenizer from when SRC has none")
    parser.add_argument("--gguf", metavar="TYPE", nargs="?", const="f16",
                        help=f"also write DST/model-TYPE.gguf for llama.cpp (TYPE defaults to f16): one of "
                        f"{', '.join(GGUF_TYPES)} (written in Python) or {', '.join(LLAMA_QUANTIZE_TYPES)} (through "
                        "llama.cpp's quantizer)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = export_for_serving(
            args.src,
            args.dst,
            family=args.family,
            base=args.base,
            tokenizer=args.tokenizer,
            gguf=args.gguf,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    except Exception as error:  # one clear message; the library already removed any partial output
        print(f"export.py: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {result.folder} ({result.family})" + (f" and {result.gguf}" if result.gguf else ""))
    if result.dropped_generation:
        settings = ", ".join(f"{name}={value}" for name, value in result.dropped_generation.items())
        print(f"generation_config.json leaves out {settings}: vLLM and llama.cpp have no such setting, so the folder "
              f"decodes alike everywhere; pass {settings} to generate() to decode as the recipe scored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
