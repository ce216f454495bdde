"""MoE vs dense on the same tokens of a real corpus (the World English Bible), same optimizer, schedule and seed.

    python scripts/compare_dense.py                       # dense 1024 vs 8x512 top-2 vs 32x128 top-8, 600 steps, seed 0
    python scripts/compare_dense.py --seeds 0,1,2         # three seeds (three times as long)
    python scripts/compare_dense.py --variants "dense:num_experts=0,intermediate_size=1024;moe:num_experts=8,num_experts_per_tok=2,moe_intermediate_size=512" --router_lr_scale 2
    python scripts/compare_dense.py --smoke               # tiny shapes, 20 steps (tests)
    python scripts/compare_dense.py --seeds 1 --output_dir out/s1 ...   # a seed per process (and folder), then:
    python scripts/compare_dense.py --merge out/s0,out/s1,out/s2 --output_dir out/merged   # one table of all seeds

Writes results.json, results.md (the table) and loss_curves.png to --output_dir. All logic lives in
`modeling_sparse_moe.recipes.study.run_dense_comparison`.
"""

import logging

from transformers import HfArgumentParser

from modeling_sparse_moe.recipes.study import StudyArguments, run_dense_comparison

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    (study_args,) = HfArgumentParser(StudyArguments).parse_args_into_dataclasses()
    print(run_dense_comparison(study_args)["table"])
