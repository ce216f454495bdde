# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""How much memory a model needs, before buying the GPU: weights with bf16 / int8 / NF4 experts, the QLoRA
training footprint, and which common GPU sizes hold it.

    from modeling_sparse_moe.compression.memory_planner import plan_memory

    plan = plan_memory("mixtral-8x7b")                       # a shipped config, a folder, or a config.json path
    print(plan.table())                                       # or: python scripts/plan_memory.py mixtral-8x7b

Every figure is counted from the model's own tensors: the model is built on the meta device (no memory, no
weights), and each parameter and buffer contributes its element count times the bytes of the dtype the layout gives
it. Hub-style Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE `config.json` files are mapped to `SparseMoEConfig` with
`conversion.sparse_config_from_hf` first (the same mapping `from_hf` converts checkpoints with).

Layouts (what `weights[...]` holds):
  - "fp32", "bf16": every tensor in that dtype, except the buffers the model keeps in fp32 (the router's).
  - "int8": `quantize_experts_int8(model)` applied to the meta model: routed and shared experts int8 with fp32
    per-channel scales (int8_experts.py), everything else bf16. Exactly what that call produces.
  - "nf4_experts": routed experts NF4 in the layout of modeling_sparse_moe/quantization.py (bitsandbytes' format:
    two 4-bit codes per byte, one absmax per 64 values, fp32; with double quantization one uint8 per 64 values plus
    one fp32 per 256 blocks and one fp32 offset per expert; a 16-entry (and with double quantization a 256-entry)
    fp32 code book per projection), everything else bf16.
  - "nf4": what `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` holds: the routed
    experts as above, and every `nn.Linear` but the output head (attention, shared experts, dense MLPs) as a
    bitsandbytes `Linear4bit` (the same codes and absmax per 64 values; bitsandbytes keeps those scales in a
    `QuantState`, which `get_memory_footprint()` does not see but the GPU holds, so they are counted here);
    embeddings, output head, router and norms bf16.

QLoRA footprint (`qlora`): base weights in the "nf4" layout, plus what `peft.prepare_model_for_kbit_training` does
(it casts every bf16 parameter that is not 4-bit, i.e. embeddings, head, router, norms, to fp32: `upcast=True`),
plus LoRA adapters in fp32 (a `nn.Linear` O x I target gets r (I + O) parameters; an expert stack (E, O, I) through
`target_parameters` gets r E (I + O), PEFT's `ParamWrapper` shapes), their gradients (fp32, same size) and AdamW's
two fp32 states, plus activations:

    activations = L * B * S * D * 2                                 (layer inputs kept by gradient checkpointing, bf16)
                + B * S * 2 * (4 D + 2 Hq Hd + 4 Hkv Hd + K (2 D + 5 F) + 2 F_shared * 3)  (one layer recomputed
                                                                      in the backward: norms, q/k/v/attention output,
                                                                      K gathered inputs, gate/up, activation, product,
                                                                      expert outputs; shared experts), bf16
                + B * S * E * 4 * 2                                   (router logits and probabilities, fp32)
                + B * S * V * 4 * 2                                   (fp32 logits and their gradient)

with L layers, B batch, S sequence, D hidden, Hq / Hkv query / key-value heads of width Hd, K experts per token,
F expert width, E experts, V vocabulary. It is an estimate (attention by SDPA / flash: no S x S matrix; allocator
fragmentation not modelled); `overhead_gib` (default 1 GiB: CUDA context, cuBLAS workspace, allocator slack) is added
before checking what fits. Sizes are GiB (2**30 bytes), as GPUs are sold ("80 GB" H100: 80 GiB).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from transformers import AutoConfig, PretrainedConfig

from ..configs import CONFIGS_DIR, available_configs
from ..configuration_sparse_moe import SparseMoEConfig
from ..int8_experts import quantize_experts_int8
from ..modeling_sparse_moe import SparseMoEExperts, SparseMoEForCausalLM


GIB = 2**30
# Common GPU memory sizes (GiB) with an example card each.
GPU_SIZES = {16: "T4 / V100-16GB", 24: "RTX 4090 / L4 / A10", 40: "A100-40GB", 48: "L40S / RTX 6000 Ada",
             80: "A100-80GB / H100", 141: "H200", 192: "B200 / MI300X"}
LAYOUTS = ("fp32", "bf16", "int8", "nf4_experts", "nf4")
NF4_BLOCKSIZE = 64  # bitsandbytes' default block size (and quantization.py's)
NF4_NESTED_BLOCKSIZE = 256  # bitsandbytes' block size of the double-quantized absmax
LORA_TARGETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),  # dense MLPs and shared experts (nn.Linear)
    "experts": ("experts.gate_up_proj", "experts.down_proj"),  # `target_parameters` on the routed expert stacks
}


