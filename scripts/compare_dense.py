"""MoE vs dense on the same tokens of a real corpus (the World English Bible, or six Bibles), same optimizer, schedule
and seed.

    python scripts/compare_dense.py                       # dense 1024 vs 8x512 top-2 vs 32x128 top-8, 600 steps, seed 0
    python scripts/compare_dense.py --seeds 0,1,2         # three seeds (three times as long)
    python scripts/compare_dense.py --variants "dense:num_experts=0,intermediate_size=1024;moe:num_experts=8,num_experts_per_tok=2,moe_intermediate_size=512" --router_lr_scale 2
    python scripts/compare_dense.py --smoke               # tiny shapes, 20 steps (tests)
    python scripts/compare_dense.py --seeds 1 --output_dir out/s1 ...   # a seed per process (and folder), then:
    python scripts/compare_dense.py --merge out/s0,out/s1,out/s2 --output_dir out/merged   # one table of all seeds

    # the multilingual study (six Bibles, shared init and order, final = mean of the last evaluations on all held-out
    # blocks): one seed per process, then --merge; --arms main|experts|fine|balance; --lr_sweep 1e-3,2e-3,4e-3
    python scripts/compare_dense.py --dataset_name bible-multilingual --languages en,fr,de,es,it,pt --arms main \
        --steps 3000 --learning_rate 2e-3 --eval_every 250 --final_eval_blocks 1600 --seeds 0 --threads 1 \
        --output_dir out/m0

Writes results.json, results.md (the table), loss_curves.png (and language_experts.png, loss_vs_experts.png where they
apply) to --output_dir. All logic lives in
`modeling_sparse_moe.recipes.study.run_dense_comparison`.
"""

import logging

from transformers import HfArgumentParser

from modeling_sparse_moe.recipes.study import StudyArguments, run_dense_comparison

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    (study_args,) = HfArgumentParser(StudyArguments).parse_args_into_dataclasses()
    print(run_dense_comparison(study_args)["table"])
