# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""The lowest layer of the Hub-facing model files: what the model, its fast expert paths (moe_dispatch.py) and the
quantized expert kernels (quantization.py, int8_experts.py) share. It imports only torch.

Import order of the model files, each importing only those before it (tests/test_imports.py checks it):
  configuration_sparse_moe -> moe_primitives -> quantization, int8_experts -> moe_dispatch -> modeling_sparse_moe

  DispatchPlan, plan_dispatch   the sort-once grouping of (token, expert) assignments by expert, with one host read
  define_op                     registers a `sparse_moe::<name>` custom op once per process, with fake and autograd
  KeepBuffersFp32               keeps named buffers (router bias, int8 scales) fp32 under `model.to(dtype)`

Shape legend as in moe_dispatch.py: T tokens, K experts per token, A = T*K assignments, N computed, E experts.
"""

from dataclasses import dataclass
from functools import cached_property

import torch


# -------------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class DispatchPlan:
    """Where the rows of one experts call come from and which expert computes them.

    num_tokens, top_k: T and K.
    rows_N: positions in the flattened (T*K,) assignments of the N computed rows, grouped by expert in expert order;
        `None` means the rows are the A assignments in their own order (no sort, no un-sort: the decode path).
    segments: `(expert, start, end)` for every expert with at least one row; rows `start:end` belong to `expert`.
    offsets_E: (E,) int32 cumulative row counts (the `offs` of `grouped_mm`); `None` when rows are not grouped.
    num_rows: N.
    token_N (computed on first use; decode inference never needs it): token each computed row reads, (N,) long.
    """

    num_tokens: int
    top_k: int
    rows_N: torch.Tensor | None
    segments: tuple[tuple[int, int, int], ...]
    offsets_E: torch.Tensor | None
    num_rows: int
    device: torch.device

    @cached_property
    def token_N(self) -> torch.Tensor:
        if self.rows_N is None:
            return torch.arange(self.num_rows, device=self.device) // self.top_k
        return self.rows_N // self.top_k

    def idle_experts(self, num_experts: int) -> list[tuple[int, int]]:
        """Maximal `[start, end)` runs of experts that received no rows (their weight gradients are zero)."""
        runs, previous_end = [], 0
        for expert, _, _ in sorted(self.segments) + [(num_experts, 0, 0)]:
            if expert > previous_end:
                runs.append((previous_end, expert))
            previous_end = expert + 1
        return runs


def plan_dispatch(top_k_index_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Group the assignments by expert with one host sync. Indices >= `num_experts` (dropped) are skipped."""
    num_tokens, top_k = top_k_index_TK.shape
    device = top_k_index_TK.device
    experts_A = top_k_index_TK.reshape(-1)
    num_assignments = experts_A.numel()

    if num_assignments <= num_experts:
        # NOTE: few assignments (decode): read them to the host (the one sync) and plan there, no device sort.
        experts = experts_A.tolist()
        if len(set(experts)) == num_assignments and max(experts, default=-1) < num_experts:
            # Every assignment is its own expert's only row: rows stay in (T, K) order, nothing to sort or un-sort.
            segments = tuple((expert, a, a + 1) for a, expert in enumerate(experts))
            return DispatchPlan(num_tokens, top_k, None, segments, None, num_assignments, device)
        rows = sorted((a for a in range(num_assignments) if experts[a] < num_experts), key=experts.__getitem__)
        counts = [0] * num_experts
        for a in rows:
            counts[experts[a]] += 1
        rows_N = torch.tensor(rows, dtype=torch.long, device=device)
    else:
        # Stable sort: rows of one expert keep token order, so results do not depend on the sort implementation.
        sorted_experts_A, order_A = torch.sort(experts_A, stable=True)
        counts = torch.bincount(sorted_experts_A, minlength=num_experts)[:num_experts].tolist()  # the one host sync
        rows_N = order_A[: sum(counts)]  # dropped (sentinel) assignments sort to the tail and are cut off here
    segments, offsets, start = [], [], 0
    for expert, count in enumerate(counts):
        if count:
            segments.append((expert, start, start + count))
            start += count
        offsets.append(start)
    offsets_E = torch.tensor(offsets, dtype=torch.int32, device=device)
    return DispatchPlan(num_tokens, top_k, rows_N, tuple(segments), offsets_E, start, device)


# ------------------------------------------------------------------------------------------------------ custom ops
def define_op(name: str, kernel, schema: str, fake, backward=None, setup_context=None) -> None:
    """Register `sparse_moe::<name>` with its fake (and autograd formula). NOTE: a model saved to the Hub imports its
    own copy of this file next to the installed package's: each op is defined once per process (the copies are the
    same code)."""
    if hasattr(torch.ops.sparse_moe, name):
        return
    torch.library.custom_op(f"sparse_moe::{name}", kernel, mutates_args=(), schema=schema)
    torch.library.register_fake(f"sparse_moe::{name}", fake)
    if backward is not None:
        torch.library.register_autograd(f"sparse_moe::{name}", backward, setup_context=setup_context)


# ----------------------------------------------------------------------------------------------------- buffer dtype
class KeepBuffersFp32:
    """Mixin for an `nn.Module` whose buffers named in `_fp32_buffers` stay fp32 under `model.to(dtype)`; only their
    device follows. Used by the router (bias and loads) and by int8 experts (their scales)."""

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self._fp32_buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device) if not before.is_meta else after.float()
        return self
