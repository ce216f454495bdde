# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Bridge between SparseMoE and the families transformers ships, in both directions, plus sparse upcycling.

    from_hf(model_or_path)                  Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / GLM-4-MoE -> SparseMoEForCausalLM
    to_hf(model, family)                    SparseMoEForCausalLM  ->  MixtralForCausalLM, Qwen2MoeForCausalLM, ...
    upcycle(dense_model_or_path, E, K)      Llama / Mistral / Qwen2 / Qwen3  ->  SparseMoEForCausalLM
    convert_folder(src, dst, to=None)       the first two, folder to folder, streamed tensor by tensor
    upcycle_folder(src, dst, E, K)          the third, folder to folder

Not Hub-facing: it may import anything installed.

Every conversion is a *plan*: an ordered `{target key: recipe}` where a recipe builds one target tensor from a
`source` (an in-memory state dict, or a safetensors folder read one tensor at a time with `safe_open`). In-memory and
folder conversions run the same plan, so they agree bit for bit; a folder conversion holds at most one output shard
plus the source shard being read, never two copies of the model.

Weight layout. In memory, every family (and SparseMoE) stores experts fused: `mlp.experts.gate_up_proj` (E, 2F, D) =
[gate; up] and `mlp.experts.down_proj` (E, D, F). On disk, the families' `save_pretrained` writes the per-expert
layout that serving engines read (Mixtral: `block_sparse_moe.experts.{e}.w1/w3/w2.weight` and
`block_sparse_moe.gate.weight`; Qwen2/3-MoE, OLMoE and GLM-4-MoE: `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`);
`_FamilyView` reads either layout and `_family_disk_items` writes the per-expert one. The only renamed module is
Qwen2-MoE's `mlp.shared_expert` (ours: `mlp.shared_experts`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.initialization import no_init_weights
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging
from transformers.utils.hub import convert_file_size_to_int

from ..configuration_sparse_moe import SparseMoEConfig
from ..modeling_sparse_moe import AUTO_MAP, SparseMoEForCausalLM


logger = logging.get_logger(__name__)

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe")
# Families whose router keeps a selection-only `e_score_correction_bias` (ours carries over); the others have none.
_BIASED_ROUTER_FAMILIES = ("glm4_moe",)
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MAX_SHARD_SIZE = "5GB"


class TensorSource(Protocol):
    """Where a plan reads tensors: an in-memory state dict, a safetensors folder, or a family view of either."""

    def __contains__(self, key: str) -> bool: ...
    def get(self, key: str) -> torch.Tensor: ...
    def dtype_of(self, key: str) -> torch.dtype: ...


Recipe = Callable[[TensorSource], torch.Tensor]  # builds one target tensor

_EXPERTS_KEY = re.compile(r"(?P<layer>.+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)")
_LAYER_MLP_KEY = re.compile(r"model\.layers\.(?P<idx>\d+)\.mlp\.(?P<rest>.+)")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# Files a folder conversion must not carry over: weights, configs and code are rewritten for the target format.
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|py|msgpack|h5)$|.*\.index\.json$|config\.json$|README\.md$")


