"""Question answering with SparseMoE, with run_qa's data format and flags: extractive (`SparseMoEForQuestionAnswering`,
offset mapping, doc stride, n-best span post-processing) or generative (`--generative`: the causal LM writes the
answer after a prompt). SQuAD v1.1 / v2.0 exact match and F1 before and after training.

Data: SQuAD JSON (a top-level `data` list, or JSON lines) of {id, context, question, answers: {text, answer_start}};
unanswerable questions (empty answers) with `--version_2_with_negative`; a Hub dataset (`--dataset_name squad`); or by
default the offline country-facts set whose validation/test countries never appear in training.

Generative decoding follows `--num_beams` / `--generation_num_beams`, `--generation_max_length`,
`--no_repeat_ngram_size`, `--repetition_penalty` and `--generation_config` (`Seq2SeqTrainingArguments`, as in
run_seq2seq_qa). The example answers come from different countries (titles), right and wrong ones, labelled.

NOTE: the model is causal, so the question comes first: context tokens then attend to it (a bidirectional encoder
would not care about the order). Position 0 is the "no answer" slot, as run_qa uses the CLS position.

    from modeling_sparse_moe.tasks import qa
    result = qa.main(["--config_name", "configs/tiny", "--output_dir", "out/qa", "--do_train", "--do_eval"])
    result["eval_exact_match_before"], result["eval_exact_match"], result["eval_f1"], result["examples"]
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    Seq2SeqTrainingArguments,
    Trainer,
    default_data_collator,
)

from ..recipes.training import CausalLMTrainer, RouterBiasUpdateCallback
from . import common
from .data import country_qa_dataset
from .generation import (
    CompletionCollator,
    GenerationArguments,
    describe_generation,
    encode_pair,
    generate_completions,
    generation_config_from_args,
)
from .metrics import squad_scores
from .squad_metric.squad_metric import exact_match
from .peft_utils import apply_lora

logger = logging.getLogger(__name__)

QUESTION_SEPARATOR = "\n"  # appended to every question so the context starts on a token boundary


@dataclass
class QADataArguments(GenerationArguments):
    """run_qa's data flags, plus generative QA and its repetition controls (`GenerationArguments`)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (online only), e.g. squad."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    train_file: str | None = field(default=None, metadata={"help": "SQuAD JSON (`data` field) or JSON lines."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation file, same format."})
    test_file: str | None = field(default=None, metadata={"help": "Prediction file, same format."})
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per feature (question + context window)."})
    doc_stride: int = field(default=64, metadata={"help": "Overlap between context windows of a long example."})
    version_2_with_negative: bool = field(default=False, metadata={"help": "Some questions have no answer (v2)."})
    null_score_diff_threshold: float = field(
        default=0.0, metadata={"help": "Predict no answer when null score - best span score exceeds this."}
    )
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates considered per feature."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer span in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})
    generative: bool = field(default=False, metadata={"help": "Generate the answer with the causal LM."})
    max_answer_tokens: int = field(
        default=24, metadata={"help": "Generative: answer tokens kept for training; generated unless "
                              "--generation_max_length says otherwise."}
    )
    generation_batch_size: int = field(default=16, metadata={"help": "Generative: rows per generate() call."})
    num_beams: int | None = field(
        default=None, metadata={"help": "Generative: beams (overrides --generation_num_beams; default greedy)."}
    )
    num_examples: int = field(
        default=3, metadata={"help": "Example answers returned and logged: right and wrong, different countries."}
    )


def validate_squad_split(ds, where: str) -> None:
    """Columns, answer lists of equal length, and every `answer_start` pointing at its text in the context."""
    common.require_columns(ds, ["id", "context", "question", "answers"], where)
    for row in ds:
        answers = row["answers"]
        if not isinstance(answers, dict) or "text" not in answers or "answer_start" not in answers:
            raise common.DataFileError(f"{where}: id {row['id']}: `answers` must be {{'text': [...], 'answer_start': [...]}}")
        if len(answers["text"]) != len(answers["answer_start"]):
            raise common.DataFileError(f"{where}: id {row['id']}: {len(answers['text'])} answer texts but "
                                       f"{len(answers['answer_start'])} answer_start values")
        for text, start in zip(answers["text"], answers["answer_start"]):
            found = row["context"][start : start + len(text)]
            if found != text:
                raise common.DataFileError(
                    f"{where}: id {row['id']}: answer_start {start} does not match the answer text {text!r} in the "
                    f"context (found {found!r} there)"
                )


