"""Prompt -> completion with a decoder-only model: encoding with loss on the completion only, a padding collator,
and batched left-padded `generate()`. Used by translation and generative QA.

A training example is `[bos] prompt completion [eos]` with labels -100 on `[bos] prompt`; at inference the model
sees `[bos] prompt` left-padded in a batch and generates until EOS.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


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
    max_new_tokens: int = 64,
    num_beams: int = 1,
    batch_size: int = 16,
    desc: str = "generate",
) -> list[str]:
    """Greedy (num_beams=1) or beam-search completions of `prompts`, in batches left-padded so every row ends at
    the same position. Returns the decoded new tokens, stopping at EOS."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
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
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
        for i, row in zip(index, generated[:, width:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            results[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    outputs = [results[i] for i in range(len(prompts))]
    return outputs
