"""What every recipe shares: the model/data flags of transformers' example scripts, loading user files with errors
that name the file, building the tokenizer and model (pretrained folder, or `--config_name` + a tokenizer trained on
the training texts), the output-folder rule of the HF scripts, and writing results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from collections.abc import Hashable, Sequence
from pathlib import Path

import datasets
import torch
import transformers
from datasets import DatasetDict, load_dataset
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, PreTrainedTokenizerBase
from transformers.trainer_utils import get_last_checkpoint

import modeling_sparse_moe  # noqa: F401  (registers the Auto classes)

from ..configs import resolve_config_name
from ..recipes.data import train_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """As in transformers' example scripts."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A pretrained model folder (or Hub id when online) to fine-tune."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "A config folder/file to train from scratch (e.g. configs/tiny)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config fields when training from scratch: 'n_embd=10,num_experts=8'."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder; without it (and without a model) one is trained on the training texts."},
    )
    tokenizer_vocab_size: int = field(
        default=2048, metadata={"help": "Vocabulary of the tokenizer trained from scratch."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})


@dataclass
class RemoteCodeArguments:
    # A separate dataclass because TRL's SFTConfig already has this flag (argparse refuses a duplicate).
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for Hub models."})


@dataclass
class LoraArguments:
    """PEFT LoRA. `--lora_r 0` (default) is full fine-tuning."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target: str = field(
        default="attention,router,experts",
        metadata={
            "help": "Comma-separated parts to adapt: attention (q/k/v/o projections), router (the MoE gate weight), "
            "experts (the 3D expert tensors through PEFT `target_parameters`), mlp (dense MLPs), or module names."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: quantize the base to NF4, experts included (bitsandbytes; CPU or CUDA); needs --lora_r."},
    )


@dataclass
class OutputArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir (transformers 5 dropped this TrainingArguments flag)."},
    )


def parse_args(dataclass_types, argv: list[str] | None):
    """`HfArgumentParser` over `dataclass_types` (the last being the training arguments) plus
    `--overwrite_output_dir`, which is set on the training arguments as transformers 4's scripts had it. `argv=None`
    reads sys.argv; a single .json path is read as a file of arguments, as in the HF scripts."""
    extra = [OutputArguments]
    if "trust_remote_code" not in {f.name for f in dataclasses.fields(dataclass_types[-1])}:
        extra.append(RemoteCodeArguments)
    parser = HfArgumentParser((*dataclass_types, *extra))
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = list(parser.parse_json_file(json_file=os.path.abspath(argv[0])))
    else:
        parsed = list(parser.parse_args_into_dataclasses(args=argv))
    extras, parsed = parsed[len(dataclass_types) :], parsed[: len(dataclass_types)]
    parsed[-1].overwrite_output_dir = extras[0].overwrite_output_dir
    remote = extras[1] if len(extras) > 1 else parsed[-1]
    parsed[0].trust_remote_code = remote.trust_remote_code
    return parsed


def start_recipe(data_arguments, training_arguments, argv: list[str] | None):
    """The start every recipe shares with the HF example scripts: parse (model, data, LoRA, training) arguments, set up
    logging, apply the output-dir rule (`check_output_dir`), seed, refuse QLoRA without its requirements. Returns
    `(model_args, data_args, lora_args, training_args, last_checkpoint)`."""
    model_args, data_args, lora_args, training_args = parse_args(
        (ModelArguments, data_arguments, LoraArguments, training_arguments), argv
    )
    setup_logging(training_args)
    last_checkpoint = check_output_dir(training_args)
    seed_everything(training_args.seed)
    if lora_args.load_in_4bit:
        from .peft_utils import check_qlora_available

        check_qlora_available(lora_args.lora_r)
    return model_args, data_args, lora_args, training_args, last_checkpoint


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def check_output_dir(training_args) -> str | None:
    """The HF scripts' rule: a non-empty `output_dir` is refused for training unless `--overwrite_output_dir`, or
    unless it holds a checkpoint to resume from (returned). Nothing a user saved is silently overwritten."""
    out = training_args.output_dir
    if not os.path.isdir(out) or not training_args.do_train or getattr(training_args, "overwrite_output_dir", False):
        return None
    last = get_last_checkpoint(out)
    if last is None and len(os.listdir(out)) > 0:
        raise ValueError(
            f"Output directory ({out}) already exists and is not empty. Use --overwrite_output_dir to overcome."
        )
    if last is not None and training_args.resume_from_checkpoint is None:
        logger.info("Checkpoint detected, resuming training at %s.", last)
        return last
    return None


class DataFileError(ValueError):
    """A user data file that cannot be used; the message names the file and the problem."""


def _extension(path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower()
    return "json" if ext in ("jsonl", "json") else ext


def load_raw_datasets(data_args, model_args, default_factory) -> DatasetDict:
    """`--dataset_name` (Hub), else `--train_file/--validation_file/--test_file` (csv/json/jsonl; SQuAD JSON with a
    top-level `data` field too), else the offline default from `default_factory()`. Splits are named train,
    validation, test."""
    if getattr(data_args, "dataset_name", None):
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir)
    files = {
        split: getattr(data_args, f"{split}_file", None)
        for split in ("train", "validation", "test")
        if getattr(data_args, f"{split}_file", None)
    }
    if not files:
        return default_factory()
    raw = DatasetDict()
    for split, path in files.items():
        raw[split] = load_data_file(path, field=getattr(data_args, "json_field", None))
    return raw


def load_data_file(path: str, field: str | None = None):
    """One csv/json/jsonl file as a `Dataset`. A JSON object with a top-level `data` list (SQuAD's layout) is read
    from that field. Errors name the file."""
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: file not found")
    ext = _extension(path)
    if ext not in ("csv", "json"):
        raise DataFileError(f"{path}: unsupported extension; use .csv, .json or .jsonl")
    if ext == "json" and field is None:
        with open(path, encoding="utf-8") as f:
            head = f.read(1).strip() or f.read(64).lstrip()[:1]
        if head == "{":
            try:
                with open(path, encoding="utf-8") as f:
                    obj = json.load(f)
                if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                    field = "data"
            except json.JSONDecodeError:
                pass  # JSON lines: one object per line
    try:
        ds = load_dataset(ext, data_files={"data": path}, field=field, split="data") if field else load_dataset(
            ext, data_files={"data": path}, split="data"
        )
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataFileError(f"{path}: cannot be read as {ext}: {err}") from err
    if len(ds) == 0:
        raise DataFileError(f"{path}: no rows")
    return ds


def require_columns(ds, columns: list[str], path: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataFileError(f"{path}: missing column(s) {missing}; found {ds.column_names}")


def source_of(data_args, split: str) -> str:
    """A name for error messages: the user's file for that split, or the dataset."""
    return getattr(data_args, f"{split}_file", None) or getattr(data_args, "dataset_name", None) or f"offline {split}"


def load_tokenizer(model_args, training_texts, output_dir: str | None = None) -> PreTrainedTokenizerBase:
    """`--tokenizer_name`, else the model folder's tokenizer, else a byte-level BPE trained on `training_texts()`
    (a callable, so the texts are only gathered when needed). Padding side is right for training; generation
    pads left itself."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=model_args.cache_dir)
    else:
        texts = training_texts()
        logger.info("Training a %d-token BPE tokenizer on %d training texts", model_args.tokenizer_vocab_size, len(texts))
        tokenizer = train_tokenizer(texts, vocab_size=model_args.tokenizer_vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_config(model_args, tokenizer, **extra):
    """The model's config (pretrained) or `--config_name` with `--config_overrides`, sized to the tokenizer."""
    if model_args.model_name_or_path and not model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir, **extra)
    elif model_args.config_name:
        config_name = resolve_config_name(model_args.config_name)  # "tiny" or "configs/tiny" from any folder
        config = AutoConfig.from_pretrained(config_name, cache_dir=model_args.cache_dir, **extra)
        if model_args.config_overrides:
            from ..recipes.pretraining import apply_config_overrides  # every recipe parses overrides the same way

            config = apply_config_overrides(config, model_args.config_overrides)
    else:
        raise ValueError("Pass --model_name_or_path (fine-tune) or --config_name (train from scratch), e.g. configs/tiny")
    if not model_args.model_name_or_path:
        # From scratch: the vocabulary and special ids follow the tokenizer trained or given.
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return config


