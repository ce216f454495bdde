# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Every native family's rules, in one place that conversion (`conversion.py`) and export (`export.py`) both use.

For each transformers MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4-MoE) and each dense family that
upcycles (Llama, Mistral, Qwen2, Qwen3):
    config mapping, both ways     `sparse_config_from_hf`, `hf_config_from_sparse`, `upcycle_config`
    what a family cannot hold     `family_problems` (transformers), `gguf_problems` (its llama.cpp architecture),
                                  `correction_bias_problems` (a router's selection bias, held by GLM-4-MoE only)
    which family to export to     `pick_family` (`FAMILY_PREFERENCE`, `GGUF_ARCHITECTURES`)
    tensor names                  `_plan_from_hf` / `_plan_to_hf` (in memory), `_FamilyView` / `_family_disk_items`
                                  (the per-expert on-disk layout of each family's `save_pretrained` and of engines)

Not Hub-facing: it may import anything installed.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from transformers import PreTrainedConfig
from transformers.initialization import no_init_weights
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging

from ..configuration_sparse_moe import SparseMoEConfig
from ..modeling_sparse_moe import SparseMoEForCausalLM
from .safetensors_io import Recipe


logger = logging.get_logger(__name__)

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe")
# Families whose router keeps a selection-only `e_score_correction_bias` (ours carries over); the others have none.
_BIASED_ROUTER_FAMILIES = ("glm4_moe",)
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_EXPERTS_KEY = re.compile(r"(?P<layer>.+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)")

# Tried in this order when the family is "auto": the most widely served first (Mixtral runs everywhere).
FAMILY_PREFERENCE = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe")
# llama.cpp architecture of each family (gguf.MODEL_ARCH_NAMES spelling).
GGUF_ARCHITECTURES = {
    "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe", "glm4_moe": "glm4moe",
}  # fmt: skip


# ========================================================================================== config mapping and problems
def sparse_config_from_hf(hf_config: PreTrainedConfig) -> SparseMoEConfig:
    """The `SparseMoEConfig` equivalent to a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE config; `ValueError` listing every
    feature it cannot express."""
    family = hf_config.model_type
    if family not in MOE_FAMILIES:
        hint = " Dense models enter through `upcycle` (--upcycle)." if family in DENSE_FAMILIES else ""
        raise ValueError(
            f"from_hf supports model_type in {MOE_FAMILIES}, got {family!r}.{hint} DeepSeek-V2/V3 use MLA attention, "
            "which SparseMoE does not implement."
        )
    problems: list[str] = []
    fields = _transformer_fields(hf_config, problems)
    fields.update(
        num_experts_per_tok=hf_config.num_experts_per_tok,
        router_aux_loss_coef=getattr(hf_config, "router_aux_loss_coef", SparseMoEConfig.router_aux_loss_coef),
        output_router_logits=hf_config.output_router_logits,
        router_type="softmax",
    )
    if family == "glm4_moe":
        fields.update(_glm4_moe_sparse_fields(hf_config, problems))
    elif family == "mixtral":
        fields.update(
            num_experts=hf_config.num_local_experts,
            moe_intermediate_size=hf_config.intermediate_size,
            intermediate_size=hf_config.intermediate_size,  # unused: every Mixtral layer is MoE
            norm_topk_prob=True,
            # NOTE: Mixtral jitters the input of router *and* experts; SparseMoE jitters the router input only.
            # Training-time only; inference is unaffected.
            router_jitter_noise=hf_config.router_jitter_noise,
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        fields.update(
            num_experts=hf_config.num_experts,
            moe_intermediate_size=hf_config.moe_intermediate_size,
            intermediate_size=hf_config.intermediate_size,
            norm_topk_prob=hf_config.norm_topk_prob,
            moe_layer_freq=hf_config.decoder_sparse_step,
            mlp_only_layers=[i for i in hf_config.mlp_only_layers or [] if 0 <= i < hf_config.num_hidden_layers],
        )
        if family == "qwen2_moe":
            fields.update(
                attention_bias=hf_config.qkv_bias,
                attention_out_bias=False,
                num_shared_experts=1,
                shared_expert_intermediate_size=hf_config.shared_expert_intermediate_size,
                shared_expert_gate=True,
            )
        else:
            fields.update(attention_bias=hf_config.attention_bias, qk_norm="head")
    elif family == "olmoe":
        fields.update(
            num_experts=hf_config.num_experts,
            moe_intermediate_size=hf_config.intermediate_size,
            intermediate_size=hf_config.intermediate_size,
            norm_topk_prob=hf_config.norm_topk_prob,
            attention_bias=hf_config.attention_bias,
            qk_norm="full",
        )
        if hf_config.clip_qkv is not None:
            problems.append(f"clip_qkv={hf_config.clip_qkv}: clamping of q/k/v activations")
        if fields["head_dim"] != hf_config.hidden_size // hf_config.num_attention_heads:
            problems.append(f"head_dim={fields['head_dim']} != hidden_size // num_attention_heads with full qk-norm")
    _raise_if(problems, f"Cannot convert this {family} checkpoint to SparseMoE")
    return SparseMoEConfig(**fields)


def hf_config_from_sparse(
    config: SparseMoEConfig, family: str, extra_problems: list[str] | None = None
) -> PreTrainedConfig:
    """The `family` config equivalent to a `SparseMoEConfig`; `ValueError` listing every feature `family` cannot
    express (plus `extra_problems`, e.g. from `correction_bias_problems`)."""
    _check_family(family, MOE_FAMILIES, "hf_config_from_sparse")
    problems = list(extra_problems or [])
    n = config.num_hidden_layers
    window = config.sliding_window
    problems += _glm4_moe_problems(config) if family == "glm4_moe" else _softmax_family_problems(config, family)
    _raise_if(problems, f"Cannot express this SparseMoE model as {family}")

    dropped = [
        f"{name}={getattr(config, name)}"
        for name, off in (
            ("capacity_factor", None),
            ("router_z_loss_coef", 0),
            ("router_bias_update_rate", 0),
            ("router_jitter_noise", 0),
        )
        if getattr(config, name) != off and not (family == "mixtral" and name == "router_jitter_noise")
    ]
    if dropped:
        logger.warning(f"to_hf({family!r}) drops training-only settings {family} has no field for: {dropped}")

    fields = dict(
        _common_fields(config),
        num_hidden_layers=n,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=config.router_aux_loss_coef,
        output_router_logits=config.output_router_logits,
    )
    if family == "glm4_moe":
        # NOTE: GLM-4-MoE rotates half of each head by default (`partial_rotary_factor=0.5`); SparseMoE all of it.
        # Its config has no `head_dim` field but its attention reads one when set; it has no MTP layers here.
        fields["rope_parameters"]["partial_rotary_factor"] = 1.0
        fields.update(
            n_routed_experts=config.num_experts,
            moe_intermediate_size=config.moe_intermediate_size,
            intermediate_size=config.intermediate_size,
            # NOTE: GLM-4-MoE always has shared experts; a model without any gets one whose weights are all zero: its
            # output is exactly 0, so the logits are the same (serving computes one expert more per token).
            n_shared_experts=_glm4_moe_shared_count(config),
            first_k_dense_replace=min(config.first_k_dense_replace, n),
            n_group=config.n_group,
            topk_group=config.topk_group,
            routed_scaling_factor=config.routed_scaling_factor,
            norm_topk_prob=config.norm_topk_prob,
            use_qk_norm=config.qk_norm == "head",
            attention_bias=config.attention_bias,
            num_nextn_predict_layers=0,
            partial_rotary_factor=1.0,
        )
    elif family == "mixtral":
        fields.update(
            num_local_experts=config.num_experts,
            intermediate_size=config.moe_intermediate_size,
            sliding_window=window,
            router_jitter_noise=config.router_jitter_noise,
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        # Qwen has no first_k_dense_replace; listing those layers in mlp_only_layers is the same structure.
        mlp_only = sorted(set(config.mlp_only_layers) | set(range(min(config.first_k_dense_replace, n))))
        fields.update(
            num_experts=config.num_experts,
            moe_intermediate_size=config.moe_intermediate_size,
            intermediate_size=config.intermediate_size,
            decoder_sparse_step=config.moe_layer_freq,
            mlp_only_layers=mlp_only,
            norm_topk_prob=config.norm_topk_prob,
            use_sliding_window=window is not None,
        )
        if window is not None:
            fields["sliding_window"] = window
        if family == "qwen2_moe":
            # Qwen2-MoE picks sliding layers from `layer_types`; SparseMoE's window applies to every layer.
            fields.update(
                qkv_bias=config.attention_bias,
                shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                layer_types=["sliding_attention" if window is not None else "full_attention"] * n,
                max_window_layers=n,
            )
        else:
            fields["attention_bias"] = config.attention_bias
    else:  # olmoe
        fields.update(
            num_experts=config.num_experts,
            intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            attention_bias=config.attention_bias,
            clip_qkv=None,
        )
    hf_config = CONFIG_MAPPING[family](**fields)
    hf_config.dtype = config.dtype
    if family == "glm4_moe" and config.num_shared_experts == 0:
        logger.warning("to_hf('glm4_moe'): the model has no shared experts; glm4_moe always has one, so it gets an "
                       "all-zero shared expert (same logits, one more expert computed per token when served).")
    if family == "glm4_moe":
        # NOTE: also saved at the top level of config.json, where engines (vLLM's Glm4Moe) and older transformers
        # look for it, with 0.5 as their default.
        hf_config.partial_rotary_factor = 1.0
    return hf_config


def family_problems(config: SparseMoEConfig, family: str, source=None) -> list[str]:
    """Every feature of `config` (and, given its tensors `source`, of its router biases) that `family` cannot express;
    empty when `to_hf(model, family)` gives the same logits. Training-only settings are not problems."""
    _check_family(family, MOE_FAMILIES, "family_problems")
    problems = _bias_problems(family, config, source) if source is not None else []
    return problems + (_glm4_moe_problems(config) if family == "glm4_moe" else _softmax_family_problems(config, family))


def _softmax_family_problems(config: SparseMoEConfig, family: str) -> list[str]:
    """What Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE cannot express of `config` (see `hf_config_from_sparse`)."""
    problems: list[str] = []
    n = config.num_hidden_layers
    dense_layers = [i for i in range(n) if not config.is_moe_layer(i)]
    window = config.sliding_window
    # Routing every family shares: softmax top-k, no scaling, no group limit.
    if config.router_type != "softmax":
        problems.append(f"router_type={config.router_type!r}: {family} routes with a softmax")
    if config.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={config.routed_scaling_factor}: {family} does not scale routed weights")
    if config.n_group > 1 and config.topk_group < config.n_group:
        problems.append(f"n_group={config.n_group}/topk_group={config.topk_group}: group-limited routing")
    if config.qk_norm != {"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"):
        want = {"qwen3_moe": "'head' (always on)", "olmoe": "'full' (always on)"}.get(family, "'none'")
        problems.append(f"qk_norm={config.qk_norm!r}: {family} has qk_norm {want}")
    if family == "qwen2_moe":
        if config.num_shared_experts == 0 or not config.shared_expert_gate:
            problems.append(
                f"num_shared_experts={config.num_shared_experts}, shared_expert_gate={config.shared_expert_gate}: "
                "qwen2_moe always has one sigmoid-gated shared expert"
            )
        if config.attention_out_bias:
            problems.append("attention_out_bias=True: qwen2_moe has q/k/v bias but no o_proj bias")
    else:
        if config.num_shared_experts > 0:
            problems.append(f"num_shared_experts={config.num_shared_experts}: {family} has no shared experts")
        if family != "mixtral" and config.attention_bias != config.attention_out_bias:
            problems.append(
                f"attention_bias={config.attention_bias} with attention_out_bias={config.attention_out_bias}: "
                f"{family} has one bias flag for q, k, v and o"
            )
        if family == "mixtral" and (config.attention_bias or config.attention_out_bias):
            problems.append("attention_bias=True: mixtral attention has no biases")
    if family in ("mixtral", "olmoe") and dense_layers:
        problems.append(
            f"dense MLP layers {dense_layers} (first_k_dense_replace={config.first_k_dense_replace}, "
            f"moe_layer_freq={config.moe_layer_freq}, mlp_only_layers={config.mlp_only_layers}): "
            f"every {family} layer is an MoE layer"
        )
    if family == "mixtral" and not config.norm_topk_prob:
        problems.append("norm_topk_prob=False: mixtral always renormalises the top-k weights")
    if family == "olmoe":
        if window is not None:
            problems.append(f"sliding_window={window}: olmoe has full causal attention only")
        if config.head_dim != config.hidden_size // config.num_attention_heads:
            problems.append(f"head_dim={config.head_dim}: olmoe needs head_dim == hidden_size // num_attention_heads")
    return problems


def _glm4_moe_problems(config: SparseMoEConfig) -> list[str]:
    """What GLM-4-MoE (`Glm4MoeForCausalLM`: sigmoid routing with a correction bias, group-limited top-k, scaling,
    ungated shared experts, leading dense layers, optional per-head qk-norm) cannot express of `config`."""
    problems: list[str] = []
    n = config.num_hidden_layers
    if config.router_type != "sigmoid":
        problems.append(f"router_type={config.router_type!r}: glm4_moe routes with a sigmoid")
    if config.num_experts // config.n_group < 2:
        problems.append(f"n_group={config.n_group}: glm4_moe scores a group by its top-2 experts, so groups need >= 2")
    if config.num_shared_experts > 0 and config.shared_expert_intermediate_size % config.moe_intermediate_size:
        problems.append(
            f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}: glm4_moe's shared MLP is "
            f"n_shared_experts * moe_intermediate_size ({config.moe_intermediate_size}) wide"
        )
    if config.shared_expert_gate:
        problems.append("shared_expert_gate=True: glm4_moe's shared experts are not gated")
    leading = list(range(min(config.first_k_dense_replace, n)))
    dense_layers = [i for i in range(n) if not config.is_moe_layer(i)]
    if dense_layers != leading:
        problems.append(
            f"dense MLP layers {dense_layers} (moe_layer_freq={config.moe_layer_freq}, mlp_only_layers="
            f"{config.mlp_only_layers}): glm4_moe's dense layers are the first first_k_dense_replace only"
        )
    if config.qk_norm == "full":
        problems.append("qk_norm='full': glm4_moe's optional qk-norm is per head ('head')")
    if config.attention_out_bias:
        problems.append("attention_out_bias=True: glm4_moe has q/k/v bias but no o_proj bias")
    if config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window}: glm4_moe has full causal attention only")
    return problems


def _glm4_moe_shared_count(config: SparseMoEConfig) -> int:
    """GLM-4-MoE's `n_shared_experts`: our fused shared MLP's width in experts, or 1 (all zero) without any."""
    if config.num_shared_experts == 0:
        return 1
    return config.shared_expert_intermediate_size // config.moe_intermediate_size


def _glm4_moe_sparse_fields(hf_config: PreTrainedConfig, problems: list[str]) -> dict:
    """SparseMoEConfig fields of a GLM-4-MoE config (the inverse of `hf_config_from_sparse(..., "glm4_moe")`)."""
    rotary = (hf_config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if rotary != 1.0:
        problems.append(f"partial_rotary_factor={rotary}: SparseMoE rotates every head dimension")
    return dict(
        router_type="sigmoid",
        num_experts=hf_config.n_routed_experts,
        moe_intermediate_size=hf_config.moe_intermediate_size,
        intermediate_size=hf_config.intermediate_size,
        num_shared_experts=hf_config.n_shared_experts,
        shared_expert_intermediate_size=hf_config.moe_intermediate_size * max(hf_config.n_shared_experts, 1),
        first_k_dense_replace=hf_config.first_k_dense_replace,
        n_group=hf_config.n_group,
        topk_group=hf_config.topk_group,
        routed_scaling_factor=hf_config.routed_scaling_factor,
        norm_topk_prob=hf_config.norm_topk_prob,
        qk_norm="head" if hf_config.use_qk_norm else "none",
        attention_bias=hf_config.attention_bias,
        attention_out_bias=False,
    )


def _bias_problems(family: str, config: SparseMoEConfig, source) -> list[str]:
    """`correction_bias_problems`, for the families whose routers have no correction bias."""
    return [] if family in _BIASED_ROUTER_FAMILIES else correction_bias_problems(config, source)


def correction_bias_problems(config: SparseMoEConfig, source) -> list[str]:
    """Routers with a non-zero `e_score_correction_bias` (it shifts expert choice; the families have no such bias)."""
    layers = []
    for i in range(config.num_hidden_layers):
        key = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
        if config.is_moe_layer(i) and key in source and bool(source.get(key).abs().max() > 0):
            layers.append(i)
    return [f"e_score_correction_bias non-zero in layers {layers}: biased expert selection"] if layers else []


def upcycle_config(
    dense_config: PreTrainedConfig, num_experts: int, num_experts_per_tok: int, **overrides
) -> SparseMoEConfig:
    """The `SparseMoEConfig` of an upcycled dense Llama / Mistral / Qwen2 / Qwen3 model: same transformer, every MLP
    replaced by `num_experts` experts of the dense MLP's width; `ValueError` listing what cannot be upcycled."""
    family = dense_config.model_type
    if family not in DENSE_FAMILIES:
        hint = " MoE checkpoints enter through `from_hf` (--from auto)." if family in MOE_FAMILIES else ""
        raise ValueError(f"upcycle supports dense model_type in {DENSE_FAMILIES}, got {family!r}.{hint}")
    problems: list[str] = []
    fields = _transformer_fields(dense_config, problems)
    if family == "llama":
        fields["attention_bias"] = dense_config.attention_bias
        if dense_config.mlp_bias:
            problems.append("mlp_bias=True: SparseMoE experts and MLPs have no biases")
    elif family == "qwen2":
        fields.update(attention_bias=True, attention_out_bias=False)
    elif family == "qwen3":
        fields.update(attention_bias=dense_config.attention_bias, qk_norm="head")
    locked = set(fields) | {"attention_out_bias", "qk_norm", "intermediate_size", "moe_intermediate_size"}
    known = {f.name for f in SparseMoEConfig.__dataclass_fields__.values()}
    for name in sorted(overrides):
        if name in locked:
            problems.append(f"{name}: copied from the dense checkpoint, cannot be overridden")
        elif name not in known:
            problems.append(f"{name}: not a SparseMoEConfig field")
    if overrides.get("num_shared_experts", 0):
        problems.append("num_shared_experts: upcycling initialises routed experts only")
    _raise_if(problems, f"Cannot upcycle this {family} checkpoint")
    fields.update(
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        intermediate_size=dense_config.intermediate_size,
        moe_intermediate_size=dense_config.intermediate_size,
        router_type="softmax",
        norm_topk_prob=True,
    )
    fields.update(overrides)
    return SparseMoEConfig(**fields)


def _transformer_fields(cfg: PreTrainedConfig, problems: list[str]) -> dict:
    """SparseMoEConfig fields shared by every supported family: shapes, RoPE, norms, ids, sliding window."""
    heads = cfg.num_attention_heads
    return dict(
        _common_fields(cfg),
        num_hidden_layers=cfg.num_hidden_layers,
        num_key_value_heads=cfg.num_key_value_heads or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        sliding_window=_uniform_sliding_window(cfg, problems),
        dtype=cfg.dtype,
    )


# Fields with the same name and meaning in SparseMoEConfig and in every supported family's config (both directions).
_COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "attention_dropout", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "use_cache",
)


def _common_fields(cfg: PreTrainedConfig) -> dict:
    """The fields copied as they are between the families, plus RoPE (a copy) and the pad id (see `_pad_id`)."""
    fields = {name: getattr(cfg, name) for name in _COMMON_FIELDS}
    return dict(fields, rope_parameters=copy.deepcopy(dict(cfg.rope_parameters)), pad_token_id=_pad_id(cfg))


def _uniform_sliding_window(cfg: PreTrainedConfig, problems: list[str]) -> int | None:
    """The window when every layer slides, None when none does; a problem when only some do (SparseMoE has one
    window for all layers)."""
    if cfg.model_type == "olmoe":
        return None  # OLMoE builds a plain causal mask whatever its config says
    window = getattr(cfg, "sliding_window", None) or None  # Qwen2-MoE stores 0 for "off"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None or window is None:
        return window
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        problems.append(f"layer_types {unknown}: attention types other than full and sliding")
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if not sliding:
        return None
    if len(sliding) < len(layer_types):
        problems.append(f"sliding window on layers {sliding} only (layer_types): SparseMoE slides on all or none")
    return window


def _pad_id(config) -> int | None:
    """Some Hub configs carry `pad_token_id=-1` (or an id past the vocabulary) to mean "none"; we store None."""
    pad = config.pad_token_id
    return pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None



# ==================================================================================== which family to export to
# One cause, one error: the families that hold a selection bias (GLM-4-MoE, DeepSeek-V3) all score with a sigmoid.
_SOFTMAX_BIAS_MESSAGE = (
    "This model's softmax router has a selection bias ({problem}), from training with router_bias_update_rate > 0 on "
    "router_type='softmax'. No transformers family and no llama.cpp architecture holds a softmax router with a "
    "selection bias, so no export gives the same logits. Retrain with the recipes' default router (router_type="
    "'sigmoid' with router_bias_update_rate > 0, as configs/demo and configs/tiny: it exports as glm4_moe), or with "
    "router_bias_update_rate=0; or serve the SparseMoE folder itself through vLLM's Transformers backend "
    "(--model-impl transformers --trust-remote-code)."
)


def pick_family(config: SparseMoEConfig, source=None, *, gguf: bool = False) -> str:
    """The first family of `FAMILY_PREFERENCE` that holds `config` exactly (with `gguf=True`: whose llama.cpp
    architecture runs it too). `source` (tensors) lets a non-zero router correction bias count. Raises a `ValueError`
    listing each family's reasons and the nearest one's changes when none does."""
    if config.router_type == "softmax" and source is not None and correction_bias_problems(config, source):
        raise ValueError(_SOFTMAX_BIAS_MESSAGE.format(problem=correction_bias_problems(config, source)[0]))
    reasons, without_gguf = {}, []
    for family in FAMILY_PREFERENCE:
        problems = family_problems(config, family, source)
        if gguf and not problems:
            without_gguf.append(family)
            problems = gguf_problems(config, family)
        if not problems:
            return family
        reasons[family] = problems
    nearest = min(reasons, key=lambda family: len(reasons[family]))
    lines = "\n".join(f"  - {family}: " + "; ".join(problems) for family, problems in reasons.items())
    hint = f" Without a GGUF, {without_gguf[0]} holds it." if without_gguf else ""
    raise ValueError(
        f"No transformers family{' with a llama.cpp architecture' if gguf else ''} holds this model exactly:\n{lines}\n"
        f"Nearest: {nearest}, after changing {'; '.join(reasons[nearest])}.{hint} Otherwise serve the SparseMoE "
        "folder itself through vLLM's Transformers backend (--model-impl transformers --trust-remote-code)."
    )


def gguf_problems(config: SparseMoEConfig, family: str) -> list[str]:
    """What llama.cpp's graph for `family`'s architecture computes differently from `config` (beyond what the
    transformers family already refuses): fixed top-k normalisation, every layer MoE, no sliding window, ..."""
    arch = GGUF_ARCHITECTURES[family]
    problems = []
    n = config.num_hidden_layers
    dense = [i for i in range(n) if not config.is_moe_layer(i)]
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        problems.append(f"rope_type={rope_type!r}: written for 'default' and 'linear' RoPE only")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r}: llama.cpp's {arch} experts use SiLU")
    window = config.sliding_window
    if window is not None and window < config.max_position_embeddings:
        problems.append(f"sliding_window={window}: llama.cpp's {arch} attends to the full context")
    if arch in ("qwen2moe", "qwen3moe") and dense:
        problems.append(f"dense MLP layers {dense}: llama.cpp's {arch} makes every layer an MoE layer")
    fixed_norm = {"qwen2moe": False, "olmoe": False, "qwen3moe": True, "llama": True}.get(arch)
    if fixed_norm is not None and config.norm_topk_prob != fixed_norm:
        problems.append(f"norm_topk_prob={config.norm_topk_prob}: llama.cpp's {arch} always uses {fixed_norm}")
    if arch in ("qwen2moe", "olmoe") and config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim={config.head_dim}: llama.cpp's {arch} needs head_dim * heads == hidden_size")
    if arch == "olmoe" and config.attention_bias:
        problems.append("attention_bias=True: llama.cpp's olmoe has no attention biases")
    if arch == "olmoe" and config.num_key_value_heads != config.num_attention_heads:
        problems.append(f"num_key_value_heads={config.num_key_value_heads}: llama.cpp's olmoe k-norm spans "
                        "hidden_size, so it needs num_key_value_heads == num_attention_heads")
    return problems


# ================================================================================================================ plans
def _plan_from_hf(family: str, config: SparseMoEConfig) -> dict[str, Recipe]:
    plan = {}
    for key in _target_keys(SparseMoEForCausalLM, config):
        if key.endswith(".mlp.gate.e_score_correction_bias") and family not in _BIASED_ROUTER_FAMILIES:
            plan[key] = _zeros((config.num_experts,), torch.float32)
        elif family == "qwen2_moe":
            plan[key] = _read(key.replace(".mlp.shared_experts.", ".mlp.shared_expert."))
        else:
            plan[key] = _read(key)
    return plan


def _plan_to_hf(family: str, hf_config: PreTrainedConfig) -> dict[str, Recipe]:
    plan = {}
    for key in _target_keys(_causal_lm_class(family), hf_config):
        if family == "qwen2_moe":
            plan[key] = _read(key.replace(".mlp.shared_expert.", ".mlp.shared_experts."))
        elif family == "glm4_moe" and ".mlp.shared_experts." in key:
            plan[key] = _read_or_zero_shared_expert(key, hf_config)
        else:
            plan[key] = _read(key)
    return plan


def _read_or_zero_shared_expert(key: str, hf_config: PreTrainedConfig) -> Recipe:
    """The shared expert's tensor, or zeros for a model without shared experts (see `hf_config_from_sparse`)."""
    width, hidden = hf_config.moe_intermediate_size * hf_config.n_shared_experts, hf_config.hidden_size
    shape = (hidden, width) if key.endswith("down_proj.weight") else (width, hidden)

    def build(source):
        if key in source:
            return source.get(key)
        return torch.zeros(shape, dtype=source.dtype_of("model.embed_tokens.weight"))

    return build


def _target_keys(model_class, config) -> list[str]:
    """State-dict keys of `model_class(config)`, built on the meta device (no memory); tied copies left out."""
    with torch.device("meta"), no_init_weights():
        model = model_class(copy.deepcopy(config))
    keys = list(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        keys = [key for key in keys if key != "lm_head.weight"]
    return keys


def _read(name: str) -> Recipe:
    return lambda source: source.get(name)


def _zeros(shape, dtype) -> Recipe:
    return lambda source: torch.zeros(shape, dtype=dtype)



# ====================================================================================================== on-disk layouts
class _FamilyView:
    """A family checkpoint seen through its in-memory (fused) names, whichever layout it was saved in."""

    def __init__(self, source, family: str, num_experts: int):
        self.source, self.family, self.num_experts = source, family, num_experts

    def __contains__(self, key: str) -> bool:
        try:
            self._resolve(key)
            return True
        except KeyError:
            return False

    def _resolve(self, key: str):
        """The on-disk name of `key`, or the per-expert names to stack into it."""
        if key in self.source:
            return key
        if self.family == "mixtral" and (legacy := key.replace(".mlp.", ".block_sparse_moe.")) in self.source:
            return legacy
        match = _EXPERTS_KEY.fullmatch(key)
        if match is not None:
            names = [_legacy_expert_names(self.family, match["layer"], e) for e in range(self.num_experts)]
            names = [(gate, up) if match["proj"] == "gate_up_proj" else (down,) for gate, up, down in names]
            if all(name in self.source for group in names for name in group):
                return names
        raise KeyError(key)

    def get(self, key: str) -> torch.Tensor:
        try:
            resolved = self._resolve(key)
        except KeyError:
            raise ValueError(f"The {self.family} checkpoint has no tensor for {key!r} (nor its per-expert form).")
        if isinstance(resolved, str):
            return self.source.get(resolved)
        out = None
        for expert, group in enumerate(resolved):  # fill a preallocated (E, ...) tensor: one expert in flight
            part = torch.cat([self.source.get(name) for name in group], dim=0)
            if out is None:
                out = torch.empty((len(resolved), *part.shape), dtype=part.dtype)
            out[expert] = part
        return out

    def dtype_of(self, key: str) -> torch.dtype:
        resolved = self._resolve(key)
        return self.source.dtype_of(resolved if isinstance(resolved, str) else resolved[0][0])


def _legacy_expert_names(family: str, layer: str, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) per-expert names a family's `save_pretrained` writes for `layer` = 'model.layers.{i}'."""
    if family == "mixtral":
        base = f"{layer}.block_sparse_moe.experts.{expert}"
        return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
    base = f"{layer}.mlp.experts.{expert}"
    return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"


def _family_disk_items(family: str, key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Split fused expert tensors into the per-expert layout the family's `save_pretrained` (and engines) use."""
    match = _EXPERTS_KEY.fullmatch(key)
    if match is None:
        if family == "mixtral" and ".mlp.gate." in key:
            key = key.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        yield key, tensor
        return
    width = tensor.shape[1] // 2
    for expert in range(tensor.shape[0]):
        gate, up, down = _legacy_expert_names(family, match["layer"], expert)
        # NOTE: clone, since safetensors refuses tensors that share storage (slices of one fused tensor).
        if match["proj"] == "gate_up_proj":
            yield gate, tensor[expert, :width].clone()
            yield up, tensor[expert, width:].clone()
        else:
            yield down, tensor[expert].clone()


def _load_config(folder: Path) -> PreTrainedConfig:
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json; expected a transformers checkpoint folder.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    supported = (SparseMoEConfig.model_type, *MOE_FAMILIES, *DENSE_FAMILIES)
    if model_type not in supported:
        raise ValueError(f"{folder}: model_type={model_type!r} is not supported; supported: {supported}.")
    return CONFIG_MAPPING[model_type].from_pretrained(folder)



# ============================================================================================================== helpers
def _causal_lm_class(family: str):
    return MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[family]]


def _check_family(family: str, allowed: tuple[str, ...], where: str) -> None:
    if family not in allowed:
        raise ValueError(f"{where}: family must be one of {allowed}, got {family!r}.")


def _raise_if(problems: list[str], headline: str) -> None:
    if problems:
        raise ValueError(headline + "; unsupported features:\n" + "\n".join(f"  - {p}" for p in problems))



__all__ = [
    "MOE_FAMILIES",
    "DENSE_FAMILIES",
    "FAMILY_PREFERENCE",
    "GGUF_ARCHITECTURES",
    "sparse_config_from_hf",
    "hf_config_from_sparse",
    "upcycle_config",
    "family_problems",
    "gguf_problems",
    "correction_bias_problems",
    "pick_family",
]
