# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""SparseMoE: a decoder-only transformer with sparse Mixture-of-Experts MLPs.

Hub-facing file: it is copied next to `config.json` and must import only torch, transformers and its siblings.

Shape legend (torchtitan style): B batch, S sequence, T = B*S tokens, D hidden, E routed experts, K experts per
token, F expert hidden width, H heads, Hd head width. `x_TD` is a (T, D) tensor.

Reference numerics: transformers' Mixtral / Qwen3-MoE / DeepSeek-V3. Routing runs in fp32; the weighted combine of
the K expert outputs of a token is a fixed-order sum (deterministic on every device).
"""

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import OutputRecorder, capture_outputs, maybe_install_capturing_hooks

from .configuration_sparse_moe import SparseMoEConfig
from .moe_primitives import KeepBuffersFp32
from .int8_experts import prepare_int8_layout
from .moe_dispatch import SPARSE_MOE_EXPERTS  # importing registers the "sparse_moe" experts implementation
from .quantization import (
    adopt_lora_wrapper,
    after_from_pretrained,
    dequantize_model,
    is_quantized_experts,
    pack_on_arrival,
    prepare_quantized_layout,
    quantized_experts_forward,
)


# ----------------------------------------------------------------------------------- transformers 5.x compatibility
# NOTE: a Hub folder runs on the transformers its user or engine has, not ours: vLLM pins 5.16-5.19. transformers 5.24
# renamed `past_key_values` to `cache` in the mask builders and the model outputs (generate() and the layers' keyword
# are bridged by `deprecate_kwarg` below). Both spellings are detected here, once; the floor is pyproject's.
def _cache_kwarg(parameters) -> str:
    return "cache" if "cache" in parameters else "past_key_values"


_MASK_CACHE_KWARG = _cache_kwarg(inspect.signature(create_causal_mask).parameters)
_OUTPUT_CACHE_FIELD = _cache_kwarg(MoeModelOutputWithPast.__dataclass_fields__)


def _with_cache(output_class, cache, **fields):
    """`output_class(..., cache=cache)` under the cache field's name in the installed transformers."""
    return output_class(**fields, **{_OUTPUT_CACHE_FIELD: cache})


def _output_cache(outputs):
    return getattr(outputs, _OUTPUT_CACHE_FIELD)


def _accepts_past_key_values(forward):
    """Let `forward(cache=...)` take `past_key_values=` too: a deprecated spelling where transformers says `cache`;
    before 5.24 the one generate() passes, so it is renamed without a warning there (nothing for the user to change)."""
    if _OUTPUT_CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def renamed(*args, past_key_values=None, **kwargs):
        if past_key_values is not None and kwargs.get("cache") is None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    return renamed


# ----------------------------------------------------------------------------------------------------------- outputs
@dataclass
class SparseMoEModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus the routing decisions of every MoE layer.

    router_indices: per MoE layer, (T, K) experts chosen before capacity dropping.
    router_dropped: per MoE layer, (T, K) bool mask of assignments dropped for capacity (training only) or skipped
        by `router_skip_threshold`.
    """

    router_indices: tuple[torch.Tensor, ...] | None = None
    router_dropped: tuple[torch.Tensor, ...] | None = None


@dataclass
class SparseMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss and the fraction of expert assignments dropped."""

    z_loss: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | None = None
    router_indices: tuple[torch.Tensor, ...] | None = None


