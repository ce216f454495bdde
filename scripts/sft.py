"""Supervised fine-tuning on chat JSON lines ({"messages": [...]}) with TRL's SFTTrainer (tested with TRL 1.16.0).

Offline default data: chats built from the country-facts QA set. On CPU, --bf16 false is added for you.

    python scripts/sft.py --config_name configs/tiny --output_dir out/sft --do_train --do_eval \
        --max_steps 200 --learning_rate 3e-3 --per_device_train_batch_size 16 --assistant_only_loss true
    python scripts/sft.py --model_name_or_path out/pretrained --train_file chats.jsonl --lora_r 8 \
        --output_dir out/sft-lora --do_train
"""

from modeling_sparse_moe.tasks.sft import main

if __name__ == "__main__":
    main()