def _tokenize(tokenizer, examples, data_args):
    questions = [q.lstrip() + QUESTION_SEPARATOR for q in examples["question"]]
    # NOTE: the Rust tokenizer panics (instead of raising) when the room left for the context is not larger than
    # the stride; say which question and what to change instead.
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=True)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if data_args.max_seq_length - lengths[longest] - 1 <= data_args.doc_stride:
        raise ValueError(
            f"question {examples['question'][longest]!r} takes {lengths[longest]} tokens, leaving "
            f"{data_args.max_seq_length - lengths[longest]} of --max_seq_length {data_args.max_seq_length} for the "
            f"context, not more than --doc_stride {data_args.doc_stride}: raise --max_seq_length or lower --doc_stride"
        )
    return tokenizer(
        questions,
        examples["context"],
        truncation="only_second",
        max_length=data_args.max_seq_length,
        stride=data_args.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def prepare_train_features(examples, tokenizer, data_args):
    """run_qa's train features: one row per context window, labelled with the answer's token span, or position 0
    when the window does not hold the whole answer (or there is none)."""
    tokenized = _tokenize(tokenizer, examples, data_args)
    sample_map = tokenized.pop("overflow_to_sample_mapping")
    offsets_all = tokenized.pop("offset_mapping")
    tokenized["start_positions"], tokenized["end_positions"] = [], []
    for i, offsets in enumerate(offsets_all):
        answers = examples["answers"][sample_map[i]]
        seq_ids = tokenized.sequence_ids(i)
        start_pos = end_pos = 0
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            ctx = [k for k, s in enumerate(seq_ids) if s == 1]
            if ctx and offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char:
                start_pos = next(k for k in ctx if offsets[k][1] > start_char)
                end_pos = next(k for k in reversed(ctx) if offsets[k][0] < end_char)
        tokenized["start_positions"].append(start_pos)
        tokenized["end_positions"].append(end_pos)
    return tokenized


def prepare_validation_features(examples, tokenizer, data_args):
    """run_qa's evaluation features: each window keeps its example id and the offsets of its context tokens (None
    elsewhere), so spans map back to characters."""
    tokenized = _tokenize(tokenizer, examples, data_args)
    sample_map = tokenized.pop("overflow_to_sample_mapping")
    tokenized["example_id"] = []
    for i in range(len(tokenized["input_ids"])):
        seq_ids = tokenized.sequence_ids(i)
        tokenized["example_id"].append(examples["id"][sample_map[i]])
        tokenized["offset_mapping"][i] = [o if seq_ids[k] == 1 else None for k, o in enumerate(tokenized["offset_mapping"][i])]
    return tokenized


def postprocess_qa_predictions(
    examples,
    features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    version_2_with_negative: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Best answer text per example over all its windows (run_qa's `postprocess_qa_predictions`): the n best start
    and end logits of each window form candidate spans inside the context, at most `max_answer_length` tokens long;
    the highest start + end score wins. With v2, "" is predicted when the null score (position 0 of the window with
    the lowest null score) beats the best span by more than `null_score_diff_threshold`. Returns the predictions
    and the null-minus-best score differences."""
    features_per_example = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        features_per_example[example_id].append(i)
    offsets_all = features["offset_mapping"]
    predictions, score_diffs = {}, {}
    for example in examples:
        min_null = None
        candidates = []
        for fi in features_per_example[example["id"]]:
            starts, ends, offsets = start_logits[fi], end_logits[fi], offsets_all[fi]
            null = starts[0] + ends[0]
            if min_null is None or null < min_null:
                min_null = null
            for s in np.argsort(starts)[-1 : -n_best_size - 1 : -1]:
                for e in np.argsort(ends)[-1 : -n_best_size - 1 : -1]:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    candidates.append((starts[s] + ends[e], offsets[s][0], offsets[e][1]))
        best = max(candidates, default=None)
        text = example["context"][best[1] : best[2]].strip() if best else ""
        diff = (min_null - best[0]) if best else float("inf")
        score_diffs[example["id"]] = float(diff)
        if version_2_with_negative and diff > null_score_diff_threshold:
            text = ""
        predictions[example["id"]] = text
    return predictions, score_diffs


def generative_prompt(context: str, question: str) -> str:
    return f"{context}\nQuestion: {question}\nAnswer:"


def _score(predictions: dict[str, str], examples) -> dict:
    return squad_scores(predictions, list(examples))


def is_correct(prediction: str, gold: list[str]) -> bool:
    """SQuAD exact match against any gold answer; with no gold (unanswerable), right only when nothing is predicted."""
    if not gold:
        return not prediction.strip()
    return any(exact_match(prediction, answer) for answer in gold)


def pick_qa_examples(predictions: dict[str, str], examples, n: int) -> list[dict]:
    """`n` example answers from different titles (countries; the context when there is no title), right and wrong
    alternating, each labelled `correct` (exact match) with its gold answers."""
    rows = list(examples)
    correct = [is_correct(predictions[row["id"]], list(row["answers"]["text"])) for row in rows]
    groups = [row.get("title") or row["context"] for row in rows]
    return [
        {"id": rows[i]["id"], "title": rows[i].get("title"), "question": rows[i]["question"],
         "gold": list(rows[i]["answers"]["text"]), "prediction": predictions[rows[i]["id"]], "correct": correct[i]}
        for i in common.pick_examples(groups, n, correct)
    ]


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns EM/F1 before and after training (on the validation split), example answers, output
    paths and the trained `model` / `tokenizer`. `argv` as on the command line (None: sys.argv)."""
    model_args, data_args, lora_args, training_args, last_checkpoint = common.start_recipe(
        QADataArguments, Seq2SeqTrainingArguments, argv
    )

    raw = common.load_raw_datasets(
        data_args, model_args, lambda: country_qa_dataset(with_negatives=data_args.version_2_with_negative)
    )
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples, "test": data_args.max_predict_samples}
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    for split, needed in wanted.items():
        if needed and split not in raw:
            raise ValueError(f"{split} split needed: pass --{split}_file")
    for split in list(raw):
        if split in caps:
            raw[split] = common.limit(raw[split], caps[split])
            validate_squad_split(raw[split], common.source_of(data_args, split))
            if not data_args.version_2_with_negative and any(not a["text"] for a in raw[split]["answers"]):
                raise common.DataFileError(
                    f"{common.source_of(data_args, split)}: has unanswerable questions (empty answers); pass "
                    "--version_2_with_negative"
                )

    def texts():
        ds = raw["train"] if "train" in raw else next(iter(raw.values()))
        return list(ds["question"]) + list(dict.fromkeys(ds["context"]))

    tokenizer = common.load_tokenizer(model_args, texts)
    config = common.load_config(model_args, tokenizer)
    auto_class = AutoModelForCausalLM if data_args.generative else AutoModelForQuestionAnswering
    model = common.load_model(auto_class, model_args, config)
    model = apply_lora(model, lora_args, task_type="CAUSAL_LM" if data_args.generative else "QUESTION_ANS")
    params = common.count_parameters(model)
    result: dict = {"parameters": params, "output_dir": training_args.output_dir,
                    "mode": "generative" if data_args.generative else "extractive"}
    run = _generative if data_args.generative else _extractive
    result.update(run(model, tokenizer, raw, data_args, training_args, last_checkpoint))
    result["all_results_file"] = os.path.join(training_args.output_dir, "all_results.json")
    result["model"], result["tokenizer"] = model, tokenizer
    return result


def _train(trainer, training_args, last_checkpoint, n_train) -> dict:
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
    trainer.save_model()
    metrics = dict(train_result.metrics, train_samples=n_train)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def _save_predictions(trainer, training_args, prefix, predictions):
    if trainer.is_world_process_zero():
        return common.write_json(os.path.join(training_args.output_dir, f"{prefix}_predictions.json"), predictions)
    return None


def _extractive(model, tokenizer, raw, data_args, training_args, last_checkpoint) -> dict:
    if training_args.label_names is None:
        training_args.label_names = ["start_positions", "end_positions"]
    features = {}
    with training_args.main_process_first(desc="tokenize"):
        if training_args.do_train:
            features["train"] = raw["train"].map(
                prepare_train_features, fn_kwargs={"tokenizer": tokenizer, "data_args": data_args}, batched=True,
                remove_columns=raw["train"].column_names, num_proc=data_args.preprocessing_num_workers,
                desc="Train features",
            )
        for split, flag in (("validation", training_args.do_eval), ("test", training_args.do_predict)):
            if flag:
                features[split] = raw[split].map(
                    prepare_validation_features, fn_kwargs={"tokenizer": tokenizer, "data_args": data_args},
                    batched=True, remove_columns=raw[split].column_names,
                    num_proc=data_args.preprocessing_num_workers, desc=f"{split} features",
                )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=features.get("train"), data_collator=default_data_collator,
        processing_class=tokenizer, callbacks=[RouterBiasUpdateCallback()],
    )

    def predict(split, prefix):
        feats = features[split]
        # "eval before" (the progress label of the first pass) keeps the metric prefix "eval"
        out = trainer.predict(feats.remove_columns(["example_id", "offset_mapping"]), metric_key_prefix=prefix.split()[0])
        start_logits, end_logits = out.predictions[:2] if isinstance(out.predictions, tuple) else out.predictions
        preds, diffs = postprocess_qa_predictions(
            raw[split], feats, start_logits, end_logits, data_args.version_2_with_negative, data_args.n_best_size,
            data_args.max_answer_length, data_args.null_score_diff_threshold,
        )
        return preds, _score(preds, raw[split])

    num_train = len(features["train"]) if "train" in features else 0
    return _evaluate_train_predict(trainer, predict, raw, data_args, training_args, last_checkpoint, num_train)


def _generative(model, tokenizer, raw, data_args, training_args, last_checkpoint) -> dict:
    if training_args.label_names is None:
        training_args.label_names = ["labels"]

    def encode(batch):
        rows = [
            encode_pair(tokenizer, generative_prompt(c, q), " " + (a["text"][0] if a["text"] else ""),
                        data_args.max_seq_length, data_args.max_answer_tokens)
            for c, q, a in zip(batch["context"], batch["question"], batch["answers"])
        ]
        return {k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels")}

    generation_config = generation_config_from_args(
        model, training_args, data_args, data_args.num_beams, default_max_new_tokens=data_args.max_answer_tokens
    )
    logger.info("decoding: %s", describe_generation(generation_config))
    # Saved with the model: generate() on the fine-tuned folder decodes as it was scored.
    (model.get_base_model() if hasattr(model, "get_base_model") else model).generation_config = generation_config
    train = None
    if training_args.do_train:
        with training_args.main_process_first(desc="tokenize"):
            train = raw["train"].map(encode, batched=True, remove_columns=raw["train"].column_names,
                                     num_proc=data_args.preprocessing_num_workers, desc="Tokenizing train")
    trainer = CausalLMTrainer(
        model=model, args=training_args, train_dataset=train, data_collator=CompletionCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=[RouterBiasUpdateCallback()],
    )

    def predict(split, desc):
        ds = raw[split]
        answers = generate_completions(
            model, tokenizer, [generative_prompt(c, q) for c, q in zip(ds["context"], ds["question"])],
            data_args.max_seq_length, generation_config, data_args.generation_batch_size, desc,
        )
        preds = dict(zip(ds["id"], answers))
        return preds, _score(preds, ds)

    result = _evaluate_train_predict(trainer, predict, raw, data_args, training_args, last_checkpoint,
                                     len(train) if train is not None else 0)
    result["generation"] = describe_generation(generation_config)
    return result


def _evaluate_train_predict(trainer, predict, raw, data_args, training_args, last_checkpoint, num_train) -> dict:
    """What both QA modes do around training: score the validation split before and after, then the test split.
    `predict(split, desc)` returns (predictions by id, scores)."""
    result: dict = {}
    if training_args.do_eval and training_args.do_train:  # without training, "after" is the same model
        _, scores = predict("validation", "eval before")
        result.update({f"eval_{k}_before": v for k, v in scores.items() if k in ("exact_match", "f1")})
    if training_args.do_train:
        result.update(_train(trainer, training_args, last_checkpoint, num_train))
    if training_args.do_eval:
        preds, scores = predict("validation", "eval")
        metrics = {f"eval_{k}": v for k, v in scores.items()}
        metrics.update({k: v for k, v in result.items() if k.startswith("eval_")})
        metrics["eval_samples"] = len(raw["validation"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        result.update(metrics)
        result["examples"] = pick_qa_examples(preds, raw["validation"], data_args.num_examples)
        result["eval_predictions_file"] = _save_predictions(trainer, training_args, "eval", preds)
    if training_args.do_predict:
        preds, scores = predict("test", "predict")
        metrics = {f"predict_{k}": v for k, v in scores.items()}
        metrics["predict_samples"] = len(raw["test"])
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        result.update(metrics)
        result["predict_predictions_file"] = _save_predictions(trainer, training_args, "predict", preds)
    return result
