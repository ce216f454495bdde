"""Prompt -> completion with a decoder-only model: encoding with loss on the completion only, a padding collator,
the decoding settings a user chooses (`GenerationArguments`, `generation_config_from_args`), and batched
left-padded `generate()`. Used by translation and generative QA.

A training example is `[bos] prompt completion [eos]` with labels -100 on `[bos] prompt`; at inference the model
sees `[bos] prompt` left-padded in a batch and generates until EOS.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig


@dataclass
class GenerationArguments:
    """Decoding flags beyond `Seq2SeqTrainingArguments`' `--generation_num_beams`, `--generation_max_length` and
    `--generation_config`; named as the `GenerationConfig` fields they set. None: the model's (or the file's) value."""

    no_repeat_ngram_size: int | None = field(
        default=None, metadata={"help": "Generation: no n-gram of this size occurs twice in an output (0 = off)."}
    )
    repetition_penalty: float | None = field(
        default=None, metadata={"help": "Generation: divide the logits of tokens already in the text by this (1.0 = off)."}
    )


def generation_config_from_args(
    model,
    training_args,
    gen_args: GenerationArguments,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    default_max_new_tokens: int = 64,
) -> GenerationConfig:
    """The `GenerationConfig` a recipe decodes with. Precedence, highest first: the recipe's own flag (`num_beams`,
    `max_new_tokens`: e.g. run_translation's `--num_beams`, `--val_max_target_length`), then
    `--generation_num_beams` / `--generation_max_length` / `--no_repeat_ngram_size` / `--repetition_penalty`, then
    the `--generation_config` file or folder, then the model's own `generation_config`; `default_max_new_tokens` when
    none of them sets a length. For a decoder-only model the maximum length counts new tokens (the prompt is not
    part of the output). A bad setting is a `ValueError`."""
    source = getattr(training_args, "generation_config", None)
    if source is None:
        base = getattr(model, "generation_config", None)
        config = copy.deepcopy(base) if base is not None else GenerationConfig()
    elif isinstance(source, GenerationConfig):
        config = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"--generation_config {source}: no such file or folder; give a generation_config.json "
                             "file or a folder holding one")
        folder, name = (path.parent, path.name) if path.is_file() else (path, None)
        config = GenerationConfig.from_pretrained(folder, name)
    beams = num_beams or getattr(training_args, "generation_num_beams", None)
    new_tokens = max_new_tokens or getattr(training_args, "generation_max_length", None)
    if beams is not None:
        config.num_beams = beams
    if new_tokens is not None:
        config.max_new_tokens = new_tokens
    if gen_args.no_repeat_ngram_size is not None:
        config.no_repeat_ngram_size = gen_args.no_repeat_ngram_size
    if gen_args.repetition_penalty is not None:
        config.repetition_penalty = gen_args.repetition_penalty
    if config.max_new_tokens is None:
        config.max_new_tokens = default_max_new_tokens
    try:
        config.validate(strict=True)
    except ValueError as err:
        raise ValueError(f"generation settings: {err}") from None
    return config


def describe_generation(config: GenerationConfig) -> str:
    """One line naming the decoding: 'greedy' or 'beam search (4 beams)', plus the repetition controls set."""
    words = ["sampling" if config.do_sample else "greedy" if (config.num_beams or 1) == 1 else
             f"beam search ({config.num_beams} beams)"]
    if config.no_repeat_ngram_size:
        words.append(f"no_repeat_ngram_size={config.no_repeat_ngram_size}")
    if config.repetition_penalty not in (None, 1.0):
        words.append(f"repetition_penalty={config.repetition_penalty:g}")
    words.append(f"max_new_tokens={config.max_new_tokens}")
    return ", ".join(words)


def encode_prompt(tokenizer, prompt: str, max_length: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + ids[-max_length:] if max_length else bos + ids  # NOTE: keep the end: it holds the separator


def encode_pair(tokenizer, prompt: str, completion: str, max_prompt_length: int, max_completion_length: int) -> dict:
    """Token ids and labels (prompt masked with -100) for one prompt/completion pair."""
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"][:max_completion_length]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + completion_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(completion_ids)),
        "labels": [-100] * len(prompt_ids) + completion_ids,
    }


class CompletionCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to the longest row of the batch."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [-100] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list[str],
    max_prompt_length: int = 256,
    generation_config: GenerationConfig | None = None,
    batch_size: int = 16,
    desc: str = "generate",
) -> list[str]:
    """Completions of `prompts` decoded with `generation_config` (None: greedy, up to 64 new tokens), in batches
    left-padded so every row ends at the same position. Returns the decoded new tokens, stopping at EOS."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig(
        max_new_tokens=64, do_sample=False
    )
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, pad_id
    # Longest prompts first: batches pad less. Results are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        index = order[start : start + batch_size]
        rows = [encode_prompt(tokenizer, prompts[i], max_prompt_length) for i in index]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
        )
        for i, row in zip(index, generated[:, width:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            results[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [results[i] for i in range(len(prompts))]
