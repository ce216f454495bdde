"""Dense retrieval with SparseMoE: mean-pooled, L2-normalised last hidden states of `SparseMoEModel` as text
embeddings; cosine ranking; recall@k on a small real set (held-out country questions against their contexts).

    from modeling_sparse_moe.tasks.retrieval import embed, rank
    passages_EN = embed(model, tokenizer, passages)          # (N, D), unit norm
    order = rank(embed(model, tokenizer, [query])[0], passages_EN)
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoModel, AutoTokenizer

from .data import country_qa_dataset

logger = logging.getLogger(__name__)


def base_model(model):
    """The `SparseMoEModel` inside any of our heads (or the model itself)."""
    return getattr(model, "model", model) if not hasattr(model, "embed_tokens") else model


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """(N, D) embeddings: the mean of the last hidden states over real (unpadded) tokens, L2-normalised."""
    encoder = base_model(model).eval()
    device = next(encoder.parameters()).device
    max_length = min(max_length, encoder.config.max_position_embeddings)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(device)
            hidden_BTD = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask_BT1 = batch["attention_mask"].unsqueeze(-1).to(hidden_BTD.dtype)
            mean_BD = (hidden_BTD * mask_BT1).sum(1) / mask_BT1.sum(1).clamp(min=1)
            chunks.append(torch.nn.functional.normalize(mean_BD.float(), dim=-1))
    finally:
        tokenizer.padding_side = side
    return torch.cat(chunks)


def rank(query_D: torch.Tensor, passages_ND: torch.Tensor) -> torch.Tensor:
    """Passage indices, best first, by cosine similarity (embeddings are unit norm)."""
    return torch.argsort(passages_ND @ query_D, descending=True)


def recall_at_k(query_QD: torch.Tensor, passages_ND: torch.Tensor, gold_Q: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Fraction of queries whose gold passage is among the k most similar, for each k."""
    scores_QN = query_QD @ passages_ND.T
    gold = torch.tensor(gold_Q)
    gold_scores = scores_QN[torch.arange(len(gold)), gold]
    position_Q = (scores_QN > gold_scores[:, None]).sum(1)  # passages ranked above the gold one
    return {f"recall@{k}": float((position_Q < k).float().mean()) for k in ks}


def country_retrieval_set(split: str = "test") -> tuple[list[str], list[str], list[int]]:
    """Queries (answerable questions of the held-out countries), passages (their distinct contexts) and each
    query's gold passage index."""
    ds = country_qa_dataset()[split]
    passages = list(dict.fromkeys(ds["context"]))
    index = {p: i for i, p in enumerate(passages)}
    queries, gold = [], []
    for row in ds:
        queries.append(row["question"])
        gold.append(index[row["context"]])
    return queries, passages, gold


def main(argv: list[str] | None = None) -> dict:
    """Rank the held-out country passages for `--query` and score recall@k over all held-out questions."""
    parser = argparse.ArgumentParser(description="Rank passages with SparseMoE embeddings; recall@k.")
    parser.add_argument("--model_name_or_path", required=True, help="A saved SparseMoE folder with its tokenizer.")
    parser.add_argument("--query", default="What is the capital of Norway?")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(args.model_name_or_path)
    queries, passages, gold = country_retrieval_set(args.split)
    passages_ND = embed(model, tokenizer, passages)
    query_D = embed(model, tokenizer, [args.query])[0]
    order = rank(query_D, passages_ND)[: args.top].tolist()
    recall = recall_at_k(embed(model, tokenizer, queries), passages_ND, gold)
    chance = {f"recall@{k}": min(k / len(passages), 1.0) for k in (1, 5, 10)}
    return {"query": args.query, "top_passages": [passages[i] for i in order], "recall": recall,
            "chance": chance, "num_queries": len(queries), "num_passages": len(passages)}