# ======================================================================================================== public API
def from_hf(model_or_path, *, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """Convert a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE causal LM (a loaded model or a checkpoint folder) into a
    `SparseMoEForCausalLM` with the same logits. Raises a `ValueError` listing every source feature SparseMoE cannot
    express. A folder is read tensor by tensor, so only the returned model is ever fully in memory."""

    def build(hf_config, source):
        family, config = hf_config.model_type, sparse_config_from_hf(hf_config)
        view = _FamilyView(source, family, config.num_experts)
        return SparseMoEForCausalLM, config, _plan_from_hf(family, config), view

    return _convert(model_or_path, build, dtype, attn_implementation)


def to_hf(
    model_or_path,
    family: str,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    dequantize: bool = False,
):
    """Convert a `SparseMoEForCausalLM` (or its folder) into the transformers-native class of `family` (one of
    `MOE_FAMILIES`) with the same logits. `save_pretrained` on the result writes the family's own on-disk layout, which
    loads with plain `AutoModelForCausalLM` and serving engines. Raises a `ValueError` listing every feature of the
    model the family cannot express. Training-only settings (capacity, z-loss, bias updates) are dropped with a
    warning: they do not change inference. A 4-bit model (quantization.py) is refused unless `dequantize=True`, which
    converts its dequantized weights (the values the 4-bit model computes with)."""
    _check_family(family, MOE_FAMILIES, "to_hf")
    model_or_path = _full_precision(model_or_path, dequantize)

    def build(config, source):
        if not isinstance(config, SparseMoEConfig):
            raise ValueError(f"to_hf expects a SparseMoE model, got model_type={config.model_type!r}.")
        hf_config = hf_config_from_sparse(config, family, _bias_problems(family, config, source))
        return _causal_lm_class(family), hf_config, _plan_to_hf(family, hf_config), source

    return _convert(model_or_path, build, dtype, attn_implementation)


def _full_precision(model_or_path, dequantize: bool):
    """`model_or_path` itself, or a dequantized copy of a quantized one (`dequantize=True`); else a ValueError."""
    if isinstance(model_or_path, torch.nn.Module):
        config = model_or_path.config
    else:
        config_file = Path(model_or_path) / "config.json"
        config = SimpleNamespace(**json.loads(config_file.read_text())) if config_file.is_file() else None
    if not (getattr(config, "expert_quantization", None) or getattr(config, "quantization_config", None)):
        return model_or_path
    if not dequantize:
        raise ValueError(
            "to_hf: this model is quantized (bitsandbytes 4-bit); a transformers family checkpoint holds full-precision "
            "weights. Convert the full-precision checkpoint instead, or pass dequantize=True to convert the "
            "dequantized 4-bit weights (modeling_sparse_moe.quantization.dequantize_model)."
        )
    from ..quantization import dequantize_model

    if isinstance(model_or_path, torch.nn.Module):
        return dequantize_model(copy.deepcopy(model_or_path))
    return dequantize_model(SparseMoEForCausalLM.from_pretrained(model_or_path))


def upcycle(
    dense_model_or_path,
    num_experts: int,
    num_experts_per_tok: int,
    *,
    noise_std: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    **overrides,
) -> SparseMoEForCausalLM:
    """Sparse upcycling (Komatsuzaki et al., 2022) of a dense Llama, Mistral, Qwen2 or Qwen3 causal LM: attention,
    norms and embeddings are copied, every expert of every MoE layer starts as a copy of that layer's dense MLP, and
    the router starts random (normal, std `initializer_range`). With `noise_std=0`, renormalised top-k weights
    (`norm_topk_prob=True`, the default) and `routed_scaling_factor=1` the upcycled logits equal the dense model's.
    `noise_std > 0` adds `noise_std * std(W) * N(0, 1)` to each expert copy to break symmetry.

    `overrides` are `SparseMoEConfig` routing/MoE fields (e.g. `router_aux_loss_coef`, `capacity_factor`,
    `moe_layer_freq`, `first_k_dense_replace`); fields copied from the dense model cannot be overridden."""

    def build(dense_config, source):
        config = upcycle_config(dense_config, num_experts, num_experts_per_tok, **overrides)
        return SparseMoEForCausalLM, config, _plan_upcycle(config, noise_std, seed), source

    return _convert(dense_model_or_path, build, dtype, attn_implementation)


def _convert(model_or_path, build, dtype, attn_implementation):
    """The shared body of `from_hf`, `to_hf` and `upcycle`: open the source (a model or a folder), let `build(config,
    source)` return `(model class, target config, tensor plan, tensor source)`, materialise the target model in the
    requested (or the source's) dtype and attention implementation, and carry the generation config over."""
    with _open_source(model_or_path) as (config, source, default_dtype, default_attn, generation_config):
        model_class, target_config, plan, tensors = build(config, source)
        model = _materialize(
            model_class, target_config, plan, tensors, dtype or default_dtype, attn_implementation or default_attn
        )
    if generation_config is not None:
        model.generation_config = generation_config
    return model


def convert_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    source_family: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint folder, streaming tensors with `safe_open` and writing sharded safetensors.

    `to=None`: SRC is a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE folder (detected from `config.json`); DST becomes a
    SparseMoE folder (config, weights and the Hub-facing code, loadable with `trust_remote_code=True`).
    `to=family`: SRC is a SparseMoE folder; DST becomes a folder of that family in its own on-disk layout.
    `source_family` other than "auto" must match SRC's `model_type`. Tokenizer and generation files are copied.
    DST is written in a temporary folder next to it and renamed at the end, so a failed conversion leaves no DST."""
    src = Path(src)
    hf_config = _load_config(src)
    if source_family not in ("auto", hf_config.model_type):
        raise ValueError(f"Expected a {source_family} checkpoint, but {src} has model_type={hf_config.model_type!r}.")
    if to is None:
        family = hf_config.model_type
        config = sparse_config_from_hf(hf_config)
        with _atomic_output_dir(dst, overwrite) as tmp, _SafetensorsFolder(src) as source:
            dtype = source.dtype_of("model.embed_tokens.weight")
            plan = _plan_from_hf(family, config)
            _write_plan(plan, _FamilyView(source, family, config.num_experts), tmp, max_shard_size)
            _save_sparse_config(config, tmp, dtype)
            _copy_side_files(src, tmp)
        return Path(dst)

    _check_family(to, MOE_FAMILIES, "convert_folder(to=...)")
    if not isinstance(hf_config, SparseMoEConfig):
        raise ValueError(f"Converting to {to} expects a SparseMoE folder, got model_type={hf_config.model_type!r}.")
    with _atomic_output_dir(dst, overwrite) as tmp, _SafetensorsFolder(src) as source:
        target_config = hf_config_from_sparse(hf_config, to, _bias_problems(to, hf_config, source))
        dtype = source.dtype_of("model.embed_tokens.weight")
        plan = _plan_to_hf(to, target_config)
        _write_plan(plan, source, tmp, max_shard_size, disk_items=lambda k, t: _family_disk_items(to, k, t))
        target_config.architectures = [_causal_lm_class(to).__name__]
        target_config.dtype = dtype
        target_config.save_pretrained(tmp)
        _copy_side_files(src, tmp)
    return Path(dst)


def upcycle_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    num_experts: int,
    num_experts_per_tok: int,
    *,
    noise_std: float = 0.0,
    seed: int = 0,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    **overrides,
) -> Path:
    """`upcycle`, folder to folder: SRC is a dense Llama / Mistral / Qwen2 / Qwen3 safetensors folder, DST a SparseMoE
    folder. Same plan as `upcycle`, so `SparseMoEForCausalLM.from_pretrained(DST)` equals `upcycle(SRC, ...)`."""
    src = Path(src)
    config = upcycle_config(_load_config(src), num_experts, num_experts_per_tok, **overrides)
    with _atomic_output_dir(dst, overwrite) as tmp, _SafetensorsFolder(src) as source:
        dtype = source.dtype_of("model.embed_tokens.weight")
        _write_plan(_plan_upcycle(config, noise_std, seed), source, tmp, max_shard_size)
        _save_sparse_config(config, tmp, dtype)
        _copy_side_files(src, tmp)
    return Path(dst)


# ============================================================================================================ configs
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


def correction_bias_problems(config: SparseMoEConfig, source) -> list[str]:
    """Routers with a non-zero `e_score_correction_bias` (it shifts expert choice; the families have no such bias)."""
    layers = []
    for i in range(config.num_hidden_layers):
        key = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
        if config.is_moe_layer(i) and key in source and bool(source.get(key).abs().max() > 0):
            layers.append(i)
    return [f"e_score_correction_bias non-zero in layers {layers}: biased expert selection"] if layers else []


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


# ============================================================================================================= plans
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


def _plan_upcycle(config: SparseMoEConfig, noise_std: float, seed: int) -> dict[str, Recipe]:
    """Dense names equal ours for attention, norms, embeddings and dense MLPs; MoE layers build router and experts."""
    plan = {}
    for key in _target_keys(SparseMoEForCausalLM, config):
        match = _LAYER_MLP_KEY.fullmatch(key)
        if match is None or not config.is_moe_layer(int(match["idx"])):
            plan[key] = _read(key)
            continue
        layer, rest = int(match["idx"]), match["rest"]
        mlp = f"model.layers.{layer}.mlp"
        if rest == "gate.weight":
            plan[key] = _random_router(mlp, config, seed, layer)
        elif rest == "gate.e_score_correction_bias":
            plan[key] = _zeros((config.num_experts,), torch.float32)
        elif rest == "experts.gate_up_proj":
            plan[key] = _replicated_expert(
                (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"), config.num_experts, noise_std, seed, layer, 1
            )
        elif rest == "experts.down_proj":
            plan[key] = _replicated_expert((f"{mlp}.down_proj.weight",), config.num_experts, noise_std, seed, layer, 2)
        else:
            raise ValueError(f"upcycle has no recipe for {key!r} (a new SparseMoE parameter?)")
    return plan


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


def _generator(seed: int, layer: int, salt: int) -> torch.Generator:
    """One generator per (layer, tensor), so folder and in-memory upcycling draw the same numbers in any order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 7 + salt)