def load_model(auto_class, model_args, config):
    if model_args.model_name_or_path:
        return auto_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code,
        )
    return auto_class.from_config(config)


def limit(ds, n: int | None):
    return ds if n is None else ds.select(range(min(n, len(ds))))


def pick_examples(groups: Sequence[Hashable], n: int, correct: Sequence[bool] | None = None) -> list[int]:
    """Indices of up to `n` rows to show as examples, each from a different group (a Bible chapter, a country), the
    groups spread evenly over the set instead of the first few. With `correct` (one bool per row), right and wrong
    answers alternate, right first, as far as the rows allow. Groups are reused only when there are fewer than `n`.
    Deterministic: the same rows give the same picks."""
    if correct is not None and len(correct) != len(groups):
        raise ValueError(f"{len(correct)} correctness flags for {len(groups)} rows")
    rows_of: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        rows_of.setdefault(group, []).append(i)
    order = list(rows_of)
    n = min(n, len(groups))
    # Visit evenly spaced groups first (the middle of each of n equal stretches), then the rest in order.
    spaced = list(dict.fromkeys(int((k + 0.5) * len(order) / n) for k in range(n))) if n else []
    visit = [order[k] for k in spaced] + [g for k, g in enumerate(order) if k not in set(spaced)]
    picked: list[int] = []
    used: set = set()
    for k in range(n):
        wanted = None if correct is None else k % 2 == 0
        fresh = [g for g in visit if g not in used] or visit  # every group used: allow a second row from one
        candidates = [i for g in fresh for i in rows_of[g] if i not in picked]
        matching = [i for i in candidates if wanted is None or bool(correct[i]) == wanted]
        choice = (matching or candidates)[0]
        picked.append(choice)
        used.add(groups[choice])
    return picked


def write_json(path: str | Path, obj) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return str(path)


def count_parameters(model) -> dict[str, int]:
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def seed_everything(seed: int) -> None:
    transformers.set_seed(seed)
    torch.manual_seed(seed)
