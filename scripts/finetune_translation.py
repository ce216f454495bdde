"""Fine-tune SparseMoE for translation (decoder-only prompt format), with run_translation's flags and data format.

Offline default data: verse-aligned public-domain Bibles, EN->FR (World English Bible -> Louis Segond 1910).

    # from scratch (tokenizer trained on the training texts), demo size (~10 min on 2 cores)
    python scripts/finetune_translation.py --config_name configs/tiny --output_dir out/translation \
        --do_train --do_eval --do_predict --predict_with_generate --max_train_samples 4000 \
        --max_eval_samples 100 --max_predict_samples 100 --max_steps 300 --learning_rate 3e-3
    # your files, a pretrained model, LoRA on attention + router + experts
    python scripts/finetune_translation.py --model_name_or_path out/pretrained --train_file train.jsonl \
        --validation_file dev.jsonl --source_lang en --target_lang de --lora_r 8 --output_dir out/mt-lora \
        --do_train --do_eval --predict_with_generate --num_beams 4
"""

from modeling_sparse_moe.tasks.translation import main

if __name__ == "__main__":
    main()