# ------------------------------------------------------------------------------------------------------ basic layers
class SparseMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class SparseMoERotaryEmbedding(nn.Module):
    def __init__(self, config: SparseMoEConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: SparseMoEConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, Hd) -> (B, Hkv * n_rep, S, Hd)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class SparseMoEAttention(nn.Module):
    """GQA self-attention with RoPE, optional qk-norm (per head or full width) and sliding window."""

    def __init__(self, config: SparseMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_width, kv_width = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_out_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":  # Qwen3-MoE: one norm shared by all heads, over Hd
            self.q_norm = SparseMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = SparseMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
        elif config.qk_norm == "full":  # OLMoE: over the concatenated heads, before splitting them
            self.q_norm = SparseMoERMSNorm(q_width, eps=config.rms_norm_eps)
            self.k_norm = SparseMoERMSNorm(kv_width, eps=config.rms_norm_eps)
        self.sliding_window = config.sliding_window

    @_accepts_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states, key_states = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if self.qk_norm == "full":
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.view(hidden_shape), key_states.view(hidden_shape)
        if self.qk_norm == "head":
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)  # (B, H, S, Hd)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class SparseMoEMLP(nn.Module):
    """Dense gated MLP: used for dense layers and for the (fused) shared experts."""

    def __init__(self, config: SparseMoEConfig, intermediate_size: int | None = None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------------------- routing
class SparseMoERouter(KeepBuffersFp32, nn.Module):
    """Top-k router: softmax (Mixtral/Qwen/OLMoE) or sigmoid with a correction bias and group-limited selection
    (DeepSeek-V3), plus capacity dropping in training.

    Returns `(router_logits_TE, top_k_weights_TK, top_k_index_TK, dropped_TK)`:
      - `router_logits_TE` fp32 logits (recorded as `router_logits`),
      - `top_k_weights_TK` fp32 combine weights, 0 for dropped assignments,
      - `top_k_index_TK` the chosen experts (before dropping),
      - `dropped_TK` bool mask of assignments over capacity or below `router_skip_threshold`, or `None` when nothing
        can be dropped.
    """

    # NOTE: `model.to(torch.bfloat16)` would cast these buffers too: in bf16, bias updates of 1e-3 vanish once |bias|
    # nears 0.5 and loads above 256 round, so the balancing silently stops. Keep them fp32 (from_pretrained does the
    # same through `_keep_in_fp32_modules_strict`).
    _fp32_buffers = ("e_score_correction_bias", "expert_load")

    def __init__(self, config: SparseMoEConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.router_type = config.router_type
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        # NOTE: the bias shifts which experts are *chosen*; the combine weights come from the unbiased scores.
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
        # Assignments per expert in training forwards since the last `update_router_biases` (which resets it), so a
        # step with gradient accumulation balances on all of its micro-batches.
        self.expert_load = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)

    def scores(self, router_logits_TE: torch.Tensor) -> torch.Tensor:
        if self.router_type == "sigmoid":
            return router_logits_TE.sigmoid()
        return router_logits_TE.softmax(dim=-1)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Chosen experts (T, K): top-k of the biased scores, restricted to the best `topk_group` groups."""
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.n_group > 1:
            num_tokens = choice_TE.shape[0]
            per_group = self.num_experts // self.n_group
            choice_TGe = choice_TE.view(num_tokens, self.n_group, per_group)
            group_scores_TG = choice_TGe.topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores_TG, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_idx, True)
            expert_mask_TE = group_mask_TG.unsqueeze(-1).expand(-1, -1, per_group).reshape(num_tokens, -1)
            choice_TE = choice_TE.masked_fill(~expert_mask_TE, float("-inf"))
        return torch.topk(choice_TE, self.top_k, dim=-1)[1]

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.config.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def over_capacity(self, top_k_index_TK: torch.Tensor) -> torch.Tensor:
        """Bool (T, K): assignments beyond their expert's capacity. Priority: every token's first choice, in token
        order, then every second choice, ... (GShard / Switch)."""
        num_tokens, top_k = top_k_index_TK.shape
        expert_of_A = top_k_index_TK.t().reshape(-1)  # (A = K*T,) in priority order
        sorted_experts_A, order_A = torch.sort(expert_of_A, stable=True)
        # NOTE: `searchsorted`, not `bincount`: a static (E,) shape, so this compiles in one graph (fullgraph).
        expert_ids_E = torch.arange(self.num_experts, device=expert_of_A.device, dtype=sorted_experts_A.dtype)
        segment_start_E = torch.searchsorted(sorted_experts_A, expert_ids_E)
        rank_sorted_A = torch.arange(expert_of_A.numel(), device=expert_of_A.device) - segment_start_E[sorted_experts_A]
        rank_A = torch.empty_like(rank_sorted_A).scatter_(0, order_A, rank_sorted_A)
        return (rank_A >= self.capacity(num_tokens)).view(top_k, num_tokens).t()

    def forward(self, hidden_states: torch.Tensor):
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        if self.training and self.config.router_jitter_noise > 0:
            noise = self.config.router_jitter_noise
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - noise, 1.0 + noise)
        # NOTE: under autocast F.linear would run in bf16/fp16 even on fp32 inputs; routing needs fp32 logits.
        # (The context is entered only when needed: it costs ~7 us, a few percent of a decode step's MoE block.)
        if torch.is_autocast_enabled(x_TD.device.type):
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                router_logits_TE = F.linear(x_TD.float(), self.weight.float())
        else:
            router_logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = self.scores(router_logits_TE)
        top_k_index_TK = self.select(scores_TE)
        top_k_weights_TK = scores_TE.gather(1, top_k_index_TK)
        skipped_TK = None
        if self.config.router_skip_threshold > 0:
            # NAEE (arXiv 2402.14800): skip a chosen expert whose score is below a fraction of the token's top score;
            # it becomes a dropped assignment (weight 0, the experts skip it), the rest renormalised below.
            top_TK = top_k_weights_TK.amax(dim=-1, keepdim=True)
            skipped_TK = top_k_weights_TK < self.config.router_skip_threshold * top_TK
            top_k_weights_TK = top_k_weights_TK.masked_fill(skipped_TK, 0.0)
        if self.norm_topk_prob:
            top_k_weights_TK = top_k_weights_TK / (top_k_weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            top_k_weights_TK = top_k_weights_TK * self.routed_scaling_factor

        dropped_TK = None
        if self.training:
            with torch.no_grad():  # NOTE: index_add_, not bincount: a static shape (compiles in one graph)
                index_A = top_k_index_TK.reshape(-1)
                self.expert_load.index_add_(0, index_A, torch.ones_like(index_A, dtype=self.expert_load.dtype))
            if self.config.capacity_factor is not None:
                dropped_TK = self.over_capacity(top_k_index_TK)
                top_k_weights_TK = top_k_weights_TK.masked_fill(dropped_TK, 0.0)
        if skipped_TK is not None:
            dropped_TK = skipped_TK if dropped_TK is None else dropped_TK | skipped_TK
        return router_logits_TE, top_k_weights_TK, top_k_index_TK, dropped_TK


# ----------------------------------------------------------------------------------------------------------- experts
# Experts implementations that skip an index equal to `num_experts` (our "dropped" sentinel). Others get the dropped
# assignment's original expert with weight 0: same result, wasted compute.
SENTINEL_AWARE_EXPERTS = {None, "eager", SPARSE_MOE_EXPERTS}


@use_experts_implementation
class SparseMoEExperts(nn.Module):
    """E gated experts stored as 3D tensors: `gate_up_proj` (E, 2F, D) = [gate; up], `down_proj` (E, D, F).

    This forward is the eager reference: a loop over experts that received tokens. Fast paths registered in
    transformers' `ExpertsInterface` replace it through `config._experts_implementation`.
    """

    is_sparse_moe_experts = True  # how the quantization files below this one recognise it (quantization.py)

    def __init__(self, config: SparseMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def __setattr__(self, name, value):
        # a 4-bit load of a full-precision checkpoint packs each stack as the loader sets it (quantization.py)
        if not pack_on_arrival(self, name, value):
            super().__setattr__(name, value)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if is_quantized_experts(self):  # 4-bit experts (quantization.py): packed weights, dequantized per expert
            return quantized_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        num_tokens, top_k = top_k_index.shape
        out_TKD = hidden_states.new_zeros(num_tokens, top_k, self.hidden_dim)
        for expert_idx in torch.unique(top_k_index).tolist():
            if expert_idx >= self.num_experts:  # dropped assignment (sentinel)
                continue
            token_idx, slot_idx = torch.where(top_k_index == expert_idx)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            y_ND = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            out_TKD = out_TKD.index_put((token_idx, slot_idx), y_ND)
        # Fixed-order fp32 sum over the K slots: deterministic, unlike index_add_ on CUDA.
        out_TD = (out_TKD.float() * top_k_weights.float().unsqueeze(-1)).sum(dim=1)
        return out_TD.to(hidden_states.dtype)


class SparseMoEBlock(nn.Module):
    """Router + routed experts + optional (gated) shared experts. (B, S, D) -> (B, S, D)."""

    def __init__(self, config: SparseMoEConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.gate = SparseMoERouter(config)
        self.experts = SparseMoEExperts(config)
        self.shared_experts = (
            SparseMoEMLP(config, config.shared_expert_intermediate_size) if config.num_shared_experts > 0 else None
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def __setattr__(self, name, value):
        if name == "experts":  # PEFT installs LoRA here; on 4-bit experts it needs the per-expert path (quantization.py)
            adopt_lora_wrapper(value)
        super().__setattr__(name, value)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        x_TD = hidden_states.reshape(-1, hidden_dim)
        _, top_k_weights_TK, top_k_index_TK, dropped_TK = self.gate(x_TD)
        # NOTE: transformers' expert-parallel dispatch (`_is_expert_parallel`) sizes its exchange by the global expert
        # count; a dropped assignment keeps its expert there, with weight 0.
        sentinel_ok = self.config._experts_implementation in SENTINEL_AWARE_EXPERTS
        if dropped_TK is not None and sentinel_ok and not getattr(self.experts, "_is_expert_parallel", False):
            top_k_index_TK = top_k_index_TK.masked_fill(dropped_TK, self.num_experts)
        out_TD = self.experts(x_TD, top_k_index_TK, top_k_weights_TK)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        return out_TD.reshape(batch_size, seq_len, hidden_dim)


# ------------------------------------------------------------------------------------------------------------ losses
def _token_mask(attention_mask: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """Flatten a 2D (B, L) padding mask to the (B*S,) rows of the router, S = num_rows / B. During cached generation
    L covers past tokens too, so the last S columns belong to this forward pass."""
    if attention_mask is None or attention_mask.dim() != 2 or num_rows % attention_mask.shape[0] != 0:
        return None
    seq_len = num_rows // attention_mask.shape[0]
    if seq_len > attention_mask.shape[1]:
        return None
    return attention_mask[:, -seq_len:].reshape(-1).float()


def router_probabilities(router_logits: torch.Tensor, router_type: str) -> torch.Tensor:
    """Per-token distribution over experts used by the balancing loss: softmax, or normalised sigmoid scores
    (DeepSeek-V3's affinity normalisation)."""
    if router_type == "sigmoid":
        scores = router_logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)
    return router_logits.float().softmax(dim=-1)


def _load_balancing_sums(router_logits, router_indices, num_experts, router_type, attention_mask):
    """Per MoE layer, over non-padding rows: assignments per expert (L, E), summed router probabilities per expert
    (L, E) and the number of rows (L,). Counts carry no gradient; the probability sums do."""
    device = router_logits[0].device
    tokens, probs, rows = [], [], []
    for logits_TE, index_TK in zip(router_logits, router_indices):
        probs_TE = router_probabilities(logits_TE, router_type)
        mask_T = _token_mask(attention_mask, logits_TE.shape[0])
        if mask_T is None:
            mask_T = torch.ones(logits_TE.shape[0], dtype=torch.float32, device=device)
        mask_T = mask_T.to(device)
        index_TK = index_TK.to(device)
        tokens.append(torch.zeros(num_experts, dtype=torch.float32, device=device).scatter_add(
            0, index_TK.reshape(-1), mask_T.repeat_interleave(index_TK.shape[1])
        ))
        probs.append((probs_TE * mask_T.unsqueeze(-1)).sum(dim=0))
        rows.append(mask_T.sum())
    return torch.stack(tokens), torch.stack(probs), torch.stack(rows)


def _z_loss_sums(router_logits, attention_mask):
    """Pooled over layers: the sum of logsumexp(router logits)^2 over non-padding rows, and the number of rows."""
    device = router_logits[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits_TE in router_logits:
        z_T = torch.logsumexp(logits_TE.float(), dim=-1).pow(2)
        mask_T = _token_mask(attention_mask, logits_TE.shape[0])
        if mask_T is None:
            mask_T = torch.ones_like(z_T)
        mask_T = mask_T.to(device)
        total = total + (z_T * mask_T).sum()
        rows = rows + mask_T.sum()
    return total, rows


def _balance_from_sums(tokens_LE, probs_LE, rows_L, num_experts, scope="pooled"):
    """E * sum_e f_e * P_e from per-layer sums: of the counts pooled over layers (`scope="pooled"`, Mixtral), or
    the mean over layers of each layer's own value (`"per_layer"`, Switch / GShard / DeepSeek)."""
    if scope == "pooled":
        tokens_LE, probs_LE = tokens_LE.sum(0, keepdim=True), probs_LE.sum(0, keepdim=True)
        rows_L = rows_L.sum(0, keepdim=True)
    rows_L1 = rows_L.clamp(min=1.0).unsqueeze(-1)
    return (num_experts * torch.sum((tokens_LE / rows_L1) * (probs_LE / rows_L1), dim=-1)).mean()


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    router_indices: tuple[torch.Tensor, ...],
    num_experts: int,
    router_type: str = "softmax",
    attention_mask: torch.Tensor | None = None,
    scope: str = "pooled",
) -> torch.Tensor:
    """Switch Transformer / Mixtral load-balancing loss: E * sum_e f_e * P_e, where f_e is the fraction of top-k
    assignments to expert e (counts sum to K per token) and P_e the mean router probability. `scope="pooled"` counts
    all layers together and equals transformers' `load_balancing_loss_func` for softmax routing; `"per_layer"` is the
    mean over layers of each layer's own loss. Padding positions (attention_mask == 0) are excluded. This is the loss
    of the tokens given; under data parallelism the heads pool f and P over every rank's batch
    (`data_parallel_router_losses`)."""
    sums = _load_balancing_sums(router_logits, router_indices, num_experts, router_type, attention_mask)
    return _balance_from_sums(*sums, num_experts, scope)


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (non-padding) tokens of logsumexp(router logits)^2, pooled over layers."""
    total, rows = _z_loss_sums(router_logits, attention_mask)
    return total / rows.clamp(min=1.0)


def _data_parallel_world() -> int:
    """Ranks of the default process group (1 without torch.distributed). Ranks that hold copies of the same batch
    (tensor / expert parallel replicas) are counted too: they scale every pooled count alike, which cancels out."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """A detached copy of `values` summed over the default process group."""
    values = values.detach().clone()
    torch.distributed.all_reduce(values)
    return values


@dataclass
class RouterLosses:
    """Router losses of one forward pass.

    aux_loss / z_loss: values over the whole data-parallel batch (every rank's tokens pooled).
    penalty: `router_aux_loss_coef * aux + router_z_loss_coef * z` restricted to this rank's tokens: summed over the
        ranks it equals the weighted losses of the whole batch, value and gradient. `None` when nothing is added.
    num_ranks: ranks pooled (1 in a single process, in evaluation, or without labels).
    """

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    num_ranks: int = 1


def data_parallel_router_losses(
    router_logits: tuple[torch.Tensor, ...],
    router_indices: tuple[torch.Tensor, ...],
    config: SparseMoEConfig,
    attention_mask: torch.Tensor | None = None,
    pool_ranks: bool = False,
) -> RouterLosses:
    """Load-balancing and z-losses of the batch that all ranks hold together, with the gradient of this rank's share.

    NOTE: both losses are functions of batch statistics (f_e, P_e, a token mean), so the loss of N ranks x b rows is
    not the mean of N per-rank losses. With `pool_ranks`, one all-reduce sums the assignment counts, row counts,
    probability sums and z sums over the default process group; this rank's share is then
    `E * sum_e f_e * P_e(own rows)` and `sum z(own rows) / rows`: the shares of all ranks add up to the global losses,
    and each share's gradient is exactly the global loss's gradient w.r.t. this rank's router logits."""
    num_experts, scope = config.num_experts, config.router_aux_loss_scope
    tokens_LE, probs_LE, rows_L = _load_balancing_sums(
        router_logits, router_indices, num_experts, config.router_type, attention_mask
    )
    z_sum, z_rows = _z_loss_sums(router_logits, attention_mask)
    num_ranks = _data_parallel_world() if pool_ranks else 1
    if num_ranks == 1:
        aux_share = _balance_from_sums(tokens_LE, probs_LE, rows_L, num_experts, scope)
        z_share = z_sum / z_rows.clamp(min=1.0)
        aux_loss, z_loss = aux_share, z_share
    else:
        num_layers = rows_L.shape[0]
        pooled = _sum_over_ranks(torch.cat([
            tokens_LE.reshape(-1), rows_L, probs_LE.reshape(-1), z_sum.view(1), z_rows.view(1)
        ]))
        all_tokens_LE, all_rows_L, all_probs_LE, all_z, all_z_rows = pooled.split(
            [num_layers * num_experts, num_layers, num_layers * num_experts, 1, 1]
        )
        all_tokens_LE, all_probs_LE = all_tokens_LE.view(num_layers, num_experts), all_probs_LE.view(num_layers, -1)
        all_z_rows = all_z_rows.squeeze(0).clamp(min=1.0)
        # f from every rank's counts, P from this rank's probabilities over every rank's rows: this rank's share.
        aux_share = _balance_from_sums(all_tokens_LE, probs_LE, all_rows_L, num_experts, scope)
        z_share = z_sum / all_z_rows
        # Reported values are the pooled losses; their gradient is this rank's share's.
        aux_pooled = _balance_from_sums(all_tokens_LE, all_probs_LE, all_rows_L, num_experts, scope)
        aux_loss = aux_share + (aux_pooled - aux_share).detach()
        z_loss = z_share + (all_z.squeeze(0) / all_z_rows - z_share).detach()
    penalty = None
    if config.router_aux_loss_coef > 0:
        penalty = config.router_aux_loss_coef * aux_share
    if config.router_z_loss_coef > 0:
        weighted_z = config.router_z_loss_coef * z_share
        penalty = weighted_z if penalty is None else penalty + weighted_z
    return RouterLosses(aux_loss=aux_loss, z_loss=z_loss, penalty=penalty, num_ranks=num_ranks)


@torch.no_grad()
def update_router_biases(model: nn.Module, rate: float | None = None) -> int:
    """DeepSeek-V3 aux-loss-free balancing: for every router, `bias += rate * sign(mean load - load)` using the
    expert loads recorded by the training forwards since the previous call (all micro-batches of a step), then
    resets those loads. Call it after each optimizer step (`training.RouterBiasUpdateCallback` does so for
    `Trainer`). Returns the number of routers updated (0 when the rate is 0).

    Under torch.distributed every rank must call it (Trainer callbacks run on every rank): the loads are summed over
    the default process group first, so every rank applies the update a single process would make for the whole
    batch, and the biases stay identical across ranks. Replicas of the same batch (tensor / expert parallel ranks)
    scale every load alike, which leaves the sign unchanged."""
    routers = [
        module
        for module in model.modules()
        if isinstance(module, SparseMoERouter)
        and (module.config.router_bias_update_rate if rate is None else rate) > 0
    ]
    if not routers:
        return 0
    loads = [router.expert_load.float() for router in routers]
    if _data_parallel_world() > 1:
        # NOTE: one all-reduce for all routers; every rank holds the same routers and rates, so the calls match.
        device = loads[0].device
        pooled_RE = _sum_over_ranks(torch.stack([load_E.to(device) for load_E in loads]))
        loads = [load_E.to(router.expert_load.device) for load_E, router in zip(pooled_RE, routers)]
    updated = 0
    for router, load_E in zip(routers, loads):
        if load_E.sum() == 0:
            continue
        step = router.config.router_bias_update_rate if rate is None else rate
        router.e_score_correction_bias.add_(step * torch.sign(load_E.mean() - load_E))
        router.expert_load.zero_()
        updated += 1
    return updated


# ------------------------------------------------------------------------------------------------------------- model
class SparseMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: SparseMoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = SparseMoEAttention(config, layer_idx)
        self.mlp = SparseMoEBlock(config) if config.is_moe_layer(layer_idx) else SparseMoEMLP(config)
        self.input_layernorm = SparseMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = SparseMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @_accepts_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class SparseMoEPreTrainedModel(PreTrainedModel):
    config_class = SparseMoEConfig
    config: SparseMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SparseMoEDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True  # the compiled experts path is sync-free with static shapes (moe_dispatch.py)
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(SparseMoERouter, index=0),
        "router_indices": OutputRecorder(SparseMoERouter, index=2),
        "router_dropped": OutputRecorder(SparseMoERouter, index=3),
        "hidden_states": SparseMoEDecoderLayer,
        "attentions": SparseMoEAttention,
    }

    def __init__(self, config: SparseMoEConfig, *inputs, **kwargs):
        # NOTE: fields set one by one with setattr are not checked on the spot (see SparseMoEConfig.validate), so
        # every model checks its config here, before any layer is built.
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Read by `DistributedDataParallel` when it wraps the model.

        NOTE: DDP broadcasts rank 0's buffers before every forward. A router's `expert_load` counts this rank's
        assignments since the last bias update (every micro-batch of a step under gradient accumulation): rank 0's
        copy would overwrite them. `update_router_biases` sums them over the ranks instead."""
        return [name for name, _ in self.named_buffers() if name.rpartition(".")[2] == "expert_load"]

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # NOTE: unset means our sort-once dispatch (moe_dispatch.py); "eager" stays available as the reference.
        requested_experts = SPARSE_MOE_EXPERTS if requested_experts is None else requested_experts
        return super().get_correct_experts_implementation(requested_experts)

    def post_init(self):
        super().post_init()
        prepare_quantized_layout(self)  # a saved 4-bit model: packed expert layout, for its checkpoint to fill
        prepare_int8_layout(self)  # a saved int8 model (int8_experts.py): empty int8 modules, likewise

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # NOTE: bitsandbytes' quantizer replaces nn.Linear layers only; with a 4-bit BitsAndBytesConfig the 3D experts
        # are packed as they load (SparseMoEExperts.__setattr__) and recorded here (quantization.py).
        loaded = super().from_pretrained(*args, **kwargs)
        after_from_pretrained(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def dequantize(self, dtype=None):
        # NOTE: transformers' bitsandbytes dequantization unpacks Linear4bit layers only; this unpacks the experts too.
        if getattr(self, "hf_quantizer", None) is None and not getattr(self.config, "expert_quantization", None):
            raise ValueError("You need to first quantize your model in order to dequantize it")
        return dequantize_model(self, dtype)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # NOTE: transformers writes the `auto_map` entry of the saved class only, so a folder saved from the causal LM
        # could not be opened with AutoModelForSequenceClassification(trust_remote_code=True). List every head.
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update({auto: f"{module}.{name}" for auto, name in AUTO_MAP.items()})
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SparseMoEExperts) and not is_quantized_experts(module):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, SparseMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            # NOTE: not in checkpoints (non-persistent), so from_pretrained leaves it uninitialised memory unless
            # zeroed here; the first bias update would then balance on garbage.
            init.zeros_(module.expert_load)


def _check_inputs(config: SparseMoEConfig, input_ids, inputs_embeds, attention_mask, cache, position_ids=None) -> None:
    """Turn bad input into a clear error before it becomes an index error deep inside forward."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    if is_torchdynamo_compiling():
        return
    reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
    if reference.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(reference.shape)}.")
    if reference.shape[1] == 0:
        raise ValueError("Empty sequence: `input_ids` has seq_len 0; give at least one token.")
    if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex()):
        raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
    if inputs_embeds is not None and inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(
            f"`inputs_embeds` has width {inputs_embeds.shape[-1]}; expected hidden_size={config.hidden_size}."
        )
    if input_ids is not None and input_ids.numel() > 0:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"`input_ids` contains ids outside the vocabulary [0, {config.vocab_size}): min {low}, max {high}."
            )
    past = cache.get_seq_length() if cache is not None else 0
    total = past + reference.shape[1]
    # NOTE: engines that pack several sequences into one row (vLLM's Transformers backend) pass their positions: the
    # longest sequence is what RoPE must cover, not the packed row.
    length = int(position_ids.max()) + 1 if position_ids is not None and position_ids.numel() > 0 else total
    if length > config.max_position_embeddings and config.rope_parameters.get("rope_type", "default") == "default":
        raise ValueError(
            f"Sequence length {length} exceeds max_position_embeddings={config.max_position_embeddings}; "
            "truncate the input or build the config with a larger max_position_embeddings / RoPE scaling."
        )
    if attention_mask is not None and attention_mask.dim() not in (2, 4):
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected a 2D padding mask (batch, past + "
            "current tokens) or a 4D mask (batch, 1, query tokens, key tokens)."
        )
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[0] != reference.shape[0] or attention_mask.shape[1] not in (reference.shape[1], total):
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected ({reference.shape[0]}, "
                f"{total}) (batch, past + current tokens)."
            )


