# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""int8 experts for inference: weight-only int8 with one fp32 scale per output channel, swapped in by module.

    from modeling_sparse_moe.int8_experts import quantize_experts_int8

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = quantize_experts_int8(model)                  # routed + shared experts; `linears=True`: attention too
    model.generate(ids, max_new_tokens=64)                # eager, or compiled (decode: see below)

Imports only torch, transformers and the package's Hub-facing modules, like them.

Format: `w ≈ q * scale[:, None]`, q int8 in [-127, 127] (symmetric: round(w / scale)), scale = max |w| / 127 over the
input dimension of each output channel, fp32 (kept fp32 when the model is cast). The routed experts keep their
layouts, (E, 2F, D) and (E, D, F) in int8, with (E, 2F) and (E, D) scales: 1/4 of the fp32 bytes (1/2 of bf16) plus
4 bytes per output channel.

Every path reads int8 weights and applies the scale to the product's output channels (`(x @ q.T) * scale`, exact
algebra: the scale factors out of each output's sum), so no dequantized weight stack exists, and only experts that
receive tokens are read:
  - Eager (and inside the `sparse_moe::int8_experts` custom op under `torch.compile` when T*K > E, i.e. prefill):
    the planned dispatch of moe_dispatch.py (`plan_dispatch`, one host read); per busy expert its int8 weight is
    widened to the activation dtype right before its product. Decode (the plan in assignment order) runs one
    product per assignment.
  - Compiled decode on CPU (T*K <= E, no gradient): `gathered_experts_forward`'s indexed products with the int8 →
    float conversion inside the loop nest inductor generates, so the decode step streams int8 bytes from memory and
    never writes a widened copy. This is the fast path (figures in docs/quantization-int8-and-planning.md).