def _random_router(mlp: str, config: SparseMoEConfig, seed: int, layer: int) -> Recipe:
    def build(source):
        dtype = source.dtype_of(f"{mlp}.gate_proj.weight")
        weight = torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32)
        weight.normal_(0.0, config.initializer_range, generator=_generator(seed, layer, 0))
        return weight.to(dtype)

    return build


def _replicated_expert(names: tuple[str, ...], num_experts: int, noise_std: float, seed: int, layer: int, salt: int):
    """(E, *W.shape) copies of W = cat(names) along dim 0, plus optional relative Gaussian noise per copy."""

    def build(source):
        weight = torch.cat([source.get(name) for name in names], dim=0)
        experts = weight.unsqueeze(0).repeat(num_experts, *([1] * weight.dim()))
        if noise_std > 0:
            scale = noise_std * weight.float().std()
            noise = torch.randn(experts.shape, generator=_generator(seed, layer, salt), dtype=torch.float32)
            experts = (experts.float() + scale * noise).to(weight.dtype)
        return experts

    return build


# =========================================================================================================== sources
class _StateDictSource:
    """Tensors of an in-memory model, by their in-memory names."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self._state_dict = state_dict

    def __contains__(self, key: str) -> bool:
        return key in self._state_dict

    def keys(self):
        return self._state_dict.keys()

    def get(self, key: str) -> torch.Tensor:
        if key not in self._state_dict:
            raise KeyError(key)
        return self._state_dict[key].detach()

    def dtype_of(self, key: str) -> torch.dtype:
        return self._state_dict[key].dtype

    def close(self):
        pass


class _SafetensorsFolder:
    """Tensors of a safetensors checkpoint folder (one file or an index plus shards), read one at a time.

    NOTE: at most one shard is open. `safe_open` memory-maps its file and the pages a read touches count towards the
    process's resident memory until the map is closed, so keeping every shard open (or tensors that view the map)
    would grow RSS to the checkpoint size over a conversion."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self._weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                found = sorted(p.name for p in self.folder.glob("*.bin"))
                hint = f" (found {found}: load it and save_pretrained it once to get safetensors)" if found else ""
                raise ValueError(f"No safetensors weights in {self.folder}{hint}.")
            self._weight_map = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    self._weight_map.update(dict.fromkeys(handle.keys(), file.name))
        missing = sorted({name for name in self._weight_map.values() if not (self.folder / name).is_file()})
        if missing:
            raise ValueError(f"{self.folder}: shards {missing} listed in the index are missing.")
        self._open_name = None
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self._weight_map

    def keys(self):
        return self._weight_map.keys()

    def _file(self, key: str):
        name = self._weight_map[key]
        if name != self._open_name:
            self.close()
            self._handle = safe_open(self.folder / name, framework="pt")
            self._open_name = name
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        # NOTE: `get_tensor` returns a view into the memory map, which keeps the whole map (and every page read from
        # it) resident for as long as the tensor lives. A copy lets the map go when the next shard is opened.
        return self._file(key).get_tensor(key).clone()

    def dtype_of(self, key: str) -> torch.dtype:
        """Read from the header only: no tensor data is loaded."""
        name = self._file(key).get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(name) or getattr(torch, name.lower())

    def close(self):
        self._handle, self._open_name = None, None


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


