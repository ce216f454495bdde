"""SFT recipe (TRL SFTTrainer, tested with TRL 1.16): chat template on our tokenizer, bad chat files named, loss falls."""

import json

import pytest

from modeling_sparse_moe.recipes.data import train_tokenizer
from modeling_sparse_moe.tasks import sft
from modeling_sparse_moe.tasks.common import DataFileError

COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--per_device_train_batch_size",
          "16", "--per_device_eval_batch_size", "32", "--tokenizer_vocab_size", "400", "--logging_steps", "10",
          "--max_length", "256"]


def test_chat_template_marks_only_assistant_tokens_for_loss():
    tokenizer = train_tokenizer(["What is the capital of Chad? N'Djamena"], vocab_size=300)
    tokenizer.chat_template = sft.CHAT_TEMPLATE
    chat = [{"role": "user", "content": "Capital of Chad?"}, {"role": "assistant", "content": "N'Djamena"}]
    out = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    learned = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "N'Djamena</s>"
    assert tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True).endswith("<|assistant|>\n")


def test_offline_chats_and_bad_files(tmp_path):
    chats = sft.country_chat_dataset()
    first = chats["train"][0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"]
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataFileError, match=r"chats\.jsonl: row 0: no assistant message"):
        sft.main(["--config_name", "configs/tiny", "--train_file", str(bad), "--output_dir", str(tmp_path / "o"),
                  "--do_train", *COMMON])
    bad.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataFileError, match=r"chats\.jsonl: missing column\(s\) \['messages'\]"):
        sft.main(["--config_name", "configs/tiny", "--train_file", str(bad), "--output_dir", str(tmp_path / "o"),
                  "--do_train", *COMMON])


@pytest.mark.slow
def test_smoke_sft_lowers_eval_loss(tmp_path):
    result = sft.main([
        "--config_name", "configs/tiny", "--output_dir", str(tmp_path / "sft"), "--do_train", "--do_eval",
        "--max_train_samples", "32", "--max_eval_samples", "32", "--max_steps", "30", "--learning_rate", "1e-2",
        "--assistant_only_loss", "true", *COMMON,
    ])
    assert result["eval_loss"] < result["eval_loss_before"] - 1.0, result
    assert (tmp_path / "sft" / "tokenizer_config.json").exists()
    saved = json.loads((tmp_path / "sft" / "tokenizer_config.json").read_text())
    assert "generation" in json.dumps(saved) or (tmp_path / "sft" / "chat_template.jinja").exists()