# ----------------------------------------------------------------------------------------------------------- config
def load_planner_config(spec: str | PretrainedConfig) -> SparseMoEConfig:
    """A `SparseMoEConfig` from a shipped config name, a folder holding config.json, a config.json path, or a config
    object; Mixtral / Qwen-MoE / OLMoE configs are mapped with `conversion.sparse_config_from_hf`."""
    if isinstance(spec, PretrainedConfig):
        config = spec
    else:
        path = Path(spec)
        if not path.exists() and (CONFIGS_DIR / spec / "config.json").is_file():
            path = CONFIGS_DIR / spec
        if path.is_file():
            if path.name != "config.json":
                raise ValueError(f"{spec}: expected a folder or a file named config.json")
            path = path.parent
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{spec!r} is neither a shipped config ({', '.join(available_configs())}) nor a folder or path with a "
                "config.json (download a model's config.json from the Hub and pass its path)"
            )
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type is None:
            raise ValueError(f"{path / 'config.json'} has no model_type")
        config = AutoConfig.from_pretrained(str(path))
    if config.model_type == SparseMoEConfig.model_type:
        return config
    from ..interop.conversion import sparse_config_from_hf  # converts or raises a ValueError naming what it cannot express

    return sparse_config_from_hf(config)


def meta_model(config: SparseMoEConfig, dtype: torch.dtype = torch.bfloat16) -> SparseMoEForCausalLM:
    """The causal LM on the meta device, cast as `model.to(dtype)` casts a real one (router buffers stay fp32)."""
    with torch.device("meta"):
        model = SparseMoEForCausalLM(config)
    return model.to(dtype).eval()


# -------------------------------------------------------------------------------------------------------- counting
def _tensor_bytes(tensors) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors)


def module_bytes(model: nn.Module) -> int:
    """Parameters + buffers, as `PreTrainedModel.get_memory_footprint()` counts them."""
    return _tensor_bytes(model.parameters()) + _tensor_bytes(model.buffers())


def nf4_bytes(numel: int, double_quant: bool, blocksize: int = NF4_BLOCKSIZE) -> int:
    """Bytes of one weight of `numel` values in bitsandbytes' NF4 layout without its code book: packed codes
    (2 per byte) and the absmax per block (fp32; or uint8 per block + fp32 per 256 blocks + one fp32 offset)."""
    blocks = math.ceil(numel / blocksize)
    absmax = 4 * blocks if not double_quant else blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + 4
    return math.ceil(numel / 2) + absmax


def nf4_expert_bytes(experts: nn.Module, double_quant: bool) -> int:
    """An expert module's (E, O, I) stacks in quantization.py's layout: each expert quantized on its own, plus one
    16-entry fp32 code book per projection (and a 256-entry one for the double-quantized scales)."""
    total = 0
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        per_expert = weight[0].numel()
        total += weight.shape[0] * nf4_bytes(per_expert, double_quant) + 16 * 4 + (256 * 4 if double_quant else 0)
    return total


def _is_head(model: nn.Module, module: nn.Module) -> bool:
    return module is model.get_output_embeddings()