@contextlib.contextmanager
def _open_source(model_or_path):
    """(config, source, dtype, attn_implementation, generation_config) of a loaded model or a checkpoint folder."""
    if isinstance(model_or_path, (str, os.PathLike)):
        folder = Path(model_or_path)
        config = _load_config(folder)
        generation_config = None
        if (folder / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(folder)
        with _SafetensorsFolder(folder) as source:
            yield config, source, source.dtype_of("model.embed_tokens.weight"), None, generation_config
        return
    if not isinstance(model_or_path, PreTrainedModel):
        raise ValueError(f"Expected a transformers model or a folder path, got {type(model_or_path).__name__}.")
    model = model_or_path
    source = _StateDictSource(model.state_dict())
    if "model.embed_tokens.weight" not in source or "lm_head.weight" not in source:
        raise ValueError(f"Expected a *ForCausalLM model (with `model.` and `lm_head`), got {type(model).__name__}.")
    generation_config = copy.deepcopy(model.generation_config) if model.can_generate() else None
    yield model.config, source, model.dtype, model.config._attn_implementation, generation_config


def _load_config(folder: Path) -> PreTrainedConfig:
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json; expected a transformers checkpoint folder.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    supported = (SparseMoEConfig.model_type, *MOE_FAMILIES, *DENSE_FAMILIES)
    if model_type not in supported:
        raise ValueError(f"{folder}: model_type={model_type!r} is not supported; supported: {supported}.")
    return CONFIG_MAPPING[model_type].from_pretrained(folder)


# ========================================================================================================== building
def _materialize(model_class, config, plan: dict[str, Recipe], source, dtype, attn_implementation):
    """Build `model_class(config)` without random init and fill every tensor from `plan`."""
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with no_init_weights():
        model = model_class._from_config(copy.deepcopy(config), **kwargs)
    model.tie_weights()  # NOTE: part of the `init_weights` that `no_init_weights` skips
    targets = model.state_dict()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    unplanned = sorted(set(targets) - set(plan) - tied)
    if unplanned:
        raise ValueError(f"No conversion recipe for {unplanned} of {model_class.__name__}.")
    with torch.no_grad():
        for key, recipe in plan.items():
            value = recipe(source)
            if tuple(value.shape) != tuple(targets[key].shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)}, expected {tuple(targets[key].shape)}.")
            targets[key].copy_(value)
    return model.eval()


