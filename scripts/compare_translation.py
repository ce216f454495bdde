"""MoE vs dense translation study at equal active parameters over several seeds (picks the recipe's default shape).

    python scripts/compare_translation.py --output_dir out/translation_study --seeds 0 1 2 --max_steps 300

Writes out/translation_study/study.json after every run (rerun the same command to resume) and prints a table.
Seeds can run as separate processes into separate folders; `--merge DIR ...` prints the table of all of them.
"""

import argparse
import logging

from modeling_sparse_moe.tasks.translation_study import SHAPES, merge, run_study, table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="out/translation_study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--train_samples", type=int, default=4000)
    parser.add_argument("--eval_samples", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--merge", nargs="+", default=None, help="Only print the table of these study folders.")
    args = parser.parse_args()
    if args.merge:
        print(table(merge(args.merge)))
        raise SystemExit(0)
    logging.basicConfig(level=logging.INFO)
    study = run_study(args.output_dir, args.seeds, args.shapes, args.max_steps, args.train_samples,
                      args.eval_samples, learning_rate=args.learning_rate)
    print(table(study))