class SparseMoEModel(SparseMoEPreTrainedModel):
    def __init__(self, config: SparseMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [SparseMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = SparseMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = SparseMoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()
        # NOTE: transformers installs the output-recording hooks (router logits, ...) on the first forward that
        # records, under a threading lock dynamo cannot trace: a fresh model's first compiled training step would
        # break the graph there (with fullgraph=True: fail). Installed now, every forward is one graph; a hook whose
        # output is not being recorded returns at once.
        maybe_install_capturing_hooks(self)

    @merge_with_config_defaults
    @capture_outputs
    @_accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SparseMoEModelOutputWithPast:
        _check_inputs(self.config, input_ids, inputs_embeds, attention_mask, cache, position_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_KWARG: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return _with_cache(SparseMoEModelOutputWithPast, cache, last_hidden_state=hidden_states)


def _zero_loss_without_targets(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """A mean cross-entropy over zero supervised positions is 0/0 = NaN. Return 0 instead, kept in the graph (zero
    gradients, every parameter still used) so one all-ignored batch cannot poison a training run."""
    if is_torchdynamo_compiling() or bool((targets != ignore_index).any()):
        return loss
    return logits.float().sum() * 0.0


class _RouterLossMixin:
    """Shared by every head: run the base model with router outputs recorded whenever a loss or the user needs them,
    and turn them into the aux loss, z-loss and dropped fraction."""

    def _needs_router_outputs(self, has_labels: bool, output_router_logits: bool | None) -> bool:
        cfg = self.config
        wants_losses = has_labels and (cfg.router_aux_loss_coef > 0 or cfg.router_z_loss_coef > 0)
        return bool(output_router_logits) or wants_losses or (self.training and cfg.capacity_factor is not None)

    def _router_losses(self, outputs, attention_mask, has_labels: bool = False) -> RouterLosses:
        """Aux loss, z-loss, dropped fraction and the penalty to add to the task loss, from recorded router outputs.

        NOTE: only a training forward with labels pools the batch statistics over ranks: every data-parallel engine
        runs those on all ranks in lockstep. An evaluation or a forward without labels never communicates, so a
        forward run on one rank alone cannot hang."""
        logits = outputs.router_logits
        if not logits:
            return RouterLosses()
        losses = data_parallel_router_losses(
            logits, outputs.router_indices, self.config, attention_mask, pool_ranks=self.training and has_labels
        )
        dropped = outputs.router_dropped
        if dropped:
            losses.dropped_fraction = torch.stack([d.float().mean() for d in dropped]).mean()
        return losses

    def _add_router_losses(
        self,
        loss: torch.Tensor | None,
        router: RouterLosses,
        targets: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor | None:
        """`loss + scale * router.penalty`, with the scale that makes the router losses' gradient, after the caller's
        data-parallel reduction, that of one process holding the whole batch.

        NOTE: how callers reduce, read from transformers 5.24 `Trainer` (`_get_num_items_in_batch`, `compute_loss`,
        `training_step`) and DDP / FSDP (gradients are averaged over the N data-parallel ranks):
          - Task loss normalised by `num_items_in_batch` (the causal LM head under `Trainer`): the loss is a token sum
            divided by the supervised tokens of the whole optimizer step, gradient accumulation included, and
            Trainer does not divide it by the accumulation steps. With `average_tokens_across_devices=True` (the
            default) that count is summed over ranks and Trainer multiplies the loss by N, which cancels DDP's mean:
            the step's gradient is the sum of every rank's and micro-batch's. With `False` the count is this rank's
            and nothing is multiplied: the gradient is (1/N) x that sum. Giving the router penalty the weight of
            this micro-batch's supervised tokens (summed over ranks, like the pooled statistics) over
            `num_items_in_batch` fits both: the pooled shares add up to the losses of the global micro-batch,
            weighted by its share of the step's tokens (1 without accumulation). With `False` it is exact when ranks
            hold equally many supervised tokens, the same condition under which the cross-entropy itself is.
          - Task loss that is a per-rank mean (no `num_items_in_batch`: plain loops, the classification heads): the
            gradient is (1/N) x the sum over ranks, so each rank's share is multiplied by N (the ranks pooled).
        In one process both scales are 1 (without accumulation) and this is `loss + penalty`."""
        if loss is None or router.penalty is None:
            return loss
        penalty = router.penalty.to(loss.device)
        if num_items_in_batch is None or targets is None:
            scale = router.num_ranks
        else:
            micro_batch_items = (targets != ignore_index).sum().to(torch.float32)
            if router.num_ranks > 1:
                micro_batch_items = _sum_over_ranks(micro_batch_items)
            step_items = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=micro_batch_items.device)
            scale = (micro_batch_items / step_items.clamp(min=1.0)).to(loss.device)
        return loss + (penalty if isinstance(scale, int) and scale == 1 else scale * penalty)

    def _run_base(self, output_router_logits, has_labels, **model_kwargs):
        record = self._needs_router_outputs(has_labels, output_router_logits)
        outputs = self.model(
            output_router_logits=record, output_router_indices=record, output_router_dropped=record, **model_kwargs
        )
        return outputs, self._router_losses(outputs, model_kwargs.get("attention_mask"), has_labels)


class SparseMoEForCausalLM(_RouterLossMixin, SparseMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: SparseMoEConfig):
        super().__init__(config)
        self.model = SparseMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @_accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SparseMoECausalLMOutputWithPast:
        r"""Causal LM forward. With `labels`, the loss includes `router_aux_loss_coef * aux_loss` and
        `router_z_loss_coef * z_loss` whenever those coefficients are > 0, with or without `output_router_logits`."""
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs, router = self._run_base(
            output_router_logits,
            labels is not None,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            targets = kwargs["shift_labels"] if kwargs.get("shift_labels") is not None else labels[..., 1:]
            ignore_index = kwargs.get("ignore_index", -100)
            loss = _zero_loss_without_targets(loss, logits, targets, ignore_index)
            loss = self._add_router_losses(loss, router, targets, kwargs.get("num_items_in_batch"), ignore_index)

        output = _with_cache(
            SparseMoECausalLMOutputWithPast,
            _output_cache(outputs),
            loss=loss,
            aux_loss=router.aux_loss,
            z_loss=router.z_loss,
            dropped_fraction=router.dropped_fraction,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            router_indices=outputs.router_indices if output_router_logits else None,
        )
        return output if return_dict is not False else output.to_tuple()


def _last_non_pad_positions(config, input_ids, batch_size, device):
    """Index of the rightmost non-padding token per row (works for left and right padding)."""
    if config.pad_token_id is None:
        if batch_size != 1:
            raise ValueError("Sequence classification of batches needs `config.pad_token_id` to find each row's end.")
        return torch.full((batch_size,), -1, device=device, dtype=torch.long)
    if input_ids is None:
        return torch.full((batch_size,), -1, device=device, dtype=torch.long)
    non_pad = (input_ids != config.pad_token_id).to(device, torch.int32)
    positions = torch.arange(input_ids.shape[-1], device=device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


class SparseMoEForSequenceClassification(_RouterLossMixin, SparseMoEPreTrainedModel):
    # NOTE: the loss is a per-batch mean that ignores `num_items_in_batch`. Without this, Trainer (seeing **kwargs)
    # would pass the count, skip the division by the accumulation steps and, under DDP, multiply the loss by the
    # number of processes: a gradient N x accumulation-steps too large.
    accepts_loss_kwargs = False

    def __init__(self, config: SparseMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SparseMoEModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    @_accepts_past_key_values
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits=None,
        return_dict=None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs, router = self._run_base(
            output_router_logits,
            labels is not None,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        last = _last_non_pad_positions(self.config, input_ids, batch_size, logits.device)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
            loss = self._add_router_losses(loss, router)
        output = _with_cache(
            SequenceClassifierOutputWithPast,
            _output_cache(outputs),
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()


class SparseMoEForTokenClassification(_RouterLossMixin, SparseMoEPreTrainedModel):
    accepts_loss_kwargs = False  # a per-batch mean, as in SparseMoEForSequenceClassification

    def __init__(self, config: SparseMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SparseMoEModel(config)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.1)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    @_accepts_past_key_values
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits=None,
        return_dict=None,
        **kwargs,
    ) -> TokenClassifierOutput:
        outputs, router = self._run_base(
            output_router_logits,
            labels is not None,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
            loss = _zero_loss_without_targets(loss, logits, labels, -100)
            loss = self._add_router_losses(loss, router)
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict is not False else output.to_tuple()


class SparseMoEForQuestionAnswering(_RouterLossMixin, SparseMoEPreTrainedModel):
    def __init__(self, config: SparseMoEConfig):
        super().__init__(config)
        self.model = SparseMoEModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    @_accepts_past_key_values
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_router_logits=None,
        return_dict=None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput:
        has_labels = start_positions is not None and end_positions is not None
        outputs, router = self._run_base(
            output_router_logits,
            has_labels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = logits.split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if has_labels:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
            loss = self._add_router_losses(loss, router)
        output = QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()


# Auto class -> head, written into `config.auto_map` by `save_pretrained` for every head at once.
AUTO_MAP = {
    "AutoModel": "SparseMoEModel",
    "AutoModelForCausalLM": "SparseMoEForCausalLM",
    "AutoModelForSequenceClassification": "SparseMoEForSequenceClassification",
    "AutoModelForTokenClassification": "SparseMoEForTokenClassification",
    "AutoModelForQuestionAnswering": "SparseMoEForQuestionAnswering",
}

__all__ = [
    "SparseMoEPreTrainedModel",
    "SparseMoEModel",
    "SparseMoEForCausalLM",
    "SparseMoEForSequenceClassification",
    "SparseMoEForTokenClassification",
    "SparseMoEForQuestionAnswering",
    "SparseMoERouter",
    "SparseMoEExperts",
    "SparseMoEBlock",
    "SparseMoEAttention",
    "SparseMoEDecoderLayer",
    "load_balancing_loss",
    "router_z_loss",
    "data_parallel_router_losses",
    "RouterLosses",
    "update_router_biases",
]
