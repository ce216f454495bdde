# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Fewer experts per token at inference, without retraining.

    from modeling_sparse_moe.compression.routing import set_experts_per_token, set_skip_threshold

    set_experts_per_token(model, 1)                 # top-2 -> top-1 in every MoE layer (config updated: it saves)
    set_experts_per_token(model, 1, layers=[2, 3])  # only MoE layers 2 and 3 (runtime only: not in config.json)
    set_skip_threshold(model, 0.3)                  # NAEE: skip a chosen expert under 0.3 x the top expert's score

Lowering top-k keeps the router's scores; with `norm_topk_prob` the remaining weights are renormalised to sum to 1
(top-1: weight 1), without it they keep their softmax values. A model lowered to k equals a model built with
`num_experts_per_tok=k` and the same weights.
"""

from __future__ import annotations

from torch import nn

from .pruning import moe_blocks


def set_experts_per_token(model: nn.Module, top_k: int, layers: list[int] | None = None) -> nn.Module:
    """Route every token to `top_k` experts in all MoE layers (`layers=None`: `config.num_experts_per_tok` is updated
    too, so the model saves with it) or only in the MoE layers listed (0-based among MoE layers; runtime only)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE blocks to change.")
    config = model.config
    num_experts = blocks[0][1].gate.num_experts
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} must be an integer from 1 to num_experts={num_experts}.")
    if config.n_group > 1 and config.topk_group * (num_experts // config.n_group) < top_k:
        raise ValueError(f"top_k={top_k}: the topk_group={config.topk_group} chosen groups hold only "
                         f"{config.topk_group * (num_experts // config.n_group)} experts.")
    chosen = range(len(blocks)) if layers is None else layers
    for i in chosen:
        if not isinstance(i, int) or not 0 <= i < len(blocks):
            raise ValueError(f"layers: {i!r} is not an MoE layer index in [0, {len(blocks)})")
        blocks[i][1].gate.top_k = top_k
    if layers is None:
        config.num_experts_per_tok = top_k
    return model


def set_skip_threshold(model: nn.Module, threshold: float) -> nn.Module:
    """Set `config.router_skip_threshold` (NAEE gate-threshold skipping; 0 turns it off), validated; returns model."""
    config = model.config
    before = config.router_skip_threshold
    config.router_skip_threshold = threshold
    try:
        config.validate()
    except ValueError:
        config.router_skip_threshold = before
        raise
    return model


__all__ = ["set_experts_per_token", "set_skip_threshold"]
