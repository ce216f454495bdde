# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Calibration and evaluation text for the compression tools: where the tokens come from, cut into blocks.

    texts = calibration_texts("generic")                 # offline corpora by name, see CORPORA
    texts = calibration_texts(calibration_file="my.txt")  # .txt (one text per line), .json/.jsonl/.csv with `text`
    texts = calibration_texts(dataset_name="wikitext", dataset_config_name="wikitext-2-raw-v1")
    blocks = token_blocks(tokenizer, texts, block_size=128, max_tokens=16384)   # list of (B, S) LongTensors
    loss = validation_loss(model, token_blocks(tokenizer, heldout_texts("bible"), 128))

Offline corpora (`CORPORA`): "generic" is the Python reference documentation CPython ships (English prose and code,
`recipes.data.load_text_corpus`), text the demo models never trained on; "bible" is the training split of the
World English Bible exactly as the pretraining recipe splits it (`recipes.pretraining.load_raw_datasets`: 5% of the
chapters held out with its fixed seed), so calibration never sees the validation chapters `heldout_texts` returns.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CORPORA = ("generic", "bible")


def _bible_split(split: str) -> list[str]:
    from ..recipes.pretraining import DataTrainingArguments, load_raw_datasets

    raw = load_raw_datasets(DataTrainingArguments())
    return [t for t in raw[split]["text"] if t]


def calibration_texts(calibration: str | None = None, *, calibration_file: str | None = None,
                      dataset_name: str | None = None, dataset_config_name: str | None = None,
                      text_column: str = "text", split: str = "train") -> list[str]:
    """Texts from exactly one source: an offline corpus by name (`CORPORA`), a file, or a Hub data set."""
    given = [s for s in (calibration, calibration_file, dataset_name) if s]
    if len(given) != 1:
        raise ValueError(f"give exactly one calibration source (--calibration {'|'.join(CORPORA)}, "
                         f"--calibration_file or --dataset_name), got {len(given)}")
    if calibration:
        if calibration == "generic":
            from ..recipes.data import load_text_corpus

            return load_text_corpus()
        if calibration == "bible":
            return _bible_split("train")
        raise ValueError(f"unknown calibration corpus {calibration!r}; choose one of {', '.join(CORPORA)}, or pass "
                         f"--calibration_file / --dataset_name")
    import datasets

    if calibration_file:
        path = Path(calibration_file)
        if not path.is_file():
            raise ValueError(f"--calibration_file {calibration_file}: no such file")
        if path.suffix in (".txt", ".text", ""):
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        from ..recipes.pretraining import _builder_for

        dataset = datasets.load_dataset(_builder_for(str(path)), data_files={"train": str(path)})["train"]
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(f"{calibration_file or dataset_name}: no {text_column!r} column (columns: "
                         f"{', '.join(dataset.column_names)}); name it with --text_column_name")
    return [t for t in dataset[text_column] if t]


def heldout_texts(corpus: str = "bible") -> list[str]:
    """The validation chapters of the pretraining recipe's default corpus (what its eval_loss is measured on)."""
    if corpus != "bible":
        raise ValueError(f"held-out texts exist for the 'bible' corpus only, not {corpus!r}")
    return _bible_split("validation")


def token_blocks(tokenizer, texts: list[str], block_size: int = 128, max_tokens: int | None = None,
                 batch_size: int = 8) -> list[torch.Tensor]:
    """Concatenate the tokenised texts (each followed by EOS), cut `block_size` blocks (at most `max_tokens` tokens
    in all), batched as (B, S) LongTensors. An empty result raises (no calibration tokens)."""
    from ..recipes.data import lm_blocks

    blocks = lm_blocks(tokenizer, texts, block_size)
    if max_tokens is not None:
        blocks = blocks[: max(0, max_tokens // block_size)]
    if not blocks:
        raise ValueError(f"the texts give no block of {block_size} tokens (calibration set with no tokens); give more "
                         f"text or a smaller --block_size")
    ids = torch.tensor(blocks, dtype=torch.long)
    return list(ids.split(batch_size))


@torch.no_grad()
def validation_loss(model: nn.Module, blocks: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) over every position of `blocks`: the language-model loss alone, without
    the router losses that `loss` adds when labels are given."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for ids in blocks:
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


__all__ = ["CORPORA", "calibration_texts", "heldout_texts", "token_blocks", "validation_loss"]