def _write_plan(
    plan: dict[str, Recipe],
    source,
    folder: Path,
    max_shard_size: int | str,
    disk_items: Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]] | None = None,
) -> None:
    # A progress bar over the tensors (transformers' tqdm: `disable_progress_bar()` / HF_HUB_DISABLE_PROGRESS_BARS
    # silence it), with the shard being filled and the bytes written so far; a line as each shard is written.
    bar = logging.tqdm(plan.items(), total=len(plan), desc="converting", unit="tensor")
    writer = _ShardWriter(folder, convert_file_size_to_int(max_shard_size), on_shard=bar.write)
    for key, recipe in bar:
        tensor = recipe(source)
        for disk_key, disk_tensor in disk_items(key, tensor) if disk_items else ((key, tensor),):
            writer.add(disk_key, disk_tensor)
        del tensor
        bar.set_postfix(shard=len(writer._shards) + 1, written=f"{writer._total_bytes / 2**30:.2f} GiB", refresh=False)
    writer.finish()
    bar.close()


class _ShardWriter:
    """Sharded safetensors output in transformers' layout (`model.safetensors`, or numbered shards plus
    `model.safetensors.index.json`). Holds at most one shard's tensors."""

    def __init__(self, folder: Path, max_shard_bytes: int, on_shard: Callable[[str], None] | None = None):
        self.folder, self.max_shard_bytes, self.on_shard = Path(folder), max_shard_bytes, on_shard
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._seen: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._seen:
            raise ValueError(f"Tensor {key!r} written twice.")
        self._seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.partial"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        if self.on_shard is not None:
            self.on_shard(f"shard {len(self._shards)}: {len(self._pending)} tensors, "
                          f"{self._pending_bytes / 2**30:.2f} GiB written ({self._total_bytes / 2**30:.2f} GiB so far)")
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, (path, keys) in enumerate(self._shards, start=1):
            name = f"model-{number:05d}-of-{len(self._shards):05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _pad_id(config) -> int | None:
    """Some Hub configs carry `pad_token_id=-1` (or an id past the vocabulary) to mean "none"; we store None."""
    pad = config.pad_token_id
    return pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None


def _save_sparse_config(config: SparseMoEConfig, folder: Path, dtype: torch.dtype) -> None:
    """config.json with `auto_map`, the Hub-facing code files, and a generation config: what `save_pretrained` of a
    SparseMoEForCausalLM writes besides the weights."""
    config = copy.deepcopy(config)
    config.architectures = [SparseMoEForCausalLM.__name__]
    config.dtype = dtype
    with torch.device("meta"), no_init_weights():
        model = SparseMoEForCausalLM(copy.deepcopy(config))
    if model.is_remote_code():
        # Same auto_map as SparseMoEPreTrainedModel.save_pretrained: every head, not only the causal LM.
        config.auto_map = {auto: f"modeling_sparse_moe.{name}" for auto, name in AUTO_MAP.items()}
        custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation config, ...: every top-level file that is not weights, config or code."""
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and not _NOT_COPIED.fullmatch(path.name):
            shutil.copy2(path, Path(dst) / path.name)


@contextlib.contextmanager
def _atomic_output_dir(dst: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `dst`; rename it to `dst` on success, delete it on any failure."""
    dst = Path(dst).absolute()
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())) and not overwrite:
        raise ValueError(f"{dst} already exists; choose a new folder or pass overwrite=True (--overwrite).")
    created = [parent for parent in reversed(dst.parents) if not parent.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if we created it and it is still empty
        raise


# ============================================================================================================ helpers
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
    "from_hf",
    "to_hf",
    "upcycle",
    "convert_folder",
    "upcycle_folder",
    "sparse_config_from_hf",
    "hf_config_from_sparse",
    "upcycle_config",
    "correction_bias_problems",
    "family_problems",
]