NOTE (measured on the project's AMD EPYC VM, torch 2.13 CPU, 1 thread): `torch._weight_int8pack_mm` has an AVX512
kernel for bf16/fp16 activations only; with fp32 activations it ran 7-9x slower than fp32 `F.linear` (a reference
loop), and in bf16 it changes the numerics (the activation is rounded). torchao is not installed and its int8
weight-only path lowers to the same `_weight_int8pack_mm` on CPU. Hence the two paths above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transformers.activations import ACT2FN

from .moe_primitives import KeepBuffersFp32, define_op, plan_dispatch


INT8_MAX = 127
INT8_FORMAT = "int8_per_channel"  # `config.int8_quantization["format"]`: what a saved int8 folder holds
TRAINING_ERROR = (
    "int8 experts are for inference only (weights are frozen int8 without gradients); for training use QLoRA "
    "(4-bit experts with LoRA adapters: load_in_4bit=True and peft) or the full-precision model"
)


# ------------------------------------------------------------------------------------------------------ the format
def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., O, I) float -> (int8 (..., O, I), fp32 scale (..., O)): symmetric per output channel, max |w| -> 127."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=-1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel stays zero with scale 1
    q = torch.round(weight / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight an int8 tensor stands for: q * scale[..., None], fp32 arithmetic, cast to `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


# NOTE: `model.to(torch.bfloat16)` would cast the scales too: a bf16 scale moves every output of its channel by up to
# 0.4%, more than the int8 rounding itself. `KeepBuffersFp32` keeps them fp32; only their device follows.
_KeepScalesFp32 = KeepBuffersFp32


def _check_inference(module: nn.Module, hidden_states: torch.Tensor) -> None:
    if any(t.requires_grad for t in module.buffers()) or (
        module.training and torch.is_grad_enabled() and hidden_states.requires_grad
    ):
        raise ValueError(f"{type(module).__name__}: {TRAINING_ERROR}.")


# ------------------------------------------------------------------------------------------------- expert kernels
def _int8_linear(x_NI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale).T as (x @ q.T) * scale, in the dtype of x (the int8 weight widened right before use)."""
    return F.linear(x_NI, q_OI.to(x_NI.dtype)).mul_(scale_O.to(x_NI.dtype))


def int8_experts_inference(x_TD, top_k_index_TK, top_k_weights_TK, gate_up_EHD, gate_up_scale_EH, down_EDF,
                           down_scale_ED, act_fn) -> torch.Tensor:
    """The planned path on int8 weights -> (T, D) fp32. Only experts with rows are read; dropped assignments (index
    E) are skipped. Decode plan: one product per assignment, the K slots summed in a fixed order (the eager
    reference's); grouped plan: per busy expert, gather its rows, gate/up, activation, down, weighted `index_add_`
    into the fp32 result (a serial loop on CPU: deterministic)."""
    num_experts, hidden, ffn_dim = down_EDF.shape
    plan = plan_dispatch(top_k_index_TK, num_experts)
    if plan.rows_N is None:  # every assignment its expert's only row, in (T, K) order
        rows = x_TD.split(1)
        experts = [expert for expert, _, _ in plan.segments]
        h_AH = torch.cat([
            _int8_linear(rows[a // plan.top_k], gate_up_EHD[e], gate_up_scale_EH[e]) for a, e in enumerate(experts)
        ])
        g_AF = act_fn(h_AH[:, :ffn_dim]) * h_AH[:, ffn_dim:]
        y_AD = torch.cat([_int8_linear(g_1F, down_EDF[e], down_scale_ED[e]) for g_1F, e in zip(g_AF.split(1), experts)])
        weighted_TKD = y_AD.float().view(plan.num_tokens, plan.top_k, hidden) * top_k_weights_TK.float().unsqueeze(-1)
        return weighted_TKD.sum(dim=1)
    weights_N = top_k_weights_TK.reshape(-1).index_select(0, plan.rows_N).float()
    out_TD = x_TD.new_zeros(plan.num_tokens, hidden, dtype=torch.float32)
    for expert, start, end in plan.segments:
        token_R = plan.token_N[start:end]
        h_RH = _int8_linear(x_TD.index_select(0, token_R), gate_up_EHD[expert], gate_up_scale_EH[expert])
        g_RF = act_fn(h_RH[:, :ffn_dim]) * h_RH[:, ffn_dim:]
        y_RD = _int8_linear(g_RF, down_EDF[expert], down_scale_ED[expert])
        out_TD.index_add_(0, token_R, y_RD.float() * weights_N[start:end].unsqueeze(-1))
    return out_TD


def gathered_int8_experts_forward(x_TD, top_k_index_TK, top_k_weights_TK, gate_up_EHD, gate_up_scale_EH, down_EDF,
                                  down_scale_ED, act_fn) -> torch.Tensor:
    """`moe_dispatch.gathered_experts_forward` on int8 weights (compiled decode on CPU): each assignment's int8 rows
    indexed, widened and multiplied inside one inductor loop nest per projection, then scaled per output channel.
    Dropped assignments (index E) read expert E-1 and are masked out. (T, D) fp32."""
    num_tokens, top_k = top_k_index_TK.shape
    num_experts, hidden, ffn_dim = down_EDF.shape
    dtype = x_TD.dtype
    experts_A = top_k_index_TK.reshape(-1)
    kept_A = experts_A < num_experts
    experts_A = experts_A.clamp(max=num_experts - 1)
    x_AD = x_TD.unsqueeze(1).expand(num_tokens, top_k, hidden).reshape(-1, hidden)
    h_AH = (gate_up_EHD[experts_A].to(dtype) * x_AD.unsqueeze(1)).sum(dim=-1) * gate_up_scale_EH[experts_A].to(dtype)
    g_AF = act_fn(h_AH[:, :ffn_dim]) * h_AH[:, ffn_dim:]
    y_AD = (down_EDF[experts_A].to(dtype) * g_AF.unsqueeze(1)).sum(dim=-1) * down_scale_ED[experts_A].to(dtype)
    weighted_AD = torch.where(kept_A.unsqueeze(-1), y_AD.float() * top_k_weights_TK.reshape(-1, 1).float(), 0.0)
    return weighted_AD.view(num_tokens, top_k, hidden).sum(dim=1)


def _int8_experts_kernel(x, top_k_index, top_k_weights, gate_up, gate_up_scale, down, down_scale, act: str):
    return int8_experts_inference(x, top_k_index, top_k_weights, gate_up, gate_up_scale, down, down_scale, ACT2FN[act])


# NOTE: under torch.compile the planned path's host read would break the graph; inside an opaque custom op (with a
# fake) it does not, and the model still compiles in one graph (`fullgraph=True`), as moe_dispatch's planned ops.
define_op(
    "int8_experts", _int8_experts_kernel,
    "(Tensor x, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up, Tensor gate_up_scale, Tensor down, "
    "Tensor down_scale, str act) -> Tensor",
    lambda x, index, weights, gate_up, gate_up_scale, down, down_scale, act: x.new_empty(
        x.shape[0], down.shape[1], dtype=torch.float32
    ),
)


# ------------------------------------------------------------------------------------------------------- modules
class Int8Experts(_KeepScalesFp32, nn.Module):
    """Drop-in for `SparseMoEExperts` at inference: `forward(hidden_states (T, D), top_k_index (T, K), top_k_weights
    (T, K)) -> (T, D)` in the dtype of `hidden_states`; `top_k_index == num_experts` marks a dropped assignment.

    Buffers: `gate_up_proj` int8 (E, 2F, D) with `gate_up_proj_scale` fp32 (E, 2F); `down_proj` int8 (E, D, F) with
    `down_proj_scale` fp32 (E, D). Build with `Int8Experts.from_experts(experts)`."""

    _fp32_buffers = ("gate_up_proj_scale", "down_proj_scale")

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, hidden_act: str):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        E, D, F_ = num_experts, hidden_dim, intermediate_dim
        self.gate_up_proj = nn.Buffer(torch.zeros(E, 2 * F_, D, dtype=torch.int8))
        self.gate_up_proj_scale = nn.Buffer(torch.ones(E, 2 * F_, dtype=torch.float32))
        self.down_proj = nn.Buffer(torch.zeros(E, D, F_, dtype=torch.int8))
        self.down_proj_scale = nn.Buffer(torch.ones(E, D, dtype=torch.float32))

    @classmethod
    def from_experts(cls, experts: nn.Module, hidden_act: str) -> Int8Experts:
        gate_up, down = experts.gate_up_proj, experts.down_proj
        with torch.device(gate_up.device):  # no placeholder allocation elsewhere (meta models stay free)
            module = cls(experts.num_experts, experts.hidden_dim, experts.intermediate_dim, hidden_act)
        module.gate_up_proj, module.gate_up_proj_scale = quantize_per_channel(gate_up)
        module.down_proj, module.down_proj_scale = quantize_per_channel(down)
        return module

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) as float tensors: the weights this module computes with."""
        return (dequantize_per_channel(self.gate_up_proj, self.gate_up_proj_scale, dtype),
                dequantize_per_channel(self.down_proj, self.down_proj_scale, dtype))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        _check_inference(self, hidden_states)
        if hidden_states.shape[0] == 0:
            return hidden_states.new_zeros(hidden_states.shape)
        weights = (self.gate_up_proj, self.gate_up_proj_scale, self.down_proj, self.down_proj_scale)
        if torch.compiler.is_compiling():
            if hidden_states.device.type == "cpu" and top_k_index.numel() <= self.num_experts:
                out_TD = gathered_int8_experts_forward(hidden_states, top_k_index, top_k_weights, *weights, self.act_fn)
            else:
                out_TD = torch.ops.sparse_moe.int8_experts(
                    hidden_states, top_k_index, top_k_weights, *weights, self.hidden_act
                )
        else:
            out_TD = int8_experts_inference(hidden_states, top_k_index, top_k_weights, *weights, self.act_fn)
        return out_TD.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, ffn={self.intermediate_dim}, int8"


class Int8Linear(_KeepScalesFp32, nn.Module):
    """Drop-in for a bias-free or biased `nn.Linear` at inference: int8 `weight` (out, in), fp32 `weight_scale`
    (out,), `bias` as it was. Compiled with few rows (decode), the product is written as a reduction inductor fuses
    with the int8 → float conversion; otherwise `(x @ q.T) * scale`."""

    _fp32_buffers = ("weight_scale",)
    # NOTE: rows up to which the compiled reduction beats widening the weight and calling the GEMM (decode is 1 row)
    FUSED_MAX_ROWS = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Buffer(torch.zeros(out_features, in_features, dtype=torch.int8))
        self.weight_scale = nn.Buffer(torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        with torch.device(linear.weight.device):
            module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.weight, module.weight_scale = quantize_per_channel(linear.weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_inference(self, x)
        rows = x.numel() // self.in_features
        scale = self.weight_scale.to(x.dtype)
        if torch.compiler.is_compiling() and x.device.type == "cpu" and rows <= self.FUSED_MAX_ROWS:
            out = (self.weight.to(x.dtype) * x.unsqueeze(-2)).sum(dim=-1) * scale
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * scale
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


# ------------------------------------------------------------------------------------------------------ the swap
def _is_quantized(module: nn.Module) -> bool:
    if isinstance(module, (Int8Experts, Int8Linear)):
        return True
    if torch.nn.utils.parametrize.is_parametrized(module):  # e.g. bitsandbytes' 4-bit parametrization
        return True
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return any(type(t).__name__ in ("Params4bit", "Int8Params") or t.dtype in (torch.int8, torch.uint8)
               for t in tensors)


def quantize_experts_int8(model: nn.Module, shared_experts: bool = True, linears: bool = False,
                          lm_head: bool = False) -> nn.Module:
    """Replace every MoE block's routed experts (and, with `shared_experts`, its shared experts' linears) by int8
    modules, in place; returns `model`. `linears=True` also quantizes the attention projections and dense MLPs,
    `lm_head=True` the output head. Routers, norms and embeddings stay as they are.

    For inference only (the modules raise a ValueError when asked for gradients). A model that is already quantized
    (int8 here, or 4-bit) is refused with a ValueError."""
    blocks = [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate") and m.experts is not None]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE blocks with `experts` to quantize.")
    if any(_is_quantized(m) for m in model.modules()):
        raise ValueError(
            "this model is already quantized (int8 or 4-bit weights found); quantize_experts_int8 needs the "
            "full-precision model: reload it with from_pretrained (without quantization_config) and quantize once."
        )
    hidden_act = model.config.hidden_act
    targets: list[tuple[nn.Module, str, nn.Module]] = []
    for block in blocks:
        block.experts = Int8Experts.from_experts(block.experts, hidden_act)
        if shared_experts and getattr(block, "shared_experts", None) is not None:
            targets += [(block.shared_experts, name, child) for name, child in block.shared_experts.named_children()]
    if linears:
        shared = {block.shared_experts for block in blocks}
        for module in model.modules():
            if type(module).__name__.endswith(("Attention", "MLP")) and module not in shared:
                targets += [(module, name, child) for name, child in module.named_children()]
    if lm_head and getattr(model, "lm_head", None) is not None:
        if model.config.tie_word_embeddings:
            raise ValueError("lm_head=True needs untied embeddings: the head shares its weight with the input "
                             "embeddings; quantize without lm_head=True.")
        targets.append((model, "lm_head", model.lm_head))
    for parent, name, child in targets:
        if isinstance(child, nn.Linear):
            setattr(parent, name, Int8Linear.from_linear(child))
    names = [name for name, m in model.named_modules() if isinstance(m, (Int8Experts, Int8Linear))]
    model.config.int8_quantization = {"format": INT8_FORMAT, "modules": names}
    return model


# -------------------------------------------------------------------------------------------- save and reload
def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module] | None:
    """(parent, attribute, module) for a dotted module name recorded on the causal LM, also from its base model (the
    record's `model.` prefix dropped), or None when the model has no such module (e.g. a head the class lacks)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    for candidate in (name, name[len(prefix):] if name.startswith(prefix) else None):
        if candidate is None:
            continue
        parent_name, _, attribute = candidate.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            continue
        child = getattr(parent, attribute, None)
        if isinstance(child, nn.Module):
            return parent, attribute, child
    return None


def prepare_int8_layout(model: nn.Module) -> None:
    """Called when a model is built (`post_init`): a config that records int8 modules (`config.int8_quantization`,
    written by `quantize_experts_int8`, saved in config.json) gets those modules as empty int8 modules, for the
    checkpoint to fill. A 4-bit `quantization_config` on the same config is refused: the weights are int8 already."""
    config = getattr(model, "config", None)
    spec = getattr(config, "int8_quantization", None)
    if not spec:
        return
    if spec.get("format") != INT8_FORMAT:
        raise ValueError(f"config.int8_quantization has format {spec.get('format')!r}; this code reads "
                         f"{INT8_FORMAT!r} (int8 weights, fp32 scales per output channel).")
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            "this folder holds an int8 model (config.int8_quantization) and cannot be loaded with a 4-bit "
            "quantization_config: load it without quantization_config, or quantize the full-precision model to 4 bits."
        )
    for name in spec.get("modules", []):
        found = _resolve(model, name)
        if found is None or isinstance(found[2], (Int8Experts, Int8Linear)):
            continue
        parent, attribute, child = found
        if isinstance(child, nn.Linear):
            with torch.device(child.weight.device):
                module = Int8Linear(child.in_features, child.out_features, child.bias is not None)
        elif getattr(child, "is_sparse_moe_experts", False):
            with torch.device(child.gate_up_proj.device):
                module = Int8Experts(child.num_experts, child.hidden_dim, child.intermediate_dim, config.hidden_act)
        else:
            raise ValueError(f"config.int8_quantization names {name!r}, a {type(child).__name__}: only experts and "
                             f"linear layers are stored in int8.")
        setattr(parent, attribute, module)


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the int8 modules' weights and scales in `model` (the share of `get_memory_footprint()` they make)."""
    return sum(
        t.nelement() * t.element_size()
        for m in model.modules() if isinstance(m, (Int8Experts, Int8Linear))
        for t in m.buffers(recurse=False)
    )


__all__ = [
    "Int8Experts",
    "Int8Linear",
    "dequantize_per_channel",
    "gathered_int8_experts_forward",
    "int8_experts_inference",
    "int8_weight_bytes",
    "prepare_int8_layout",
    "quantize_experts_int8",
    "quantize_per_channel",
]
