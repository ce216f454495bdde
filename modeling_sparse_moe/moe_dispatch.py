# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Fast expert dispatch for SparseMoE, registered in transformers' `ExpertsInterface` as `"sparse_moe"`.

Hub-facing file: it is copied next to `config.json` and must import only torch, transformers and its siblings.
`modeling_sparse_moe.py` imports it, which registers the implementation and makes it the default.

Shape legend: T tokens, K experts per token, A = T*K assignments, N assignments actually computed (A minus the
dropped ones), E experts, D hidden, F expert hidden. `x_TD` is a (T, D) tensor; `w_EFD` an (E, F, D) weight.

Four ways to run; `sparse_moe_experts_forward` chooses (with `_use_gathered_path` and `_use_static_path`), for these
reasons:
  - Planned (eager on CPU, steps 1-4 below): reads the per-expert counts back to the host once per call and then runs
    only what exists: no GEMM work or buffer rows for dropped assignments, experts with rows only, the decode plan
    without a sort, long segments expert by expert. On CPU the "host read" is free (host and device are one), and
    this path is level with or ahead of transformers' `grouped_mm` there (README, Performance).
  - Planned, inside custom ops (`planned_ops_experts_forward`: under `torch.compile` on CPU, SiLU experts): the same
    kernels behind `sparse_moe::planned_up` / `planned_down` (with autograd) and `planned_inference`, each with a
    registered fake, so the model still compiles into one graph (`fullgraph=True`) and inductor fuses everything
    around the experts. On CPU the static path's kernels took 1.13x these kernels' time for the experts' forward +
    backward (fp32, 512 tokens, shape of scripts/bench_model.py), and its decode step paid for `grouped_mm`'s empty
    groups.
  - Gathered (`gathered_experts_forward`: under `torch.compile` on CPU, no gradient, T*K <= E, i.e. decode): each
    assignment's expert weights indexed and multiplied in plain tensor ops, which inductor fuses into one loop nest per
    projection; on the project's AMD EPYC VM it streamed the weights about twice as fast as the BLAS matrix-vector
    products, and it needs no custom op (figures in `_use_gathered_path`).
  - Static (`static_experts_forward`: on every accelerator, and under `torch.compile` where the planned ops cannot
    run): every shape is a function of T, K, E, D, F and nothing is read back to the host. A host read costs a GPU a
    pipeline stall per MoE layer per step, rules out CUDA graphs, and under `torch.compile` a data-dependent shape
    breaks the graph (`fullgraph=True` fails; `generate(cache_implementation="static")` auto-compiles only a model
    that compiles in one graph). It sorts all T*K assignments, bounds each expert's rows with device-side offsets
    (`searchsorted`), and runs `F.grouped_mm` (bf16: traced as is, differentiable, CUDA-graph safe) or the
    `sparse_moe::grouped_linear` custom op (other dtypes: `torch._grouped_mm` has no fake/meta support for them in
    torch 2.13, so the op is opaque to the compiler, with a registered fake and autograd). Dropped assignments sort
    past the last offset, so they cost no GEMM work either.

How the planned path works:
  1. Plan (`plan_dispatch`): sort the A assignments by expert once and read the per-expert counts back to the host
     with a single `.tolist()`. Dropped assignments (index >= E, the capacity sentinel) sort to the tail and are never
     computed. When no two assignments share an expert (always the case for one token: decode), the plan keeps the
     assignments in their own order and skips the sort and the un-sort entirely.
  2. Experts: one grouped GEMM per projection over the contiguous per-expert segments (`torch.nn.functional.
     grouped_mm` where it runs, else one `torch.mm` per non-empty segment). Only the weights of experts that received
     tokens are read; no expert is padded to a capacity. Decode (the plan in assignment order) runs one `F.linear`
     per assignment on the expert's weight as it is, with the activation batched over all rows. On CPU, when experts
     average `PIPELINE_MIN_ROWS_PER_EXPERT` rows or more ("long segments"), each expert instead gathers its own rows
     right before its products: inference runs each expert start to finish (gather, gate/up, activation, down,
     weighted add into the output); training does the same in the forward, and in the backward runs each expert's
     down-projection backward (activation gradient included), input gradient and weight gradients on its own rows.
     Temporaries stay small and in cache, and only the (N, F) pre-activations and their gradients are full-size.
  3. Combine: the weighted rows of a token are summed in fp32. On CPU with `index_add_` into the (T, D) result
     (a serial loop there: deterministic; for K = 2 the same bits as the reference), because un-sorting into a fresh
     (T*K, D) buffer costs more than the sum: glibc maps every buffer above 32 MiB afresh, and its page faults cost
     ~10 ms per 32 MiB on this VM (shape B, 2048 tokens). Elsewhere the N outputs are put back in (T, K) order
     (unique positions) and the K slots summed in a fixed order, as in the eager reference (CUDA's `index_add_` is
     atomic, hence not deterministic).
  4. Backward (`_UpProjection`, `_DownProjection`): grouped GEMMs too. A weight gradient is written only for experts
     that received tokens (one mm straight into the (E, 2F, D) / (E, D, F) gradient); idle experts get zeros. The
     autograd graph of the eager loop instead materialises a full-size 3D gradient per expert.

NOTE (measured on CPU, fp32, 2 threads; see scripts/bench_moe.py): `grouped_mm` beat a python loop of `torch.mm` by
5-25% (its loop runs in C++), so the loop only serves the decode plan and devices without a grouped kernel. Weight
gradients always use the loop: it skips idle experts, which `grouped_mm` does not.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface
from transformers.utils.import_utils import is_torch_greater_or_equal

from .moe_primitives import DispatchPlan, define_op, plan_dispatch
from .quantization import is_quantized_experts, quantized_experts_forward


SPARSE_MOE_EXPERTS = "sparse_moe"
# NOTE: glibc serves allocations above 32 MiB with fresh mmap pages, and their page faults are paid on every call.
# Above this size the (N, 2F) gate/up product is computed as two (N, F) halves (CPU, shape A, 2048 tokens, inference,
# one thread: 1.18x -> 1.04x the dense FFN in one measurement).
FUSED_GATE_UP_MAX_BYTES = 32 * 2**20
# NOTE: on CPU, experts with this many rows on average gather their own rows and run one by one (see step 2 of the
# module docstring). Shape B, 2048 tokens (256 rows each), inference: 1.45-1.47x the dense FFN against 1.81x with
# grouped GEMMs in one interleaved measurement; at 64 rows per expert it is a wash or slightly worse.
PIPELINE_MIN_ROWS_PER_EXPERT = 128


