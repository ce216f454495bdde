# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Expert pruning and merging: fewer experts per MoE layer, the same kind of model afterwards.

    from modeling_sparse_moe.compression.pruning import prune_experts, merge_experts

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prune_experts(model, 6, criterion="reap", calibration=blocks)   # blocks: (B, S) token ids, or a list of them
    model.save_pretrained("pruned")                                  # an ordinary SparseMoE folder, num_experts=6
    # or: python scripts/prune.py folder pruned --num_experts 6 --criterion reap --calibration generic

Calibration statistics are gathered with a forward pre-hook on every MoE block's experts module: it sees the rows
the experts get (x_TD), the chosen experts and their combine weights, and runs the eager expert math once more
per busy expert to get each expert's own output y = down(act(gate(x)) * up(x)), before the gate weight.

Criteria (score per expert, the lowest `E - num_experts` of each layer are removed):
  - "reap" (REAP, arXiv 2510.13999): mean over the tokens routed to the expert of gate weight x ||y||_2;
  - "frequency": how many assignments the router gave the expert;
  - "activation_norm": mean ||y||_2 over the tokens routed to it (the gate left out);
  - "random": a seeded random order (the baseline; no calibration needed).
An expert that received no calibration token scores 0 under every data criterion, so it goes first.

With group-limited routing (`n_group > 1`) each group keeps `num_experts / n_group` experts (its best ones), so the
groups stay contiguous blocks of equal size, as the router needs.

Slicing a layer keeps, for the chosen experts and in their original order: the router rows (`gate.weight`), the
correction bias, `gate_up_proj` / `down_proj`; shared experts, attention and everything else are untouched, and
`config.num_experts` becomes `num_experts`. Routing is renormalised by the router itself: softmax now runs over the
kept experts only, and with `norm_topk_prob` the top-k weights are divided by their sum, as before.

`merge_experts` is the alternative that keeps every expert's weights in the model: per layer, the least-used expert
(calibration frequency) is folded into its nearest kept neighbour (cosine similarity of their router-logit columns
on the calibration tokens) as the frequency-weighted average of both weight stacks; repeated until `num_experts`
remain. The neighbour keeps its own router row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


logger = logging.getLogger(__name__)

CRITERIA = ("reap", "frequency", "activation_norm", "random")


# ------------------------------------------------------------------------------------------------ checks
def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every MoE block (a module with a router `gate` and routed `experts`), in layer order."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "gate") and hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj")]


def _check_not_quantized(model: nn.Module) -> None:
    config = model.config
    quantized = (getattr(model, "hf_quantizer", None) is not None or getattr(config, "expert_quantization", None)
                 or getattr(config, "int8_quantization", None)
                 or any(not isinstance(b.experts.gate_up_proj, nn.Parameter)
                        or not b.experts.gate_up_proj.is_floating_point() for _, b in moe_blocks(model)))
    if quantized:
        raise ValueError("this model is quantized (4-bit or int8 experts); prune or merge experts before quantizing: "
                         "load the full-precision model, prune it, then quantize the pruned model.")


