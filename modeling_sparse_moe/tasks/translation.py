"""Translation fine-tuning of the decoder-only SparseMoE, with run_translation's data format and flags.

Data: JSON lines `{"translation": {"en": "...", "fr": "..."}}` chosen with `--source_lang/--target_lang`, a Hub
dataset (`--dataset_name wmt16 --dataset_config_name ro-en`), or by default the offline public-domain Bible pair
(`tasks.data.bible_translation_dataset`). Prompt: `[bos] {source_prefix}{source}{separator}` and the target + EOS,
with the loss on target tokens only. Full fine-tuning, or LoRA with `--lora_r` (attention, router and 3D experts).
BLEU and chrF (sacrebleu) from batched left-padded `generate()` before and after training, with
`--predict_with_generate` as in run_translation; decoding from `--num_beams` / `--generation_num_beams`,
`--val_max_target_length` / `--generation_max_length`, `--no_repeat_ngram_size`, `--repetition_penalty` and
`--generation_config` (saved with the fine-tuned model, so `generate()` on it decodes as it was scored). The
example translations come from different chapters of the evaluation set.

    from modeling_sparse_moe.tasks import translation
    result = translation.main(["--config_name", "configs/tiny", "--output_dir", "out/mt", "--do_train", "--do_eval",
                               "--predict_with_generate", "--max_train_samples", "2000", "--max_steps", "300"])
    result["eval_bleu_before"], result["eval_bleu"], result["examples"]
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, Seq2SeqTrainingArguments

from ..recipes.training import CausalLMTrainer, RouterBiasUpdateCallback
from . import common
from .data import bible_translation_dataset, country_name_pairs, texts_of
from .generation import (
    CompletionCollator,
    GenerationArguments,
    describe_generation,
    encode_pair,
    generate_completions,
    generation_config_from_args,
)
from .metrics import bleu_chrf
from .peft_utils import adapter_report, apply_lora

logger = logging.getLogger(__name__)


@dataclass
class TranslationDataArguments(GenerationArguments):
    """run_translation's data flags, plus the offline corpus, the prompt separator and the repetition controls of
    generation (`GenerationArguments`)."""

    source_lang: str = field(default="en", metadata={"help": "Source language code, a key of `translation`."})
    target_lang: str = field(default="fr", metadata={"help": "Target language code, a key of `translation`."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (online only), e.g. wmt16."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. ro-en."})
    train_file: str | None = field(default=None, metadata={"help": "JSON lines with a `translation` dict."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation file, same format."})
    test_file: str | None = field(default=None, metadata={"help": "Prediction file, same format."})
    offline_corpus: str = field(
        default="bible", metadata={"help": "Without files or dataset: 'bible' (verse pairs) or 'country_names'."}
    )
    max_corpus_chars: int = field(default=160, metadata={"help": "Bible verses longer than this are left out."})
    source_prefix: str = field(default="", metadata={"help": "Text put before every source (T5-style task prefix)."})
    separator: str = field(default=" =>", metadata={"help": "Text between source and target in the prompt."})
    max_source_length: int = field(default=128, metadata={"help": "Source tokens kept (truncated from the start)."})
    max_target_length: int = field(default=128, metadata={"help": "Target tokens kept for training."})
    val_max_target_length: int | None = field(
        default=None, metadata={"help": "Max new tokens at generation; defaults to max_target_length."}
    )
    num_beams: int | None = field(default=None, metadata={"help": "Beams for generation (1 = greedy)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})
    generation_batch_size: int = field(default=16, metadata={"help": "Rows per generate() call."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})
    num_examples: int = field(default=3, metadata={"help": "Example translations returned and logged."})


def offline_translation_dataset(data_args):
    if data_args.offline_corpus == "bible":
        return bible_translation_dataset(data_args.source_lang, data_args.target_lang, data_args.max_corpus_chars)
    if data_args.offline_corpus == "country_names":
        from datasets import DatasetDict

        pairs = country_name_pairs(data_args.source_lang, data_args.target_lang)
        return DatasetDict({"train": pairs, "validation": pairs, "test": pairs})
    raise ValueError(f"--offline_corpus must be 'bible' or 'country_names', not {data_args.offline_corpus!r}")


def validate_translation_split(ds, source_lang: str, target_lang: str, where: str) -> None:
    """Every row has a `translation` dict holding non-empty strings for both languages; errors name the file."""
    common.require_columns(ds, ["translation"], where)
    for i, row in enumerate(ds["translation"]):
        if not isinstance(row, dict):
            raise common.DataFileError(f"{where}: row {i}: `translation` must be a dict keyed by language code")
        for lang in (source_lang, target_lang):
            if row.get(lang) is None:
                found = sorted(k for k, v in row.items() if v is not None)
                raise common.DataFileError(
                    f"{where}: row {i}: no {lang!r} text in `translation` (language codes found: {found}); "
                    "check --source_lang/--target_lang"
                )


def prompts_and_references(ds, data_args) -> tuple[list[str], list[str], list[str]]:
    src, tgt = data_args.source_lang, data_args.target_lang
    sources = [row[src] for row in ds["translation"]]
    return (
        [f"{data_args.source_prefix}{s}{data_args.separator}" for s in sources],
        [row[tgt] for row in ds["translation"]],
        sources,
    )


def translate_and_score(model, tokenizer, ds, data_args, generation_config, desc: str) -> tuple[dict, list[str]]:
    prompts, references, _ = prompts_and_references(ds, data_args)
    hypotheses = generate_completions(
        model, tokenizer, prompts, data_args.max_source_length, generation_config, data_args.generation_batch_size,
        desc,
    )
    return bleu_chrf(hypotheses, references), hypotheses


def example_group(row: dict, index: int):
    """What examples should differ in: the chapter of an `id` like '43:3:16' (book:chapter:verse), else the row."""
    row_id = row.get("id")
    return row_id.rsplit(":", 1)[0] if isinstance(row_id, str) and row_id.count(":") == 2 else index


def pick_translation_examples(ds, n: int) -> list[int]:
    """Rows of `ds` to show: `n` from different chapters spread over the set (`common.pick_examples`)."""
    return common.pick_examples([example_group(row, i) for i, row in enumerate(ds)], n)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the metrics (before/after BLEU and chrF when generating), example translations,
    output paths, and the trained `model` and `tokenizer` objects. `argv` as on the command line (None: sys.argv)."""
    model_args, data_args, lora_args, training_args, last_checkpoint = common.start_recipe(
        TranslationDataArguments, Seq2SeqTrainingArguments, argv
    )

    raw = common.load_raw_datasets(data_args, model_args, lambda: offline_translation_dataset(data_args))
    splits = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    for split, needed in splits.items():
        if needed and split not in raw:
            raise ValueError(f"--do_{ {'train': 'train', 'validation': 'eval', 'test': 'predict'}[split]} needs a {split} split: pass --{split}_file")
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples, "test": data_args.max_predict_samples}
    for split in list(raw):
        if split in caps:
            raw[split] = common.limit(raw[split], caps[split])
            validate_translation_split(raw[split], data_args.source_lang, data_args.target_lang, common.source_of(data_args, split))

    tokenizer = common.load_tokenizer(
        model_args, lambda: texts_of(raw["train"] if "train" in raw else next(iter(raw.values())), ["translation"])
    )
    config = common.load_config(model_args, tokenizer)
    model = common.load_model(AutoModelForCausalLM, model_args, config)
    base_params = sum(p.numel() for p in model.parameters())
    model = apply_lora(model, lora_args, task_type="CAUSAL_LM")
    params = common.count_parameters(model)
    logger.info("parameters: %d trainable of %d", params["trainable"], params["total"])

    def encode(batch):
        prompts = [f"{data_args.source_prefix}{t[data_args.source_lang]}{data_args.separator}" for t in batch["translation"]]
        targets = [" " + t[data_args.target_lang] for t in batch["translation"]]
        rows = [encode_pair(tokenizer, p, t, data_args.max_source_length, data_args.max_target_length) for p, t in zip(prompts, targets)]
        return {k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels")}

    tokenized = {}
    with training_args.main_process_first(desc="tokenize"):
        for split in ("train", "validation"):
            if split in raw and (split == "train" and training_args.do_train or split == "validation" and training_args.do_eval):
                tokenized[split] = raw[split].map(
                    encode, batched=True, remove_columns=raw[split].column_names,
                    num_proc=data_args.preprocessing_num_workers, desc=f"Tokenizing {split}",
                )

    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    trainer = CausalLMTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"),
        data_collator=CompletionCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[RouterBiasUpdateCallback()],
    )

    generation_config = generation_config_from_args(
        model, training_args, data_args, data_args.num_beams, data_args.val_max_target_length,
        default_max_new_tokens=data_args.max_target_length,
    )
    generate = training_args.predict_with_generate
    result: dict = {"parameters": params, "output_dir": training_args.output_dir,
                    "generation": describe_generation(generation_config)}
    if generate:
        logger.info("decoding: %s", result["generation"])
    # Saved with the model: generate() on the fine-tuned folder decodes as it was scored.
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    unwrapped.generation_config = generation_config

    if training_args.do_eval and generate and training_args.do_train:  # without training, "after" is the same model
        scores, _ = translate_and_score(model, tokenizer, raw["validation"], data_args, generation_config, "eval before")
        result.update({f"eval_{k}_before": v for k, v in scores.items()})
        logger.info("before training: %s", scores)

    if training_args.do_train:
        start = time.perf_counter()
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        metrics = dict(train_result.metrics, train_samples=len(tokenized["train"]), train_wall_s=time.perf_counter() - start)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        result.update(metrics)
        if lora_args.lora_r > 0:
            result["adapter"] = adapter_report(model, training_args.output_dir, base_params)

    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_samples"] = len(tokenized["validation"])
        if generate:
            scores, hyps = translate_and_score(model, tokenizer, raw["validation"], data_args, generation_config, "eval")
            metrics.update({f"eval_{k}": v for k, v in scores.items()})
            metrics.update({k: v for k, v in result.items() if k.endswith("_before")})
            _, refs, sources = prompts_and_references(raw["validation"], data_args)
            ids = raw["validation"]["id"] if "id" in raw["validation"].column_names else [None] * len(refs)
            result["examples"] = [
                {"id": ids[i], "source": sources[i], "reference": refs[i], "prediction": hyps[i]}
                for i in pick_translation_examples(raw["validation"], data_args.num_examples)
            ]
            for ex in result["examples"]:
                logger.info("example: %s", ex)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        result.update(metrics)

    if training_args.do_predict:
        scores, hyps = translate_and_score(model, tokenizer, raw["test"], data_args, generation_config, "predict")
        metrics = {f"predict_{k}": v for k, v in scores.items()}
        metrics["predict_samples"] = len(raw["test"])
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        result.update(metrics)
        if trainer.is_world_process_zero():
            path = os.path.join(training_args.output_dir, "generated_predictions.txt")
            os.makedirs(training_args.output_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(h.replace("\n", " ") for h in hyps) + "\n")
            result["predictions_file"] = path

    result["all_results_file"] = os.path.join(training_args.output_dir, "all_results.json")
    result["model"], result["tokenizer"] = model, tokenizer  # for callers in Python (not JSON)
    return result
