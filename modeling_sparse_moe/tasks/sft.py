"""Supervised fine-tuning on chat data with TRL's `SFTTrainer` (tested with TRL 1.16.0).

Data: JSON lines `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`; by default offline
chats built from the country-facts QA set (user: a text and a question; assistant: the answer). Tokenizers without
a chat template get `CHAT_TEMPLATE` (with `{% generation %}` marks, so `--assistant_only_loss` trains on the
assistant's words only); it is saved with the model.

    from modeling_sparse_moe.tasks import sft
    result = sft.main(["--config_name", "configs/tiny", "--output_dir", "out/sft", "--do_train", "--do_eval"])
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from datasets import DatasetDict
from transformers import AutoModelForCausalLM

from . import common
from .data import country_qa_dataset
from .peft_utils import lora_config, quantize_for_qlora

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class SFTDataArguments:
    train_file: str | None = field(default=None, metadata={"help": "JSON lines with a `messages` list."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation file, same format."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub chat dataset (online only)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})


def country_chat_dataset() -> DatasetDict:
    """The country QA splits as chats (held-out countries stay held out)."""
    def to_chat(row):
        answer = row["answers"]["text"][0] if row["answers"]["text"] else "The text does not say."
        return {"messages": [
            {"role": "user", "content": f"{row['context']}\n{row['question']}"},
            {"role": "assistant", "content": answer},
        ]}

    qa = country_qa_dataset(with_negatives=True)
    return DatasetDict({s: d.map(to_chat, remove_columns=d.column_names) for s, d in qa.items()})


def validate_chats(ds, where: str) -> None:
    common.require_columns(ds, ["messages"], where)
    for i, messages in enumerate(ds["messages"]):
        if not isinstance(messages, list) or not messages:
            raise common.DataFileError(f"{where}: row {i}: `messages` must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise common.DataFileError(f"{where}: row {i}: each message needs a role (system/user/assistant) "
                                           f"and a string content, got {m!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise common.DataFileError(f"{where}: row {i}: no assistant message to learn from")


def main(argv: list[str] | None = None) -> dict:
    """Run SFT; returns eval loss before and after, output paths and the trained `model` / `tokenizer`."""
    import sys

    import torch
    from trl import SFTConfig, SFTTrainer

    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not any(a.startswith("--bf16") for a in argv):
        # NOTE: TRL's SFTConfig defaults to bf16=True, which TrainingArguments refuses without a GPU.
        argv += ["--bf16", "false"]
    model_args, data_args, lora_args, training_args, last_checkpoint = common.start_recipe(
        SFTDataArguments, SFTConfig, argv
    )
    raw = common.load_raw_datasets(data_args, model_args, country_chat_dataset)
    for split, cap in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if split in raw:
            raw[split] = common.limit(raw[split], cap)
            validate_chats(raw[split], common.source_of(data_args, split))

    def texts():
        return [m["content"] for row in raw["train"]["messages"] for m in row]

    tokenizer = common.load_tokenizer(model_args, texts)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    config = common.load_config(model_args, tokenizer)
    model = common.load_model(AutoModelForCausalLM, model_args, config)
    if lora_args.load_in_4bit:
        model = quantize_for_qlora(model)
    peft_config = lora_config(lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target,
                              "CAUSAL_LM", model) if lora_args.lora_r > 0 else None
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=raw.get("train") if training_args.do_train else None,
        eval_dataset=raw.get("validation") if training_args.do_eval else None, processing_class=tokenizer,
        peft_config=peft_config,
    )
    result: dict = {"output_dir": training_args.output_dir, "parameters": common.count_parameters(trainer.model)}
    if training_args.do_eval:
        result["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        metrics = dict(train_result.metrics, train_samples=len(raw["train"]))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        result.update(metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_loss_before"] = result["eval_loss_before"]
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        result.update(metrics)
    result["all_results_file"] = os.path.join(training_args.output_dir, "all_results.json")
    result["model"], result["tokenizer"] = trainer.model, tokenizer
    return result