def check_expert_count(model: nn.Module, num_experts: int) -> list[tuple[str, nn.Module]]:
    """The MoE blocks of `model`, after checking that it can be reduced to `num_experts` experts per layer."""
    config = model.config
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE blocks (a router `gate` and 3D `experts`) to prune.")
    _check_not_quantized(model)
    current = blocks[0][1].experts.num_experts
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r}: keep at least 1 expert per layer (a positive integer).")
    if num_experts > current:
        raise ValueError(f"num_experts={num_experts} is more than the {current} experts each layer has; pruning "
                         f"can only remove experts (pass a number from 1 to {current}).")
    if num_experts < config.num_experts_per_tok:
        raise ValueError(f"num_experts={num_experts} is fewer than num_experts_per_tok={config.num_experts_per_tok} "
                         f"(each token's top-k); keep at least {config.num_experts_per_tok} experts, or lower top-k "
                         f"first with compression.routing.set_experts_per_token.")
    if config.n_group > 1:
        if num_experts % config.n_group:
            raise ValueError(f"num_experts={num_experts} is not divisible by n_group={config.n_group} (group-limited "
                             f"routing needs equal groups); pick a multiple of {config.n_group}.")
        if config.topk_group * (num_experts // config.n_group) < config.num_experts_per_tok:
            raise ValueError(f"num_experts={num_experts}: the topk_group={config.topk_group} chosen groups of "
                             f"{num_experts // config.n_group} experts would hold fewer than num_experts_per_tok="
                             f"{config.num_experts_per_tok}; keep more experts.")
    return blocks


# ------------------------------------------------------------------------------------------- calibration
@dataclass
class ExpertStatistics:
    """Per layer, per expert (E,) fp64 sums over the calibration tokens (`tokens`: rows seen by the layer)."""

    count: torch.Tensor  # assignments (token, expert)
    gate_sum: torch.Tensor  # sum of combine weights
    reap_sum: torch.Tensor  # sum of gate weight x ||y||
    norm_sum: torch.Tensor  # sum of ||y||
    logit_gram: torch.Tensor  # (E, E) router logits' Gram matrix, for merging
    tokens: int = 0

    def score(self, criterion: str) -> torch.Tensor:
        mean = lambda total: torch.where(self.count > 0, total / self.count.clamp(min=1), 0.0)  # noqa: E731
        if criterion == "reap":
            return mean(self.reap_sum)
        if criterion == "frequency":
            return self.count.clone()
        if criterion == "activation_norm":
            return mean(self.norm_sum)
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")


def _expert_outputs(experts: nn.Module, x_TD, index_TK, act_fn) -> torch.Tensor:
    """Each assignment's expert output norm ||y||_2, (T, K), with the eager expert math (dropped: 0)."""
    norms_TK = torch.zeros(index_TK.shape, dtype=torch.float64, device=x_TD.device)
    for expert in torch.unique(index_TK).tolist():
        if expert >= experts.num_experts:
            continue
        token_idx, slot_idx = torch.where(index_TK == expert)
        gate, up = torch.nn.functional.linear(x_TD[token_idx].float(), experts.gate_up_proj[expert].float()).chunk(2, -1)
        y_ND = torch.nn.functional.linear(act_fn(gate) * up, experts.down_proj[expert].float())
        norms_TK[token_idx, slot_idx] = y_ND.norm(dim=-1).double()
    return norms_TK


def _calibration_batches(calibration) -> list[torch.Tensor]:
    if calibration is None:
        raise ValueError("this criterion needs calibration data: token ids (B, S) or a list of such tensors / lists.")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches = []
    for batch in calibration:
        batch = torch.as_tensor(batch, dtype=torch.long)
        batches.append(batch.unsqueeze(0) if batch.dim() == 1 else batch)
    if sum(b.numel() for b in batches) == 0:
        raise ValueError("the calibration set has no tokens; give at least one non-empty block of token ids "
                         "(e.g. --calibration generic, or a --calibration_file with text).")
    return batches


@torch.no_grad()
def collect_expert_statistics(model: nn.Module, calibration: Iterable) -> list[ExpertStatistics]:
    """Run `model` on the calibration token ids and return one `ExpertStatistics` per MoE block (layer order)."""
    blocks = moe_blocks(model)
    batches = _calibration_batches(calibration)
    num_experts = blocks[0][1].experts.num_experts
    stats = [ExpertStatistics(*(torch.zeros(num_experts, dtype=torch.float64) for _ in range(4)),
                              logit_gram=torch.zeros(num_experts, num_experts, dtype=torch.float64))
             for _ in blocks]
    from transformers.activations import ACT2FN

    act_fn = ACT2FN[model.config.hidden_act]

    def hook_for(i: int, block: nn.Module):
        def pre_hook(experts, args, kwargs):
            x_TD, index_TK, weights_TK = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
            s = stats[i]
            logits_TE = torch.nn.functional.linear(x_TD.float(), block.gate.weight.float()).double()
            s.logit_gram += logits_TE.t() @ logits_TE
            s.tokens += x_TD.shape[0]
            kept_TK = index_TK < num_experts
            index = index_TK[kept_TK]
            norms = _expert_outputs(experts, x_TD, index_TK, act_fn)[kept_TK]
            weights = weights_TK.double()[kept_TK]
            s.count.index_add_(0, index, torch.ones_like(weights))
            s.gate_sum.index_add_(0, index, weights)
            s.reap_sum.index_add_(0, index, weights * norms)
            s.norm_sum.index_add_(0, index, norms)
        return pre_hook

    handles = [block.experts.register_forward_pre_hook(hook_for(i, block), with_kwargs=True)
               for i, (_, block) in enumerate(blocks)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            if batch.numel():
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


# ------------------------------------------------------------------------------------------------- pruning
def select_experts(scores: list[torch.Tensor], num_experts: int, n_group: int = 1) -> list[list[int]]:
    """Per layer, the indices (ascending) of the `num_experts` best-scoring experts; ties go to the lower index. With
    `n_group > 1`, the best `num_experts / n_group` of each contiguous group."""
    kept = []
    for score_E in scores:
        total = score_E.numel()
        per_group, keep_per_group = total // n_group, num_experts // n_group
        chosen = []
        for g in range(n_group):
            group = score_E[g * per_group:(g + 1) * per_group].double()
            # NOTE: stable sort of -score: equal scores keep the lower index, so results do not depend on topk ties.
            order = torch.sort(-group, stable=True)[1][:keep_per_group]
            chosen += (order + g * per_group).tolist()
        kept.append(sorted(chosen))
    return kept


def expert_scores(model: nn.Module, criterion: str, calibration=None, seed: int = 0) -> list[torch.Tensor]:
    """One (E,) score per MoE layer under `criterion` (higher is kept)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    blocks = moe_blocks(model)
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return [torch.rand(b.experts.num_experts, generator=generator, dtype=torch.float64) for _, b in blocks]
    return [s.score(criterion) for s in collect_expert_statistics(model, calibration)]


def _slice_block(block: nn.Module, kept: list[int]) -> None:
    index = torch.tensor(kept, dtype=torch.long, device=block.gate.weight.device)
    gate, experts = block.gate, block.experts
    gate.weight = nn.Parameter(gate.weight.data.index_select(0, index).clone(), requires_grad=gate.weight.requires_grad)
    gate.e_score_correction_bias = nn.Buffer(gate.e_score_correction_bias.index_select(0, index).clone())
    gate.expert_load = nn.Buffer(gate.expert_load.index_select(0, index).clone(), persistent=False)
    for name in ("gate_up_proj", "down_proj"):
        old = getattr(experts, name)
        setattr(experts, name, nn.Parameter(old.data.index_select(0, index).clone(), requires_grad=old.requires_grad))
    gate.num_experts = experts.num_experts = len(kept)
    if hasattr(block, "num_experts"):
        block.num_experts = len(kept)


def apply_expert_selection(model: nn.Module, kept: list[list[int]]) -> nn.Module:
    """Keep only the experts `kept[i]` in MoE layer i (same count in every layer), in place; returns `model`."""
    counts = {len(k) for k in kept}
    if len(counts) != 1:
        raise ValueError(f"every layer must keep the same number of experts, got {sorted(counts)}")
    blocks = check_expert_count(model, counts.pop())
    if len(kept) != len(blocks):
        raise ValueError(f"{len(kept)} expert lists for {len(blocks)} MoE layers")
    for (_, block), chosen in zip(blocks, kept):
        if len(set(chosen)) != len(chosen) or not all(0 <= e < block.experts.num_experts for e in chosen):
            raise ValueError(f"kept experts {chosen} must be distinct indices below {block.experts.num_experts}")
        _slice_block(block, sorted(chosen))
    model.config.num_experts = len(kept[0])
    model.config.validate()
    return model


def prune_experts(model: nn.Module, num_experts: int, criterion: str = "reap", calibration=None,
                  seed: int = 0) -> nn.Module:
    """Remove the lowest-scoring experts of every MoE layer so that `num_experts` remain, in place; returns `model`
    (an ordinary SparseMoE model with `config.num_experts == num_experts`). `calibration`: token ids (B, S), or an
    iterable of such tensors/lists, needed by every criterion but "random" (`seed` orders that one). The kept
    experts per layer are logged and stored as `model.pruned_experts` (a list of index lists, not saved)."""
    check_expert_count(model, num_experts)
    scores = expert_scores(model, criterion, calibration, seed)
    kept = select_experts(scores, num_experts, model.config.n_group)
    for layer, chosen in enumerate(kept):
        logger.info("MoE layer %d (%s): keeping experts %s", layer, criterion, chosen)
    apply_expert_selection(model, kept)
    model.pruned_experts = kept
    return model


# ------------------------------------------------------------------------------------------------- merging
@torch.no_grad()
def merge_experts(model: nn.Module, num_experts: int, calibration=None) -> nn.Module:
    """Fold the least-used experts of every layer into their nearest neighbour until `num_experts` remain, in place;
    returns `model`. Frequency-weighted average of the weight stacks; nearness is the cosine similarity of the two
    experts' router-logit columns on the calibration tokens. `model.merged_experts[i]` maps each kept expert (new
    index) to the original experts folded into it."""
    blocks = check_expert_count(model, num_experts)
    if model.config.n_group > 1:
        raise ValueError("merge_experts does not support group-limited routing (n_group > 1); use prune_experts.")
    stats = collect_expert_statistics(model, calibration)
    groups_per_layer = []
    for (_, block), s in zip(blocks, stats):
        experts = block.experts
        freq = s.count.clone() + 1e-6  # NOTE: an unused expert still has a (tiny) weight: no 0/0 when two merge
        norms = s.logit_gram.diagonal().sqrt().clamp(min=1e-12)
        similarity = s.logit_gram / (norms[:, None] * norms[None, :])
        alive = list(range(experts.num_experts))
        members = {e: [e] for e in alive}
        gate_up = experts.gate_up_proj.data.double().clone()
        down = experts.down_proj.data.double().clone()
        while len(alive) > num_experts:
            victim = min(alive, key=lambda e: (freq[e].item(), e))
            others = [e for e in alive if e != victim]
            target = max(others, key=lambda e: (similarity[victim, e].item(), -e))
            share = freq[victim] / (freq[victim] + freq[target])
            gate_up[target] = (1 - share) * gate_up[target] + share * gate_up[victim]
            down[target] = (1 - share) * down[target] + share * down[victim]
            freq[target] += freq[victim]
            members[target] += members.pop(victim)
            alive.remove(victim)
        dtype = experts.gate_up_proj.dtype
        experts.gate_up_proj.data.copy_(gate_up.to(dtype))
        experts.down_proj.data.copy_(down.to(dtype))
        groups_per_layer.append((alive, [sorted(members[e]) for e in alive]))
    apply_expert_selection(model, [alive for alive, _ in groups_per_layer])
    model.merged_experts = [groups for _, groups in groups_per_layer]
    return model


# ---------------------------------------------------------------------------------------------- folder to folder
def prune_from_folder(src: str, dst: str, num_experts: int, *, method: str = "prune", criterion: str = "reap",
                      calibration: str | None = None, calibration_file: str | None = None,
                      dataset_name: str | None = None, dataset_config_name: str | None = None,
                      dataset_split: str = "train", text_column: str = "text", block_size: int = 128,
                      max_tokens: int | None = 16384, seed: int = 0) -> str:
    """What scripts/prune.py does: load `src`, prune or merge to `num_experts`, save to `dst` (with the tokenizer,
    and the remote code when `src` had it). Returns a one-paragraph summary."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibration import calibration_texts, token_blocks

    if method not in ("prune", "merge"):
        raise ValueError(f"method {method!r}: choose 'prune' or 'merge'")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    check_expert_count(model, num_experts)
    tokenizer = None
    if any((Path(src) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(src)
    blocks = None
    if method == "merge" or criterion != "random":
        if tokenizer is None:
            raise ValueError(f"{src} has no tokenizer to cut calibration text with; save one next to the model")
        texts = calibration_texts(calibration, calibration_file=calibration_file, dataset_name=dataset_name,
                                  dataset_config_name=dataset_config_name, text_column=text_column,
                                  split=dataset_split)
        blocks = token_blocks(tokenizer, texts, block_size, max_tokens)
    before = model.config.num_experts
    if method == "merge":
        merge_experts(model, num_experts, blocks)
        detail = f"merged (frequency-weighted, nearest by router logits): {model.merged_experts}"
    else:
        prune_experts(model, num_experts, criterion, blocks, seed=seed)
        detail = f"kept per layer ({criterion}): {model.pruned_experts}"
    model.save_pretrained(dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    if (Path(src) / "modeling_sparse_moe.py").is_file():  # a Hub folder stays one: its remote code travels along
        from ..interop.hub import complete_hub_folder

        complete_hub_folder(Path(dst))
    tokens = sum(b.numel() for b in blocks) if blocks else 0
    return (f"{src}: {before} -> {num_experts} experts per layer by {method}, {tokens} calibration tokens; {detail}; "
            f"saved to {dst}")


__all__ = [
    "CRITERIA",
    "ExpertStatistics",
    "apply_expert_selection",
    "check_expert_count",
    "collect_expert_statistics",
    "expert_scores",
    "merge_experts",
    "moe_blocks",
    "prune_experts",
    "prune_from_folder",
    "select_experts",
]
