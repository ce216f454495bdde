import os

import pytest
import torch

import modeling_sparse_moe  # noqa: F401  (registers the Auto classes)
from modeling_sparse_moe import SparseMoEConfig

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides) -> SparseMoEConfig:
    """A 2-layer, 4-expert model small enough for CPU unit tests."""
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    return SparseMoEConfig(**kwargs)


@pytest.fixture
def config():
    return tiny_config()
