"""Sentiment / text classification with `SparseMoEForSequenceClassification` (the last non-pad token's state feeds
a linear head), with run_classification's data format and flags.

Data: CSV or JSON(lines) with a `sentence` or `text` column (or `--text_column_names a,b`) and a `label` column
(ints or strings); `--dataset_name imdb` online; by default offline VADER lexicon polarity
(`tasks.data.sentiment_dataset`). Accuracy and macro F1 before and after training.

    from modeling_sparse_moe.tasks import classification
    result = classification.main(["--config_name", "configs/tiny", "--output_dir", "out/cls", "--do_train",
                                  "--do_eval", "--max_steps", "200"])
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

from ..recipes.training import RouterBiasUpdateCallback
from . import common
from .data import sentiment_dataset
from .peft_utils import apply_lora

logger = logging.getLogger(__name__)


@dataclass
class ClassificationDataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (online only), e.g. imdb."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    train_file: str | None = field(default=None, metadata={"help": "CSV/JSON with text and label columns."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation file, same format."})
    test_file: str | None = field(default=None, metadata={"help": "Prediction file (label column optional)."})
    text_column_names: str | None = field(
        default=None, metadata={"help": "Comma-separated text columns (joined with a space); default sentence or text."}
    )
    label_column_name: str = field(default="label", metadata={"help": "Label column (ints or strings)."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens kept per text."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})


def accuracy_f1(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 over the classes present in `labels` or `predictions`."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    f1s = []
    for c in np.union1d(labels, predictions):
        tp = np.sum((predictions == c) & (labels == c))
        fp, fn = np.sum((predictions == c) & (labels != c)), np.sum((predictions != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(np.mean(predictions == labels)), "f1": float(np.mean(f1s))}


def _compute_metrics(eval_pred):
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return accuracy_f1(np.argmax(logits, axis=-1), eval_pred.label_ids)


def _text_columns(ds, data_args, where: str) -> list[str]:
    if data_args.text_column_names:
        cols = [c.strip() for c in data_args.text_column_names.split(",")]
        common.require_columns(ds, cols, where)
        return cols
    for name in ("sentence", "text"):
        if name in ds.column_names:
            return [name]
    raise common.DataFileError(f"{where}: no text column: expected `sentence` or `text` (or pass --text_column_names); "
                               f"found {ds.column_names}")


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns accuracy/F1 before and after training, output paths and the trained `model`."""
    model_args, data_args, lora_args, training_args, last_checkpoint = common.start_recipe(
        ClassificationDataArguments, TrainingArguments, argv
    )
    raw = common.load_raw_datasets(data_args, model_args, sentiment_dataset)
    if "validation" not in raw and "test" in raw and data_args.dataset_name:
        raw["validation"] = raw["test"]  # imdb has train/test only
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples, "test": data_args.max_predict_samples}
    text_cols = {}
    for split in list(raw):
        if split not in caps:
            continue
        if split != "train":  # like run_classification, evaluate on a shuffled sample when capped
            raw[split] = raw[split].shuffle(seed=training_args.seed) if caps[split] and caps[split] < len(raw[split]) else raw[split]
        raw[split] = common.limit(raw[split], caps[split])
        where = common.source_of(data_args, split)
        text_cols[split] = _text_columns(raw[split], data_args, where)
        if split != "test":
            common.require_columns(raw[split], [data_args.label_column_name], where)
    label_source = raw["train"] if "train" in raw else raw["validation"]
    labels = sorted(set(label_source[data_args.label_column_name]), key=str)
    label2id = {label: i for i, label in enumerate(labels)}
    for split in ("validation", "test"):
        if split in raw and data_args.label_column_name in raw[split].column_names:
            unknown = set(raw[split][data_args.label_column_name]) - set(label2id)
            if unknown:
                raise common.DataFileError(f"{common.source_of(data_args, split)}: labels {sorted(unknown, key=str)} "
                                           f"do not occur in training (known: {labels})")

    def texts():
        cols = text_cols.get("train") or next(iter(text_cols.values()))
        return [" ".join(str(row[c]) for c in cols) for row in label_source]

    tokenizer = common.load_tokenizer(model_args, texts)
    config = common.load_config(
        model_args, tokenizer, num_labels=len(labels),
        id2label={i: str(label) for label, i in label2id.items()}, label2id={str(k): v for k, v in label2id.items()},
    )
    model = common.load_model(AutoModelForSequenceClassification, model_args, config)
    model = apply_lora(model, lora_args, task_type="SEQ_CLS")
    if lora_args.lora_r > 0:  # the new head must train too
        for name, p in model.named_parameters():
            if ".score." in name and "modules_to_save" in name or name.endswith("score.weight"):
                p.requires_grad_(True)

    def encode(batch, split):
        cols = text_cols[split]
        joined = [" ".join(str(batch[c][i]) for c in cols) for i in range(len(batch[cols[0]]))]
        out = tokenizer(joined, truncation=True, max_length=data_args.max_seq_length)
        if data_args.label_column_name in batch:
            out["labels"] = [label2id[label] for label in batch[data_args.label_column_name]]
        return out

    encoded = {}
    with training_args.main_process_first(desc="tokenize"):
        for split in raw:
            if split in text_cols:
                encoded[split] = raw[split].map(
                    encode, fn_kwargs={"split": split}, batched=True, remove_columns=raw[split].column_names,
                    num_proc=data_args.preprocessing_num_workers, desc=f"Tokenizing {split}",
                )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=encoded.get("train") if training_args.do_train else None,
        eval_dataset=encoded.get("validation") if training_args.do_eval else None,
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        compute_metrics=_compute_metrics, callbacks=[RouterBiasUpdateCallback()],
    )
    result: dict = {"parameters": common.count_parameters(model), "output_dir": training_args.output_dir, "labels": labels}
    if training_args.do_eval:
        before = trainer.evaluate(metric_key_prefix="eval")
        result.update({"eval_accuracy_before": before["eval_accuracy"], "eval_f1_before": before["eval_f1"]})
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        metrics = dict(train_result.metrics, train_samples=len(encoded["train"]))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        result.update(metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        metrics.update({k: v for k, v in result.items() if k.endswith("_before")}, eval_samples=len(encoded["validation"]))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        result.update(metrics)
    if training_args.do_predict:
        test = encoded["test"]
        out = trainer.predict(test, metric_key_prefix="predict")
        logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
        predictions = np.argmax(logits, axis=-1)
        if out.metrics:
            trainer.log_metrics("predict", out.metrics)
            trainer.save_metrics("predict", out.metrics)
            result.update({k: v for k, v in out.metrics.items() if k.startswith("predict_")})
        if trainer.is_world_process_zero():
            path = os.path.join(training_args.output_dir, "predict_results.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write("index\tprediction\n")
                for i, p in enumerate(predictions):
                    f.write(f"{i}\t{labels[p]}\n")
            result["predictions_file"] = path
    result["all_results_file"] = os.path.join(training_args.output_dir, "all_results.json")
    result["model"], result["tokenizer"] = model, tokenizer
    return result