# ----------------------------------------------------------------------------------------------------------- compute
def _grouped_mm_usable(a_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs on these operands: a kernel for the device, 16-byte aligned operands."""
    if not hasattr(F, "grouped_mm"):
        return False
    device = a_NI.device
    if device.type == "cpu":
        if not is_torch_greater_or_equal("2.9", accept_dev=True):  # no CPU kernel before
            return False
    elif device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False
    else:
        return False
    for t in (a_NI, w_EOI):
        if t.data_ptr() % 16 or any(s != 1 and (s * t.element_size()) % 16 for s in t.stride()):
            return False
    return True


def _grouped_linear(a_NI: torch.Tensor, w_EOI: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """out[s:e] = a[s:e] @ w[expert].T for every segment: a grouped `F.linear`. `w_EOI` may be a strided view."""
    if plan.offsets_E is not None and plan.segments and _grouped_mm_usable(a_NI, w_EOI):
        try:
            return F.grouped_mm(a_NI, w_EOI.mT, offs=plan.offsets_E)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # NOTE: a layout constraint of some device's kernel that the check above misses
            pass
    out_NO = a_NI.new_empty(a_NI.shape[0], w_EOI.shape[1])
    for expert, start, end in plan.segments:
        torch.mm(a_NI[start:end], w_EOI[expert].t(), out=out_NO[start:end])
    return out_NO


def _segment_weight_grad(grad_NO: torch.Tensor, a_NI: torch.Tensor, plan: DispatchPlan, out_EOI: torch.Tensor):
    """out[expert] = grad[s:e].T @ a[s:e], written in place (`out_EOI` may be a view); idle experts get zeros."""
    for expert, start, end in plan.segments:
        torch.mm(grad_NO[start:end].t(), a_NI[start:end], out=out_EOI[expert])
    for start, end in plan.idle_experts(out_EOI.shape[0]):
        out_EOI[start:end].zero_()
    return out_EOI


def _is_silu(act_fn) -> bool:
    return isinstance(act_fn, (SiLUActivation, torch.nn.SiLU))


def _activation(act_fn, gate_NF: torch.Tensor) -> torch.Tensor:
    return F.silu(gate_NF) if _is_silu(act_fn) else act_fn(gate_NF)


def _gated_act_backward(act_fn, gate_NF, up_NF, act_NF, grad_g_NF, num_parts: int) -> tuple[torch.Tensor, ...]:
    """Gradient of g = act(gate) * up, as pre-activation parts: `(grad_h_NH,)` or `(grad_gate_NF, grad_up_NF)`.
    Consumes `act_NF` = act(gate): when split, a SiLU output's buffer becomes the up gradient."""
    if num_parts == 1:
        grad_parts = (gate_NF.new_empty(gate_NF.shape[0], 2 * gate_NF.shape[1]),)
        grad_gate_NF, grad_up_NF = grad_parts[0].chunk(2, dim=-1)
        torch.mul(grad_g_NF, act_NF, out=grad_up_NF)
    else:
        # NOTE: any other activation might hand back its input (the saved gate) as act_NF: never write into that.
        grad_up_NF = act_NF.mul_(grad_g_NF) if _is_silu(act_fn) else act_NF * grad_g_NF
        grad_gate_NF = torch.empty_like(grad_up_NF)
        grad_parts = (grad_gate_NF, grad_up_NF)
    _gate_grad_into(act_fn, gate_NF, up_NF, grad_g_NF, grad_gate_NF)
    return grad_parts


def _gate_grad_into(act_fn, gate_NF, up_NF, grad_g_NF, grad_gate_NF) -> None:
    """grad_gate = act'(gate) * grad_g * up, written into `grad_gate_NF`."""
    torch.mul(grad_g_NF, up_NF, out=grad_gate_NF)  # d(act(gate)), turned into d(gate) in place below
    if _is_silu(act_fn):
        torch.ops.aten.silu_backward.grad_input(grad_gate_NF, gate_NF, grad_input=grad_gate_NF)
    else:
        with torch.enable_grad():
            leaf_NF = gate_NF.detach().requires_grad_(True)
            grad_gate_NF.copy_(torch.autograd.grad(act_fn(leaf_NF), leaf_NF, grad_gate_NF)[0])


def _unsort_rows(rows_NX: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Computed rows back to (T, K, X) assignment order; dropped assignments are zero rows."""
    num_tokens, top_k = plan.num_tokens, plan.top_k
    if plan.rows_N is None:
        return rows_NX.view(num_tokens, top_k, -1)
    num_assignments = num_tokens * top_k
    alloc = torch.empty if plan.num_rows == num_assignments else torch.zeros
    rows_AX = alloc(num_assignments, rows_NX.shape[-1], dtype=rows_NX.dtype, device=rows_NX.device)
    rows_AX.index_copy_(0, plan.rows_N, rows_NX)  # unique positions: no accumulation, deterministic
    return rows_AX.view(num_tokens, top_k, -1)


def _per_row(values_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    values_A = values_TK.reshape(-1)
    return values_A if plan.rows_N is None else values_A.index_select(0, plan.rows_N)


def _scale_rows_(rows_NX: torch.Tensor, weights_N1: torch.Tensor) -> torch.Tensor:
    """rows * weight computed in fp32 and cast back to the rows' dtype; in place when the rows are fp32."""
    if rows_NX.dtype == torch.float32:
        return rows_NX.mul_(weights_N1)
    return (rows_NX.float() * weights_N1).to(rows_NX.dtype)


def _sum_per_token(rows_NX: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(T, X): the sum of each token's computed rows (dropped assignments add nothing), accumulated in fp32 on CPU
    (in the rows' dtype elsewhere, as the (T, K) sum of the reference); the caller casts.

    CPU: one `index_add_` into the (T, X) result, deterministic there (a serial loop over the rows, i.e. expert order;
    for K = 2 the same bits as the (T, K) sum). NOTE: the alternative, un-sorting into a fresh (T*K, X) buffer, costs
    more than the sum itself on CPU: glibc maps buffers above 32 MiB afresh on every call (B, 2048 tokens: 10 ms of page
    faults per buffer, against 2 ms for the index_add_). Other devices sum the K slots in a fixed order (CUDA's
    `index_add_` accumulates with atomics, in no fixed order)."""
    if plan.rows_N is None:
        return rows_NX.view(plan.num_tokens, plan.top_k, -1).sum(dim=1)
    if rows_NX.device.type == "cpu":
        sum_TX = rows_NX.new_zeros(plan.num_tokens, rows_NX.shape[-1], dtype=torch.float32)
        return sum_TX.index_add_(0, plan.token_N, rows_NX.float())  # NOTE: bf16 adds would round after every row
    return _unsort_rows(rows_NX, plan).sum(dim=1)


def _combine(y_ND: torch.Tensor, top_k_weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """sum_k weight[t, k] * y[t, k] in fp32 (consumes y_ND): the products of the eager reference, summed per token."""
    weights_N1 = _per_row(top_k_weights_TK, plan).float().unsqueeze(-1)
    if y_ND.dtype == torch.float32:  # same products as the reference, without an extra (N, D) buffer
        return _sum_per_token(_scale_rows_(y_ND, weights_N1), plan)
    return _sum_per_token(y_ND.float() * weights_N1, plan)


def _fuse_gate_up(plan: DispatchPlan, gate_up_EHD: torch.Tensor) -> bool:
    return plan.num_rows * gate_up_EHD.shape[1] * gate_up_EHD.element_size() <= FUSED_GATE_UP_MAX_BYTES


def _long_segments(plan: DispatchPlan, device: torch.device) -> bool:
    """CPU, rows grouped, and experts averaging `PIPELINE_MIN_ROWS_PER_EXPERT` rows or more: then each expert gathers
    its own rows right before its products (small, cache-resident temporaries) instead of one (N, D) gather first (a
    fresh buffer of N*D elements; see `_sum_per_token` on what those cost on CPU). Other devices keep the grouped
    kernels: a python loop of per-expert launches would cost more there than the buffers."""
    return (
        device.type == "cpu"
        and plan.rows_N is not None
        and plan.num_rows >= PIPELINE_MIN_ROWS_PER_EXPERT * len(plan.segments)
    )


def _up_projection(x_TD, gate_up_EHD, plan: DispatchPlan, num_parts: int | None = None) -> tuple[torch.Tensor, ...]:
    """Pre-activations of the computed rows as "parts": `(h_NH,)` = [gate | up] from one product, or `(gate_NF,
    up_NF)` from two when the (N, 2F) buffer would be large (unless `num_parts` says)."""
    if num_parts is None:
        num_parts = 1 if _fuse_gate_up(plan, gate_up_EHD) else 2
    weight_parts = gate_up_EHD.chunk(num_parts, dim=1)
    if _long_segments(plan, x_TD.device):
        parts = tuple(x_TD.new_empty(plan.num_rows, w.shape[1]) for w in weight_parts)
        for expert, start, end in plan.segments:
            x_RD = x_TD.index_select(0, plan.token_N[start:end])
            for part, weight in zip(parts, weight_parts):
                torch.mm(x_RD, weight[expert].t(), out=part[start:end])
        return parts
    x_ND = x_TD.index_select(0, plan.token_N)
    return tuple(_grouped_linear(x_ND, weight, plan) for weight in weight_parts)


def _gate_and_up(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return parts[0].chunk(2, dim=-1) if len(parts) == 1 else parts


def _down_projection(parts, top_k_weights_TK, down_EDF, act_fn, plan: DispatchPlan, in_place: bool) -> torch.Tensor:
    """Gated activation, down product and combine -> (T, D). `in_place` reuses the gate buffer (inference)."""
    gate_NF, up_NF = _gate_and_up(parts)
    if in_place:
        g_NF = (F.silu(gate_NF, inplace=True) if _is_silu(act_fn) else act_fn(gate_NF)).mul_(up_NF)
    else:
        g_NF = _activation(act_fn, gate_NF) * up_NF
    y_ND = _grouped_linear(g_NF, down_EDF, plan)
    del g_NF
    return _combine(y_ND, top_k_weights_TK, plan).to(gate_NF.dtype)


def _add_weighted_rows_(out_TD: torch.Tensor, y_RD: torch.Tensor, weights_R1: torch.Tensor, token_R: torch.Tensor):
    """out[token] += weight * y for one expert's rows (CPU long segments): `_combine`'s fp32 products, added in place
    into the fp32 (T, D) result. Consumes y_RD."""
    y_RD = y_RD.mul_(weights_R1) if y_RD.dtype == torch.float32 else y_RD.float() * weights_R1
    out_TD.index_add_(0, token_R, y_RD)


def _down_projection_long(parts, top_k_weights_TK, down_EDF, act_fn, plan: DispatchPlan) -> torch.Tensor:
    """`_down_projection` for long segments on CPU (training forward): per expert, activation, down product and a
    weighted add into the (T, D) result; no (N, F) or (N, D) temporary. The saved pre-activations are not touched."""
    gate_NF, up_NF = _gate_and_up(parts)
    weights_N1 = _per_row(top_k_weights_TK, plan).float().unsqueeze(-1)
    out_TD = gate_NF.new_zeros(plan.num_tokens, down_EDF.shape[1], dtype=torch.float32)
    for expert, start, end in plan.segments:
        g_RF = _activation(act_fn, gate_NF[start:end]) * up_NF[start:end]
        y_RD = torch.mm(g_RF, down_EDF[expert].t())
        _add_weighted_rows_(out_TD, y_RD, weights_N1[start:end], plan.token_N[start:end])
    return out_TD.to(gate_NF.dtype)


def _decode_inference(x_TD, top_k_weights_TK, gate_up_EHD, down_EDF, act_fn, plan: DispatchPlan) -> torch.Tensor:
    """The decode plan (every assignment its expert's only row, in (T, K) order): one `F.linear` per assignment and
    projection on the expert's weight as it is, the activation once over all rows, and the (T, K) combine.

    NOTE: this is the fewest python-level tensor ops we found: at 1 token an op costs 2-5 us against ~30 us for
    reading one expert's weights, and `torch.mm(a[s:e], w[e].t(), out=o[s:e])` makes four views per call (measured,
    experts alone at 1 token: 0.95 -> 0.71 ms for shape A, 0.93 -> 0.65 ms for shape B, the same bits)."""
    top_k, ffn_dim = plan.top_k, down_EDF.shape[-1]
    rows = (x_TD,) if plan.num_tokens == 1 else x_TD.split(1)
    experts = [expert for expert, _, _ in plan.segments]
    h_AH = torch.cat([F.linear(rows[a // top_k], gate_up_EHD[expert]) for a, expert in enumerate(experts)])
    gate_AF, up_AF = h_AH[:, :ffn_dim], h_AH[:, ffn_dim:]
    g_AF = (F.silu(gate_AF, inplace=True) if _is_silu(act_fn) else act_fn(gate_AF)).mul_(up_AF)
    y_AD = torch.cat([F.linear(g_1F, down_EDF[expert]) for g_1F, expert in zip(g_AF.split(1), experts)])
    if y_AD.dtype != torch.float32:
        return _combine(y_AD, top_k_weights_TK, plan).to(x_TD.dtype)
    # `_combine`'s products and (T, K) sum, in three ops
    return y_AD.view(plan.num_tokens, top_k, -1).mul_(top_k_weights_TK.float().unsqueeze(-1)).sum(dim=1)


def _experts_inference(x_TD, top_k_weights_TK, gate_up_EHD, down_EDF, act_fn, plan: DispatchPlan) -> torch.Tensor:
    if plan.rows_N is None:
        return _decode_inference(x_TD, top_k_weights_TK, gate_up_EHD, down_EDF, act_fn, plan)
    if not _long_segments(plan, x_TD.device):
        parts = _up_projection(x_TD, gate_up_EHD, plan)
        return _down_projection(parts, top_k_weights_TK, down_EDF, act_fn, plan, in_place=True)
    # Long segments (CPU): run each expert start to finish (gather, gate/up, activation, down) while its rows are in
    # cache, with (rows, 2F) temporaries instead of (N, 2F) ones, and add its weighted rows into the (T, D) result
    # straight away (see `_sum_per_token`), so no (N, D) buffer exists either.
    ffn_dim = down_EDF.shape[-1]
    weights_N1 = _per_row(top_k_weights_TK, plan).float().unsqueeze(-1)
    out_TD = x_TD.new_zeros(plan.num_tokens, x_TD.shape[-1], dtype=torch.float32)
    for expert, start, end in plan.segments:
        token_R = plan.token_N[start:end]
        h_RH = torch.mm(x_TD.index_select(0, token_R), gate_up_EHD[expert].t())
        gate_RF, up_RF = h_RH[:, :ffn_dim], h_RH[:, ffn_dim:]
        g_RF = (F.silu(gate_RF, inplace=True) if _is_silu(act_fn) else act_fn(gate_RF)).mul_(up_RF)
        _add_weighted_rows_(out_TD, torch.mm(g_RF, down_EDF[expert].t()), weights_N1[start:end], token_R)
    return out_TD.to(x_TD.dtype)


# NOTE: training uses two autograd nodes, not one. Autograd frees the pre-activations saved by `_DownProjection` as
# soon as its backward returns, before `_UpProjection` builds the (E, 2F, D) gradient: with one node they would still
# be held there, and the peak would exceed transformers' grouped_mm by their size.
class _UpProjection(torch.autograd.Function):
    """(x_TD, gate_up_EHD) -> pre-activation parts (see `_up_projection`). Backward: grouped input gradient and
    per-expert weight gradient, one product per part."""

    @staticmethod
    def forward(ctx, x_TD, gate_up_EHD, plan):
        ctx.plan = plan
        ctx.save_for_backward(x_TD, gate_up_EHD)
        return _up_projection(x_TD, gate_up_EHD, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_parts):
        x_TD, gate_up_EHD = ctx.saved_tensors
        return *_up_backward(grad_parts, x_TD, gate_up_EHD, ctx.plan, *ctx.needs_input_grad[:2]), None


def _up_backward(grad_parts, x_TD, gate_up_EHD, plan: DispatchPlan, need_x: bool, need_gate_up: bool):
    """`_UpProjection`'s gradients: (grad x_TD or None, grad gate_up_EHD or None)."""
    rows_per_part = gate_up_EHD.shape[1] // len(grad_parts)
    weight_parts = [gate_up_EHD[:, i * rows_per_part : (i + 1) * rows_per_part] for i in range(len(grad_parts))]
    grad_x_TD = grad_gate_up_EHD = None
    if need_x and _long_segments(plan, x_TD.device):
        # Per expert: its rows' input gradient, added into (T, D) at once (the gather's backward).
        grad_x_TD = grad_parts[0].new_zeros(x_TD.shape, dtype=torch.float32)  # fp32 sums, as `_sum_per_token`
        for expert, start, end in plan.segments:
            grad_x_RD = torch.mm(grad_parts[0][start:end], weight_parts[0][expert])
            for grad_part, weight_part in zip(grad_parts[1:], weight_parts[1:]):
                grad_x_RD.addmm_(grad_part[start:end], weight_part[expert])
            grad_x_TD.index_add_(0, plan.token_N[start:end], grad_x_RD.float())
        grad_x_TD = grad_x_TD.to(x_TD.dtype)
    elif need_x:
        grad_x_ND = _grouped_linear(grad_parts[0], weight_parts[0].mT, plan)
        for grad_part, weight_part in zip(grad_parts[1:], weight_parts[1:]):
            grad_x_ND += _grouped_linear(grad_part, weight_part.mT, plan)
        grad_x_TD = _sum_per_token(grad_x_ND, plan).to(x_TD.dtype)  # the gather's backward
        del grad_x_ND
    if need_gate_up:
        grad_gate_up_EHD = torch.empty_like(gate_up_EHD)
        grad_weight_parts = grad_gate_up_EHD.chunk(len(grad_parts), dim=1)
        if _long_segments(plan, x_TD.device):
            for expert, start, end in plan.segments:
                x_RD = x_TD.index_select(0, plan.token_N[start:end])
                for grad_part, grad_weight in zip(grad_parts, grad_weight_parts):
                    torch.mm(grad_part[start:end].t(), x_RD, out=grad_weight[expert])
            for start, end in plan.idle_experts(grad_gate_up_EHD.shape[0]):
                grad_gate_up_EHD[start:end].zero_()
        else:
            x_ND = x_TD.index_select(0, plan.token_N)
            for grad_part, grad_weight in zip(grad_parts, grad_weight_parts):
                _segment_weight_grad(grad_part, x_ND, plan, grad_weight)
    return grad_x_TD, grad_gate_up_EHD


class _DownProjection(torch.autograd.Function):
    """(top_k_weights_TK, down_EDF, *parts) -> out_TD: activation, down product, weighted combine.

    Saves only the pre-activations. NOTE: the routing-weight gradient <grad_out, y> is computed as
    <grad_out @ W_down, act(gate) * up> = <u, g>, so y (N, D) need not be kept; u is also what the activation
    gradient needs (scaled by the routing weight).
    """

    @staticmethod
    def forward(ctx, top_k_weights_TK, down_EDF, act_fn, plan, *parts):
        ctx.act_fn, ctx.plan = act_fn, plan
        ctx.save_for_backward(top_k_weights_TK, down_EDF, *parts)
        if _long_segments(plan, down_EDF.device):
            return _down_projection_long(parts, top_k_weights_TK, down_EDF, act_fn, plan)
        return _down_projection(parts, top_k_weights_TK, down_EDF, act_fn, plan, in_place=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out_TD):
        top_k_weights_TK, down_EDF, *parts = ctx.saved_tensors
        need = ctx.needs_input_grad[0], ctx.needs_input_grad[1], any(ctx.needs_input_grad[4:])
        grad_weights_TK, grad_down_EDF, grad_parts = _down_backward(
            grad_out_TD, top_k_weights_TK, down_EDF, parts, ctx.act_fn, ctx.plan, *need
        )
        return grad_weights_TK, grad_down_EDF, None, None, *grad_parts


def _down_backward(grad_out_TD, top_k_weights_TK, down_EDF, parts, act_fn, plan, need_weights, need_down, need_h):
    """`_DownProjection`'s gradients: (routing weights (T, K) or None, down_proj or None, pre-activation parts)."""
    grad_out_TD = grad_out_TD.to(parts[0].dtype)
    # d(out)/d(y) is the routing weight, cast to the expert dtype as the reference's `.float()` backward does.
    weights_N1 = _per_row(top_k_weights_TK, plan).float().unsqueeze(-1)
    backward = _down_backward_long if _long_segments(plan, grad_out_TD.device) else _down_backward_grouped
    grad_weights_N, grad_down_EDF, grad_parts = backward(
        grad_out_TD, weights_N1, down_EDF, parts, act_fn, plan, need_weights, need_down, need_h
    )
    grad_weights_TK = None
    if grad_weights_N is not None:
        grad_weights_TK = _unsort_rows(grad_weights_N.unsqueeze(-1), plan).view_as(top_k_weights_TK)
        grad_weights_TK = grad_weights_TK.to(top_k_weights_TK.dtype)
    return grad_weights_TK, grad_down_EDF, grad_parts


def _down_backward_grouped(grad_out_TD, weights_N1, down_EDF, parts, act_fn, plan, need_weights, need_down, need_h):
    """`_DownProjection` gradients with grouped GEMMs over (N, .) buffers: (routing weights (N,) fp32 or None,
    down_proj gradient or None, pre-activation gradient parts (or Nones))."""
    gate_NF, up_NF = _gate_and_up(parts)
    act_NF = _activation(act_fn, gate_NF)
    g_NF = act_NF * up_NF if (need_weights or need_down) else None
    grad_out_ND = grad_out_TD.index_select(0, plan.token_N)
    u_NF = _grouped_linear(grad_out_ND, down_EDF.mT, plan) if (need_weights or need_h) else None
    grad_down_EDF = None
    if need_down:
        grad_y_ND = _scale_rows_(grad_out_ND, weights_N1)  # grad_out_ND is our own gathered copy
        grad_down_EDF = _segment_weight_grad(grad_y_ND, g_NF, plan, torch.empty_like(down_EDF))
        del grad_y_ND
    del grad_out_ND
    grad_weights_N = (u_NF.float() * g_NF.float()).sum(dim=-1) if need_weights else None
    del g_NF
    grad_parts = [None] * len(parts)
    if need_h:
        grad_g_NF = _scale_rows_(u_NF, weights_N1)
        del u_NF
        grad_parts = _gated_act_backward(act_fn, gate_NF, up_NF, act_NF, grad_g_NF, len(parts))
    return grad_weights_N, grad_down_EDF, grad_parts


def _down_backward_long(grad_out_TD, weights_N1, down_EDF, parts, act_fn, plan, need_weights, need_down, need_h):
    """`_down_backward_grouped` for long segments on CPU: every expert runs its whole backward on its own rows
    (gather grad_out, u = grad_out @ W_down, weight gradients, activation gradient), so the temporaries are
    (rows, F) and cache-resident; only the results are full-size."""
    gate_NF, up_NF = _gate_and_up(parts)
    grad_down_EDF = torch.empty_like(down_EDF) if need_down else None
    grad_weights_N = gate_NF.new_empty(plan.num_rows, dtype=torch.float32) if need_weights else None
    grad_parts, grad_gate_NF, grad_up_NF = [None] * len(parts), None, None
    if need_h:
        grad_parts = [torch.empty_like(part) for part in parts]
        grad_gate_NF, grad_up_NF = _gate_and_up(grad_parts)
    for expert, start, end in plan.segments:
        gate_RF, up_RF, weights_R1 = gate_NF[start:end], up_NF[start:end], weights_N1[start:end]
        act_RF = _activation(act_fn, gate_RF)
        grad_out_RD = grad_out_TD.index_select(0, plan.token_N[start:end])
        u_RF = torch.mm(grad_out_RD, down_EDF[expert]) if (need_weights or need_h) else None
        if need_weights or need_down:
            g_RF = act_RF * up_RF
            if need_weights:
                grad_weights_N[start:end] = (u_RF.float() * g_RF.float()).sum(dim=-1)
            if need_down:
                grad_y_RD = _scale_rows_(grad_out_RD, weights_R1)
                torch.mm(grad_y_RD.t(), g_RF, out=grad_down_EDF[expert])
        if need_h:
            grad_g_RF = _scale_rows_(u_RF, weights_R1)
            torch.mul(grad_g_RF, act_RF, out=grad_up_NF[start:end])
            _gate_grad_into(act_fn, gate_RF, up_RF, grad_g_RF, grad_gate_NF[start:end])
    if need_down:
        for start, end in plan.idle_experts(down_EDF.shape[0]):
            grad_down_EDF[start:end].zero_()
    return grad_weights_N, grad_down_EDF, grad_parts


# ---------------------------------------------------------------------------------------- static path (sync-free)
# NOTE: `torch._grouped_mm`'s meta function accepts bf16 only (torch 2.13), so a compiled graph can call
# `F.grouped_mm` natively in bf16 alone; other dtypes go through the opaque custom op below, whose eager kernel is
# `F.grouped_mm` too (CPU runs it in fp32) or, where no grouped kernel takes the operands, a per-expert `torch.mm`
# loop (one host read of the offsets). Both treat rows past `offsets_E[-1]` (dropped assignments) as don't-care.
def _grouped_linear_kernel(a_AI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[s:e] = a[s:e] @ w[expert].T for the row ranges given by cumulative `offsets_E`; (A, O), contiguous, rows
    past `offsets_E[-1]` zero (a custom op's outputs must be a function of its inputs; the kernel leaves them unset).

    NOTE: on CPU the offsets are read on the host (free there) and an expert without rows costs nothing; torch's CPU
    `grouped_mm` runs one `mm` per group, empty ones included, which made a compiled decode step (2 of 8 experts
    busy) 2-3% slower than transformers' loop. `grouped_mm` serves the CPU only when every expert has rows."""
    bounds = offsets_E.tolist() if a_AI.device.type == "cpu" else None
    all_busy = bounds is None or all(end > start for start, end in zip([0] + bounds[:-1], bounds))
    if all_busy and _grouped_mm_usable(a_AI, w_EOI):
        try:
            out_AO = F.grouped_mm(a_AI, w_EOI.mT, offs=offsets_E).contiguous()
            tail_A1 = torch.arange(a_AI.shape[0], device=a_AI.device).unsqueeze(-1) >= offsets_E[-1:]
            return out_AO.masked_fill_(tail_A1, 0)  # device-side: no host read
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # NOTE: a dtype or layout the device's kernel refuses (e.g. fp32 on some GPUs)
            pass
    bounds = offsets_E.tolist() if bounds is None else bounds  # the fallback's one host read off the CPU
    out_AO = a_AI.new_empty(a_AI.shape[0], w_EOI.shape[1])
    start = 0
    for expert, end in enumerate(bounds):
        if end > start:
            torch.mm(a_AI[start:end], w_EOI[expert].t(), out=out_AO[start:end])
        start = end
    if start < a_AI.shape[0]:
        out_AO[start:].zero_()
    return out_AO


def _grouped_weight_grad_kernel(grad_AO: torch.Tensor, a_AI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """(E, O, I): grad[s:e].T @ a[s:e] per expert, zeros for experts without rows."""
    grad_OA = grad_AO.t()
    if _grouped_mm_usable(grad_OA, a_AI):
        try:
            return F.grouped_mm(grad_OA, a_AI, offs=offsets_E).contiguous()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass
    out_EOI = grad_AO.new_zeros(offsets_E.shape[0], grad_AO.shape[1], a_AI.shape[1])
    start = 0
    for expert, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(grad_OA[:, start:end], a_AI[start:end], out=out_EOI[expert])
        start = end
    return out_EOI


def _grouped_linear_backward_kernel(grad_AO, a_AI, w_EOI, offsets_E, need_a: bool, need_w: bool):
    grad_AO = grad_AO.contiguous()
    grad_a = _grouped_linear_kernel(grad_AO, w_EOI.mT, offsets_E) if need_a else a_AI.new_empty(0)
    grad_w = _grouped_weight_grad_kernel(grad_AO, a_AI, offsets_E).to(w_EOI.dtype) if need_w else w_EOI.new_empty(0)
    return grad_a, grad_w


def _grouped_linear_fake(a_AI, w_EOI, offsets_E):
    return a_AI.new_empty(a_AI.shape[0], w_EOI.shape[1])


def _grouped_linear_backward_fake(grad_AO, a_AI, w_EOI, offsets_E, need_a: bool, need_w: bool):
    grad_a = a_AI.new_empty(a_AI.shape) if need_a else a_AI.new_empty(0)
    return grad_a, (w_EOI.new_empty(w_EOI.shape) if need_w else w_EOI.new_empty(0))


def _grouped_linear_setup_context(ctx, inputs, output):
    a_AI, w_EOI, offsets_E = inputs
    ctx.save_for_backward(a_AI, w_EOI, offsets_E)


def _grouped_linear_backward(ctx, grad_AO):
    a_AI, w_EOI, offsets_E = ctx.saved_tensors
    need_a, need_w = ctx.needs_input_grad[:2]
    grad_a, grad_w = torch.ops.sparse_moe.grouped_linear_backward(grad_AO, a_AI, w_EOI, offsets_E, need_a, need_w)
    return (grad_a if need_a else None), (grad_w if need_w else None), None


define_op(
    "grouped_linear", _grouped_linear_kernel, "(Tensor a, Tensor w, Tensor offsets) -> Tensor", _grouped_linear_fake,
    _grouped_linear_backward, _grouped_linear_setup_context,
)
define_op(
    "grouped_linear_backward", _grouped_linear_backward_kernel,
    "(Tensor grad, Tensor a, Tensor w, Tensor offsets, bool need_a, bool need_w) -> (Tensor, Tensor)",
    _grouped_linear_backward_fake,
)


# ------------------------------------------------------------------------- planned path as custom ops (CPU, compiled)
# Under `torch.compile` on CPU the planned path runs inside opaque custom ops, so the graph stays whole while the
# experts keep the planned path's kernels (host-side plan, experts with rows only, the decode plan without a sort,
# long segments in cache, the `index_add_` combine); the compiler fuses everything around them. Each op plans again
# from `top_k_index` (one sort and one host read, free on CPU: ~0.1% of a training step), since a plan cannot cross an
# op boundary. The pre-activations cross it as one (A, 2F) tensor: A = T*K rows, a static shape; with dropped
# assignments only the first N rows are computed and the rest are zero. SiLU only: the gradient of another activation
# needs autograd, which an op's kernel does not run under; such models take the static path.
_SILU = SiLUActivation()


def _pad_rows(rows_NX: torch.Tensor, num_rows: int) -> torch.Tensor:
    if rows_NX.shape[0] == num_rows:
        return rows_NX
    padded = rows_NX.new_zeros(num_rows, rows_NX.shape[1])
    padded[: rows_NX.shape[0]] = rows_NX
    return padded


def _planned_up_kernel(x_TD, top_k_index_TK, gate_up_EHD):
    plan = plan_dispatch(top_k_index_TK, gate_up_EHD.shape[0])
    (h_NH,) = _up_projection(x_TD, gate_up_EHD, plan, num_parts=1)
    return _pad_rows(h_NH, top_k_index_TK.numel())


def _planned_down_kernel(h_AH, top_k_weights_TK, top_k_index_TK, down_EDF):
    plan = plan_dispatch(top_k_index_TK, down_EDF.shape[0])
    parts = (h_AH[: plan.num_rows],)
    if _long_segments(plan, down_EDF.device):
        return _down_projection_long(parts, top_k_weights_TK, down_EDF, _SILU, plan)
    return _down_projection(parts, top_k_weights_TK, down_EDF, _SILU, plan, in_place=False)


def _planned_down_backward_kernel(grad_TD, h_AH, top_k_weights_TK, top_k_index_TK, down_EDF, need_weights: bool,
                                  need_down: bool, need_h: bool):
    plan = plan_dispatch(top_k_index_TK, down_EDF.shape[0])
    grad_weights_TK, grad_down_EDF, (grad_h_NH,) = _down_backward(
        grad_TD, top_k_weights_TK, down_EDF, (h_AH[: plan.num_rows],), _SILU, plan, need_weights, need_down, need_h
    )
    # NOTE: `.contiguous()`: the gradients follow a strided weight's layout (`empty_like`), the fakes are contiguous
    return (
        grad_weights_TK if need_weights else top_k_weights_TK.new_empty(0),
        grad_down_EDF.contiguous() if need_down else down_EDF.new_empty(0),
        _pad_rows(grad_h_NH, h_AH.shape[0]) if need_h else h_AH.new_empty(0),
    )


def _planned_up_backward_kernel(grad_h_AH, x_TD, top_k_index_TK, gate_up_EHD, need_x: bool, need_gate_up: bool):
    plan = plan_dispatch(top_k_index_TK, gate_up_EHD.shape[0])
    grad_x_TD, grad_gate_up_EHD = _up_backward(
        (grad_h_AH[: plan.num_rows],), x_TD, gate_up_EHD, plan, need_x, need_gate_up
    )
    return (
        grad_x_TD.contiguous() if need_x else x_TD.new_empty(0),
        grad_gate_up_EHD.contiguous() if need_gate_up else gate_up_EHD.new_empty(0),
    )


def _planned_inference_kernel(x_TD, top_k_index_TK, top_k_weights_TK, gate_up_EHD, down_EDF):
    plan = plan_dispatch(top_k_index_TK, gate_up_EHD.shape[0])
    return _experts_inference(x_TD, top_k_weights_TK, gate_up_EHD, down_EDF, _SILU, plan)


def _planned_up_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _planned_up_backward(ctx, grad_h_AH):
    x_TD, top_k_index_TK, gate_up_EHD = ctx.saved_tensors
    need_x, need_gate_up = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_x_TD, grad_gate_up_EHD = torch.ops.sparse_moe.planned_up_backward(
        grad_h_AH, x_TD, top_k_index_TK, gate_up_EHD, need_x, need_gate_up
    )
    return (grad_x_TD if need_x else None), None, (grad_gate_up_EHD if need_gate_up else None)


def _planned_down_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _planned_down_backward(ctx, grad_TD):
    h_AH, top_k_weights_TK, top_k_index_TK, down_EDF = ctx.saved_tensors
    need_h, need_weights, _, need_down = ctx.needs_input_grad
    grad_weights_TK, grad_down_EDF, grad_h_AH = torch.ops.sparse_moe.planned_down_backward(
        grad_TD, h_AH, top_k_weights_TK, top_k_index_TK, down_EDF, need_weights, need_down, need_h
    )
    return (
        grad_h_AH if need_h else None,
        grad_weights_TK if need_weights else None,
        None,
        grad_down_EDF if need_down else None,
    )


def _empty_unless(needed: bool, like: torch.Tensor) -> torch.Tensor:
    """A fake output: contiguous, `like`'s shape (the kernels make theirs contiguous too), or empty when not needed."""
    return like.new_empty(like.shape) if needed else like.new_empty(0)


define_op(
    "planned_up", _planned_up_kernel, "(Tensor x, Tensor top_k_index, Tensor gate_up) -> Tensor",
    lambda x, index, gate_up: x.new_empty(index.numel(), gate_up.shape[1]),
    _planned_up_backward, _planned_up_setup_context,
)
define_op(
    "planned_down", _planned_down_kernel, "(Tensor h, Tensor top_k_weights, Tensor top_k_index, Tensor down) -> Tensor",
    lambda h, weights, index, down: h.new_empty(index.shape[0], down.shape[1]),
    _planned_down_backward, _planned_down_setup_context,
)
define_op(
    "planned_down_backward", _planned_down_backward_kernel,
    "(Tensor grad, Tensor h, Tensor top_k_weights, Tensor top_k_index, Tensor down, bool need_weights, "
    "bool need_down, bool need_h) -> (Tensor, Tensor, Tensor)",
    lambda grad, h, weights, index, down, need_weights, need_down, need_h: (
        _empty_unless(need_weights, weights), _empty_unless(need_down, down), _empty_unless(need_h, h)
    ),
)
define_op(
    "planned_up_backward", _planned_up_backward_kernel,
    "(Tensor grad_h, Tensor x, Tensor top_k_index, Tensor gate_up, bool need_x, bool need_gate_up) -> (Tensor, Tensor)",
    lambda grad_h, x, index, gate_up, need_x, need_gate_up: (
        _empty_unless(need_x, x), _empty_unless(need_gate_up, gate_up)
    ),
)
define_op(
    "planned_inference", _planned_inference_kernel,
    "(Tensor x, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up, Tensor down) -> Tensor",
    lambda x, index, weights, gate_up, down: x.new_empty(x.shape),
)


def planned_ops_experts_forward(x_TD, top_k_index_TK, top_k_weights_TK, gate_up_EHD, down_EDF) -> torch.Tensor:
    """The planned path through custom ops (SiLU experts, CPU, compiled): (T, D) in the dtype of `x_TD`."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, top_k_weights_TK, gate_up_EHD, down_EDF)):
        h_AH = torch.ops.sparse_moe.planned_up(x_TD, top_k_index_TK, gate_up_EHD)
        return torch.ops.sparse_moe.planned_down(h_AH, top_k_weights_TK, top_k_index_TK, down_EDF)
    return torch.ops.sparse_moe.planned_inference(x_TD, top_k_index_TK, top_k_weights_TK, gate_up_EHD, down_EDF)


# NOTE: read once here: `is_torch_greater_or_equal` is `lru_cache`d, which dynamo would trace through with a warning.
_CPU_GROUPED_MM_ANY_ALIGNMENT = is_torch_greater_or_equal("2.10", accept_dev=True)


def _native_grouped_mm(a_AI: torch.Tensor) -> bool:
    """Whether the static path calls `F.grouped_mm` itself (traceable, differentiable): bf16 on a device with a
    grouped kernel (CUDA sm80+, CPU on torch >= 2.9). NOTE: no alignment check here: a compiled graph has no
    data pointers, and neither these devices' kernels on torch >= 2.10 nor our (E, ., .) parameters need one."""
    if a_AI.dtype != torch.bfloat16 or not hasattr(F, "grouped_mm"):
        return False
    if a_AI.device.type == "cuda":
        return torch.cuda.get_device_capability(a_AI.device) >= (8, 0)
    return a_AI.device.type == "cpu" and _CPU_GROUPED_MM_ANY_ALIGNMENT


def _static_grouped_linear(a_AI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    if _native_grouped_mm(a_AI):
        return F.grouped_mm(a_AI, w_EOI.mT, offs=offsets_E)
    return torch.ops.sparse_moe.grouped_linear(a_AI, w_EOI, offsets_E)


def static_experts_forward(x_TD, top_k_index_TK, top_k_weights_TK, gate_up_EHD, down_EDF, act_fn) -> torch.Tensor:
    """The sync-free path: every shape depends on T, K, E, D, F only, and nothing is read back to the host, so it
    compiles into one graph (`fullgraph=True`), runs under CUDA graphs, and autograd differentiates it as it is.

    All A = T*K assignments are sorted by expert; `offsets_E` (device-side, from `searchsorted`) bound each expert's
    rows for the grouped GEMMs. Dropped assignments (index E) sort to the tail past `offsets_E[-1]`, which the grouped
    GEMMs skip, so they cost no GEMM work; their rows are masked with `where` (not a multiply: the kernels leave
    those rows unwritten, and 0 * NaN is NaN) before the first product, after each product, and their gradients too.
    The combine puts the weighted rows back in (T, K) order and sums the K slots in fp32, as the eager reference.
    """
    num_tokens, top_k = top_k_index_TK.shape
    num_experts, ffn_dim = down_EDF.shape[0], down_EDF.shape[-1]
    experts_A = top_k_index_TK.reshape(-1)
    sorted_experts_A, order_A = torch.sort(experts_A, stable=True)
    expert_ids_E = torch.arange(num_experts, device=experts_A.device, dtype=sorted_experts_A.dtype)
    offsets_E = torch.searchsorted(sorted_experts_A, expert_ids_E, right=True).to(torch.int32)  # rows of experts <= e
    kept_A1 = (sorted_experts_A < num_experts).unsqueeze(-1)
    x_AD = torch.where(kept_A1, x_TD[order_A // top_k], 0.0)
    h_AH = torch.where(kept_A1, _static_grouped_linear(x_AD, gate_up_EHD, offsets_E), 0.0)
    g_AF = _activation(act_fn, h_AH[:, :ffn_dim]) * h_AH[:, ffn_dim:]
    y_AD = torch.where(kept_A1, _static_grouped_linear(g_AF, down_EDF, offsets_E), 0.0)
    weighted_AD = y_AD.float() * top_k_weights_TK.reshape(-1)[order_A].float().unsqueeze(-1)
    inverse_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(order_A.shape[0], device=order_A.device))
    return weighted_AD[inverse_A].view(num_tokens, top_k, -1).sum(dim=1)  # fixed-order fp32 sum; caller casts


def gathered_experts_forward(x_TD, top_k_index_TK, top_k_weights_TK, gate_up_EHD, down_EDF, act_fn) -> torch.Tensor:
    """Few assignments under `torch.compile` on CPU, inference (decode): every assignment's expert is applied as an
    elementwise product with the indexed weight, summed over the input dimension. Written in plain tensor ops for
    inductor, which fuses the indexing, product and sum of each projection into one loop nest reading the chosen
    expert's rows in place: no gathered copy, no GEMM call, no custom op, no sort. Eager would materialise
    `gate_up_EHD[index]`, so only compiled graphs take this path. Dropped assignments (index E) read expert E-1 and
    are masked out. Returns (T, D) fp32, the K slots summed in a fixed order as the eager reference does."""
    num_tokens, top_k = top_k_index_TK.shape
    num_experts, hidden, ffn_dim = down_EDF.shape
    experts_A = top_k_index_TK.reshape(-1)
    kept_A = experts_A < num_experts
    experts_A = experts_A.clamp(max=num_experts - 1)
    x_AD = x_TD.unsqueeze(1).expand(num_tokens, top_k, hidden).reshape(-1, hidden)
    h_AH = (gate_up_EHD[experts_A] * x_AD.unsqueeze(1)).sum(dim=-1)
    g_AF = _activation(act_fn, h_AH[:, :ffn_dim]) * h_AH[:, ffn_dim:]
    y_AD = (down_EDF[experts_A] * g_AF.unsqueeze(1)).sum(dim=-1)
    # `where`, not a zero weight: a dropped slot's stand-in product must not leak an inf or NaN (0 * inf = NaN)
    weighted_AD = torch.where(kept_A.unsqueeze(-1), y_AD.float() * top_k_weights_TK.reshape(-1, 1).float(), 0.0)
    return weighted_AD.view(num_tokens, top_k, hidden).sum(dim=1)


def _use_gathered_path(x_TD: torch.Tensor, top_k_index_TK: torch.Tensor, num_experts: int, *tensors) -> bool:
    """Compiling on CPU, no gradient, and no more assignments than experts (decode of up to E / K sequences).
    NOTE: measured on CPU (AMD EPYC, fp32, hidden 512, 8 experts x 1408, compiled experts alone): 1 token 0.37 ms
    against 1.8-2.1 ms for the planned op (MKL's matrix-vector products), 4 tokens 2.8 vs 6.5 ms, 16 tokens 10.0 vs
    11.6 ms, 32 tokens 19.1 vs 13.0 ms: it reads one expert per assignment, where grouped GEMMs read each busy expert
    once, so it stops at T*K <= E."""
    if not torch.compiler.is_compiling() or x_TD.device.type != "cpu" or top_k_index_TK.numel() > num_experts:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, *tensors)))


def _use_static_path(device: torch.device, act_fn=None) -> bool:
    """Static path on accelerators, and under `torch.compile` unless the planned ops can run (CPU, SiLU experts);
    the planned path otherwise (see the module docstring)."""
    if device.type != "cpu":
        return True
    return torch.compiler.is_compiling() and not _is_silu(act_fn)


# ------------------------------------------------------------------------------------------------------- entry point
def sparse_moe_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`ExpertsInterface` entry: same contract as the eager `SparseMoEExperts.forward` (the reference).

    hidden_states (T, D), top_k_index (T, K) with `num_experts` marking a dropped assignment, top_k_weights (T, K)
    fp32 -> (T, D) in the dtype of `hidden_states`.
    """
    if is_quantized_experts(self):  # 4-bit experts: their own path, dequantizing only experts with rows
        return quantized_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if self.has_bias or not self.has_gate or self.is_transposed or not self.is_concatenated:
        raise NotImplementedError("`sparse_moe` experts support gated, bias-free, (E, 2F, D)/(E, D, F) weights only.")
    gate_up_EHD, down_EDF = self.gate_up_proj, self.down_proj
    device_type = hidden_states.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # NOTE: `torch.mm(out=...)` does not autocast; cast here, where autograd sees the casts.
        dtype = torch.get_autocast_dtype(device_type)
        gate_up_EHD, down_EDF = gate_up_EHD.to(dtype), down_EDF.to(dtype)
    x_TD = hidden_states.to(gate_up_EHD.dtype)
    if x_TD.shape[0] == 0:
        return hidden_states.new_zeros(hidden_states.shape)

    # NOTE: entering `torch.autocast(enabled=False)` costs ~7 us, a few percent of a decode step's experts call.
    if _use_gathered_path(x_TD, top_k_index, self.num_experts, top_k_weights, gate_up_EHD, down_EDF):
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            out_TD = gathered_experts_forward(x_TD, top_k_index, top_k_weights, gate_up_EHD, down_EDF, self.act_fn)
        return out_TD.to(hidden_states.dtype)
    if _use_static_path(x_TD.device, self.act_fn):
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            out_TD = static_experts_forward(x_TD, top_k_index, top_k_weights, gate_up_EHD, down_EDF, self.act_fn)
        return out_TD.to(hidden_states.dtype)
    if torch.compiler.is_compiling():
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            out_TD = planned_ops_experts_forward(x_TD, top_k_index, top_k_weights, gate_up_EHD, down_EDF)
        return out_TD.to(hidden_states.dtype)
    plan = plan_dispatch(top_k_index, self.num_experts)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, top_k_weights, gate_up_EHD, down_EDF)):
            parts = _UpProjection.apply(x_TD, gate_up_EHD, plan)
            out_TD = _DownProjection.apply(top_k_weights, down_EDF, self.act_fn, plan, *parts)
        else:
            out_TD = _experts_inference(x_TD, top_k_weights, gate_up_EHD, down_EDF, self.act_fn, plan)
    return out_TD.to(hidden_states.dtype)


ExpertsInterface.register(SPARSE_MOE_EXPERTS, sparse_moe_experts_forward)

__all__ = [
    "SPARSE_MOE_EXPERTS",
    "DispatchPlan",
    "gathered_experts_forward",
    "plan_dispatch",
    "planned_ops_experts_forward",
    "sparse_moe_experts_forward",
    "static_experts_forward",
]
