"""Retrieval: mean-pooled, normalised embeddings ignore padding; recall@k; the example's main() on a saved model."""

import pytest
import torch
from transformers import AutoModel

from modeling_sparse_moe.recipes.data import train_tokenizer
from modeling_sparse_moe.tasks import retrieval

from conftest import tiny_config


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    queries, passages, _ = retrieval.country_retrieval_set("test")
    tokenizer = train_tokenizer(queries + passages, vocab_size=300)
    folder = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), tokenizer


def test_embeddings_are_unit_norm_and_ignore_padding(saved_model):
    folder, tokenizer = saved_model
    model = AutoModel.from_pretrained(folder)
    texts = ["Oslo", "Its capital is Oslo and people pay with the Norwegian Krone."]
    together = retrieval.embed(model, tokenizer, texts)
    alone = torch.cat([retrieval.embed(model, tokenizer, [t]) for t in texts])
    assert together.shape == (2, model.config.hidden_size)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_recall_at_k_counts_gold_rank():
    passages = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0.8, 0, 0.6, 0]])
    # gold passages rank 1st, 2nd (passage 1 scores 0.8 > 0.6) and 2nd (passage 0 scores 0.8 > 0.6)
    recall = retrieval.recall_at_k(queries, passages, [0, 0, 2], ks=(1, 2))
    assert recall == {"recall@1": pytest.approx(1 / 3), "recall@2": 1.0}
    assert retrieval.rank(queries[1], passages).tolist()[:2] == [1, 0]


def test_example_main_ranks_held_out_passages(saved_model):
    folder, _ = saved_model
    result = retrieval.main(["--model_name_or_path", folder, "--query", "What is the capital of Norway?"])
    assert len(result["top_passages"]) == 3 and result["num_passages"] >= 20
    assert result["num_queries"] > result["num_passages"]
    for k in (1, 5, 10):
        assert 0.0 <= result["recall"][f"recall@{k}"] <= 1.0
    assert result["recall"]["recall@10"] >= result["recall"]["recall@1"]