def _layout_bytes(model: SparseMoEForCausalLM, layout: str, double_quant: bool) -> dict[str, int]:
    """Bytes per category in `layout`: routed experts, shared experts, attention, embeddings + head, other."""
    if layout == "int8":
        model = quantize_experts_int8(copy.deepcopy(model))  # the real module swap, on meta tensors
    parts = {"routed_experts": 0, "shared_experts": 0, "attention": 0, "embeddings_and_head": 0, "other": 0}
    counted: set[int] = set()

    def add(part: str, tensors) -> None:
        for t in tensors:
            if id(t) not in counted:
                counted.add(id(t))
                parts[part] += t.nelement() * t.element_size()

    nf4 = layout in ("nf4", "nf4_experts")
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        if isinstance(module, SparseMoEExperts) and nf4:
            parts["routed_experts"] += nf4_expert_bytes(module, double_quant)
            counted.update(id(t) for t in own)
            continue
        part = (
            "routed_experts" if ".experts" in f".{name}" and "shared_experts" not in name
            else "shared_experts" if "shared_experts" in name
            else "attention" if "self_attn" in name
            else "embeddings_and_head" if isinstance(module, nn.Embedding) or _is_head(model, module)
            else "other"
        )
        if layout == "nf4" and type(module) is nn.Linear and not _is_head(model, module):
            parts[part] += nf4_bytes(module.weight.numel(), double_quant) + _tensor_bytes(
                [module.bias] if module.bias is not None else []
            )
            counted.update(id(t) for t in own)
            continue
        add(part, own)
    return parts


@dataclass
class QLoRAEstimate:
    rank: int
    targets: tuple[str, ...]
    batch_size: int
    seq_len: int
    base_weights: int
    upcast_extra: int
    lora_params: int
    lora_weights: int
    lora_grads: int
    optimizer_states: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return (self.base_weights + self.upcast_extra + self.lora_weights + self.lora_grads + self.optimizer_states
                + self.activations + self.overhead)


