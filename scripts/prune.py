"""Prune (or merge) the experts of a saved SparseMoE model: fewer experts per layer, an ordinary model folder after.

    # REAP with generic calibration text (the Python docs CPython ships, offline), 8 -> 6 experts per layer
    python scripts/prune.py out/pretrain out/pruned6 --num_experts 6 --criterion reap --calibration generic
    # other sources: --calibration bible (the pretraining corpus' training split), --calibration_file my.txt,
    # --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1
    python scripts/prune.py out/pretrain out/merged6 --num_experts 6 --method merge --calibration generic
    python scripts/prune.py out/pretrain out/random6 --num_experts 6 --criterion random     # no calibration needed

The result saves like the source (tokenizer copied, remote code when the source had it), reloads with
from_pretrained, quantizes to 4-bit and exports with scripts/export.py like any SparseMoE folder. Criteria and the
slicing are documented in modeling_sparse_moe/compression/pruning.py; figures in docs/compression.md.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_sparse_moe.compression.calibration import CORPORA  # noqa: E402
from modeling_sparse_moe.compression.pruning import CRITERIA  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a saved SparseMoE model folder (full precision)")
    parser.add_argument("dst", help="where to save the pruned model")
    parser.add_argument("--num_experts", type=int, required=True, help="experts to keep in every MoE layer")
    parser.add_argument("--method", choices=("prune", "merge"), default="prune",
                        help="prune: drop the lowest-scoring experts; merge: fold the least-used into neighbours")
    parser.add_argument("--criterion", choices=CRITERIA, default="reap", help="expert score for --method prune")
    parser.add_argument("--calibration", choices=CORPORA, help="an offline calibration corpus by name")
    parser.add_argument("--calibration_file", help=".txt (one text per line), .json/.jsonl or .csv with a text column")
    parser.add_argument("--dataset_name", help="a data set for datasets.load_dataset")
    parser.add_argument("--dataset_config_name", help="its configuration name")
    parser.add_argument("--dataset_split", default="train", help="its split")
    parser.add_argument("--text_column_name", default="text", help="the column holding the text")
    parser.add_argument("--block_size", type=int, default=128, help="tokens per calibration block")
    parser.add_argument("--calibration_tokens", type=int, default=16384, help="calibration tokens to use at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of --criterion random")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from modeling_sparse_moe.compression.pruning import prune_from_folder

    try:
        summary = prune_from_folder(
            args.src, args.dst, args.num_experts, method=args.method, criterion=args.criterion,
            calibration=args.calibration, calibration_file=args.calibration_file, dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name, dataset_split=args.dataset_split,
            text_column=args.text_column_name, block_size=args.block_size, max_tokens=args.calibration_tokens,
            seed=args.seed,
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
