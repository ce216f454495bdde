"""Fine-tune SparseMoE for sentiment / text classification, with run_classification's flags and data format.

Offline default data: VADER's human-rated sentiment lexicon (positive vs negative words and phrases).

    python scripts/finetune_classification.py --config_name configs/tiny --output_dir out/sentiment \
        --do_train --do_eval --max_steps 300 --learning_rate 3e-3 --per_device_train_batch_size 32
    # your CSV/JSON with `sentence` (or `text`) and `label` columns, or IMDB when online
    python scripts/finetune_classification.py --model_name_or_path out/pretrained --train_file train.csv \
        --validation_file dev.csv --output_dir out/cls --do_train --do_eval
    python scripts/finetune_classification.py --model_name_or_path out/pretrained --dataset_name imdb \
        --max_train_samples 2000 --max_eval_samples 500 --output_dir out/imdb --do_train --do_eval
"""

from modeling_sparse_moe.tasks.classification import main

if __name__ == "__main__":
    main()