@dataclass
class MemoryPlan:
    name: str
    config: SparseMoEConfig
    num_parameters: int
    weights: dict[str, int]  # layout -> bytes
    parts: dict[str, dict[str, int]]  # layout -> category -> bytes
    qlora: QLoRAEstimate | None = None
    gpu_sizes_gib: tuple[int, ...] = tuple(GPU_SIZES)
    overhead_gib: float = 1.0
    notes: list[str] = field(default_factory=list)
    # the same QLoRA run when the 4-bit quantizer misses the experts (bitsandbytes alone: they stay bf16, and
    # prepare_model_for_kbit_training then casts them to fp32 with the other non-4-bit weights)
    qlora_float_experts_total: int | None = None
    # experts kept per layer (expert pruning, compression/pruning.py) -> layout -> weight bytes
    pruned: dict[int, dict[str, int]] = field(default_factory=dict)
    pruned_experts_bytes: dict[int, dict[str, int]] = field(default_factory=dict)  # the experts' share of those

    def fits(self, num_bytes: int) -> dict[int, bool]:
        """GPU size (GiB) -> whether `num_bytes` plus the overhead fits."""
        return {size: num_bytes + self.overhead_gib * GIB <= size * GIB for size in self.gpu_sizes_gib}

    def to_dict(self) -> dict:
        out = dict(
            name=self.name, num_parameters=self.num_parameters, weights_bytes=self.weights, parts_bytes=self.parts,
            overhead_gib=self.overhead_gib,
            weights_fit={layout: self.fits(b) for layout, b in self.weights.items()},
        )
        if self.qlora is not None:
            q = self.qlora
            out["qlora"] = dict(
                rank=q.rank, targets=list(q.targets), batch_size=q.batch_size, seq_len=q.seq_len,
                base_weights=q.base_weights, upcast_extra=q.upcast_extra, lora_params=q.lora_params,
                lora_weights=q.lora_weights, lora_grads=q.lora_grads, optimizer_states=q.optimizer_states,
                activations=q.activations, overhead=q.overhead, total=q.total,
                fits={size: q.total <= size * GIB for size in self.gpu_sizes_gib},
                total_with_float_experts=self.qlora_float_experts_total,
            )
        if self.pruned:
            out["pruned_weights_bytes"] = {str(k): dict(v) for k, v in self.pruned.items()}
        return out

    def table(self) -> str:
        sizes = self.gpu_sizes_gib
        lines = [f"## {self.name}: {self.num_parameters / 1e9:.2f} B parameters "
                 f"({self.config.num_hidden_layers} layers, {self.config.num_experts} experts x "
                 f"{self.config.moe_intermediate_size}, top-{self.config.num_experts_per_tok})", "",
                 "| layout | weights GiB | experts GiB | " + " | ".join(f"fits {s} GB" for s in sizes) + " |",
                 "|---|---|---|" + "---|" * len(sizes)]
        for layout, b in self.weights.items():
            fits = self.fits(b)
            experts = self.parts[layout]["routed_experts"] + self.parts[layout]["shared_experts"]
            lines.append(f"| {layout} | {b / GIB:.2f} | {experts / GIB:.2f} | "
                         + " | ".join("yes" if fits[s] else "no" for s in sizes) + " |")
        for kept, by_layout in self.pruned.items():
            for layout, b in by_layout.items():
                fits = self.fits(b)
                lines.append(f"| {layout}, pruned to {kept} experts | {b / GIB:.2f} | "
                             f"{self.pruned_experts_bytes[kept][layout] / GIB:.2f} | "
                             + " | ".join("yes" if fits[s] else "no" for s in sizes) + " |")
        if self.qlora is not None:
            q = self.qlora
            fits = {s: q.total <= s * GIB for s in sizes}
            lines += ["", f"QLoRA (r={q.rank}, targets {'+'.join(q.targets)}, batch {q.batch_size} x {q.seq_len}, "
                          f"AdamW, gradient checkpointing): {q.total / GIB:.2f} GiB = base {q.base_weights / GIB:.2f} "
                          f"+ fp32 upcast {q.upcast_extra / GIB:.2f} + LoRA {q.lora_params / 1e6:.1f} M params "
                          f"(weights {q.lora_weights / GIB:.2f}, grads {q.lora_grads / GIB:.2f}, AdamW "
                          f"{q.optimizer_states / GIB:.2f}) + activations {q.activations / GIB:.2f} + overhead "
                          f"{q.overhead / GIB:.2f}",
                      "fits: " + ", ".join(f"{s} GB {'yes' if fits[s] else 'no'}" for s in sizes)]
            if self.qlora_float_experts_total is not None:
                other = self.qlora_float_experts_total
                lines.append(f"the same run with the experts left unquantized (bitsandbytes alone), upcast like the "
                             f"other non-4-bit weights: {other / GIB:.2f} GiB; fits: "
                             + ", ".join(f"{s} GB {'yes' if other <= s * GIB else 'no'}" for s in sizes))
        lines += self.notes
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ estimates
def lora_parameter_count(model: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters PEFT creates for `targets` (keys of `LORA_TARGETS`) at rank `rank`, from the modules' shapes."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {sorted(LORA_TARGETS)}")
    linear_names = {n for t in targets if t != "experts" for n in LORA_TARGETS[t]}
    count = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is nn.Linear and leaf in linear_names and not _is_head(model, module):
            count += rank * (module.in_features + module.out_features)
        elif isinstance(module, SparseMoEExperts) and "experts" in targets:
            for weight in (module.gate_up_proj, module.down_proj):
                experts, out_dim, in_dim = weight.shape
                count += rank * experts * (in_dim + out_dim)
    return count


def activation_bytes(config: SparseMoEConfig, batch_size: int, seq_len: int) -> int:
    """The activation estimate of the module docstring (gradient checkpointing, bf16 activations, fp32 logits)."""
    tokens = batch_size * seq_len
    D, L, V, E, K = (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.num_experts,
                     config.num_experts_per_tok)
    F_ = config.moe_intermediate_size
    head_dim = config.head_dim or D // config.num_attention_heads
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    shared = (config.shared_expert_intermediate_size or 0) if config.num_shared_experts else 0
    checkpoints = L * tokens * D * 2
    one_layer = tokens * 2 * (4 * D + 2 * Hq * head_dim + 4 * Hkv * head_dim + K * (2 * D + 5 * F_) + 3 * 2 * shared)
    router = tokens * E * 4 * 2
    logits = tokens * V * 4 * 2
    return checkpoints + one_layer + router + logits


def qlora_estimate(model: SparseMoEForCausalLM, nf4_weights: int, rank: int, targets: tuple[str, ...],
                   batch_size: int, seq_len: int, overhead_gib: float, upcast: bool) -> QLoRAEstimate:
    # bf16 tensors that stay unquantized in the "nf4" layout: embeddings, head, router, norms (PEFT casts them to fp32)
    float_bytes = 0
    if upcast:
        for module in model.modules():
            if isinstance(module, SparseMoEExperts) or (type(module) is nn.Linear and not _is_head(model, module)):
                continue
            float_bytes += sum(p.nelement() for p in module.parameters(recurse=False) if p.dtype == torch.bfloat16)
    lora = lora_parameter_count(model, rank, targets)
    return QLoRAEstimate(
        rank=rank, targets=tuple(targets), batch_size=batch_size, seq_len=seq_len, base_weights=nf4_weights,
        upcast_extra=2 * float_bytes, lora_params=lora, lora_weights=4 * lora, lora_grads=4 * lora,
        optimizer_states=8 * lora, activations=activation_bytes(model.config, batch_size, seq_len),
        overhead=int(overhead_gib * GIB),
    )


def pruned_config(config: SparseMoEConfig, num_experts: int) -> SparseMoEConfig:
    """`config` with `num_experts` experts per MoE layer: what `prune_experts(model, num_experts)` leaves."""
    if not 1 <= num_experts <= config.num_experts or num_experts < config.num_experts_per_tok:
        raise ValueError(f"pruned_experts: {num_experts} must be from num_experts_per_tok="
                         f"{config.num_experts_per_tok} to num_experts={config.num_experts}")
    if config.n_group > 1 and num_experts % config.n_group:
        raise ValueError(f"pruned_experts: {num_experts} is not divisible by n_group={config.n_group}")
    pruned = copy.deepcopy(config)
    pruned.num_experts = num_experts
    pruned.validate()
    return pruned


def plan_memory(spec: str | PretrainedConfig, *, double_quant: bool = False, rank: int = 16,
                targets: tuple[str, ...] = ("attention", "experts"), batch_size: int = 1, seq_len: int = 2048,
                overhead_gib: float = 1.0, upcast: bool = True, gpu_sizes_gib: tuple[int, ...] = tuple(GPU_SIZES),
                name: str | None = None, pruned_experts: tuple[int, ...] = ()) -> MemoryPlan:
    """Weights in every layout of `LAYOUTS` and the QLoRA footprint of the model `spec` names (see module doc);
    `pruned_experts` adds weight rows (every layout) for the model pruned to each of those expert counts."""
    config = load_planner_config(spec)
    pruned, pruned_experts_bytes = {}, {}
    for kept in pruned_experts:
        small = pruned_config(config, kept)
        small_models = {dtype: meta_model(small, dtype) for dtype in (torch.float32, torch.bfloat16)}
        layouts = {layout: _layout_bytes(small_models[torch.float32 if layout == "fp32" else torch.bfloat16],
                                         layout, double_quant) for layout in LAYOUTS}
        pruned[kept] = {layout: sum(p.values()) for layout, p in layouts.items()}
        pruned_experts_bytes[kept] = {layout: p["routed_experts"] + p["shared_experts"] for layout, p in layouts.items()}
    weights, parts = {}, {}
    models = {dtype: meta_model(config, dtype) for dtype in (torch.float32, torch.bfloat16)}
    for layout in LAYOUTS:
        model = models[torch.float32 if layout == "fp32" else torch.bfloat16]
        parts[layout] = _layout_bytes(model, layout, double_quant)
        weights[layout] = sum(parts[layout].values())
    if weights["fp32"] != module_bytes(models[torch.float32]):
        raise AssertionError("planner categories do not add up to the model's tensors")  # a counting bug
    qlora = qlora_estimate(models[torch.bfloat16], weights["nf4"], rank, targets, batch_size, seq_len, overhead_gib,
                           upcast)
    routed_float = parts["bf16"]["routed_experts"] * (2 if upcast else 1)
    float_experts_total = qlora.total - parts["nf4"]["routed_experts"] + routed_float
    notes = [f"NF4 {'with' if double_quant else 'without'} double quantization, block size {NF4_BLOCKSIZE}; "
             f"a GPU fits weights when they plus {overhead_gib:g} GiB of overhead are at most its size."]
    return MemoryPlan(
        name=name or (spec if isinstance(spec, str) else config.model_type), config=config,
        num_parameters=sum(p.numel() for p in models[torch.float32].parameters()), weights=weights, parts=parts,
        qlora=qlora, gpu_sizes_gib=tuple(gpu_sizes_gib), overhead_gib=overhead_gib, notes=notes,
        qlora_float_experts_total=float_experts_total, pruned=pruned, pruned_experts_bytes=pruned_experts_bytes,
    )


__all__ = [
    "GPU_SIZES",
    "LAYOUTS",
    "MemoryPlan",
    "QLoRAEstimate",
    "activation_bytes",
    "load_planner_config",
    "lora_parameter_count",
    "meta_model",
    "module_bytes",
    "nf4_bytes",
    "plan_memory",
    "pruned_config",
]
