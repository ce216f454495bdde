# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Bridge between SparseMoE and the families transformers ships, in both directions, plus sparse upcycling.

    from_hf(model_or_path)                  Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / GLM-4-MoE -> SparseMoEForCausalLM
    to_hf(model, family)                    SparseMoEForCausalLM  ->  MixtralForCausalLM, Qwen2MoeForCausalLM, ...
    upcycle(dense_model_or_path, E, K)      Llama / Mistral / Qwen2 / Qwen3  ->  SparseMoEForCausalLM
    convert_folder(src, dst, to=None)       the first two, folder to folder, streamed tensor by tensor
    upcycle_folder(src, dst, E, K)          the third, folder to folder

Not Hub-facing: it may import anything installed. Each family's rules (config mapping, tensor names, what it cannot
hold) live in `families.py`; the streaming safetensors reader/writer in `safetensors_io.py`. Their public names are
importable from here too.

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
from pathlib import Path
from types import SimpleNamespace

import torch

from transformers import GenerationConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.initialization import no_init_weights
from transformers.utils import logging

from ..configuration_sparse_moe import SparseMoEConfig
from ..modeling_sparse_moe import AUTO_MAP, SparseMoEForCausalLM
from .families import (
    DENSE_FAMILIES,
    FAMILY_PREFERENCE,
    GGUF_ARCHITECTURES,
    MOE_FAMILIES,
    _bias_problems,
    _causal_lm_class,
    _check_family,
    _family_disk_items,
    _FamilyView,
    _load_config,
    _plan_from_hf,
    _plan_to_hf,
    _read,
    _target_keys,
    _zeros,
    correction_bias_problems,
    family_problems,
    gguf_problems,
    hf_config_from_sparse,
    pick_family,
    sparse_config_from_hf,
    upcycle_config,
)
from .safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    Recipe,
    TensorSource,
    _atomic_output_dir,
    _copy_side_files,
    _SafetensorsFolder,
    _StateDictSource,
    _write_plan,
)


logger = logging.get_logger(__name__)

_LAYER_MLP_KEY = re.compile(r"model\.layers\.(?P<idx>\d+)\.mlp\.(?P<rest>.+)")



# =========================================================================================================== public API
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



# ======================================================================================================= upcycling plan
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



# ============================================================================================================= building
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



__all__ = [
    "MOE_FAMILIES",
    "DENSE_FAMILIES",
    "FAMILY_PREFERENCE",
    "GGUF_ARCHITECTURES",
    "DEFAULT_MAX_SHARD_SIZE",
    "TensorSource",
    "Recipe",
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
    "gguf_problems",
    "pick_family",
]
