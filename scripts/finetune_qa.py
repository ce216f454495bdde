"""Fine-tune SparseMoE for question answering, with run_qa's flags and SQuAD data format.

Extractive (SparseMoEForQuestionAnswering: doc stride, n-best spans) by default, generative with --generative.
Offline default data: questions on country facts, validation/test countries held out of training.

    # demo size, from scratch: extractive, then generative, on held-out countries
    python scripts/finetune_qa.py --config_name configs/tiny --output_dir out/qa --do_train --do_eval \
        --max_steps 300 --learning_rate 3e-3 --per_device_train_batch_size 16
    python scripts/finetune_qa.py --config_name configs/tiny --output_dir out/qa-gen --generative --do_train \
        --do_eval --max_steps 300 --learning_rate 3e-3 --per_device_train_batch_size 16
    # SQuAD v2 files with a pretrained model
    python scripts/finetune_qa.py --model_name_or_path out/pretrained --train_file train-v2.0.json \
        --validation_file dev-v2.0.json --version_2_with_negative --max_seq_length 384 --doc_stride 128 \
        --output_dir out/squad2 --do_train --do_eval
"""

from modeling_sparse_moe.tasks.qa import main

if __name__ == "__main__":
    main()
