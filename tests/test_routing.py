"""Routing numerics against small hand-written references, capacity dropping, losses and bias balancing."""

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_sparse_moe import SparseMoEForCausalLM, load_balancing_loss, router_z_loss, update_router_biases
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEBlock, SparseMoERouter

from conftest import tiny_config


def _router(config, seed=0):
    torch.manual_seed(seed)
    router = SparseMoERouter(config)
    router.weight.data.normal_(0, 1.0)
    return router


def _sorted_pairs(index, weights):
    """Sort each token's (expert, weight) pairs by expert id so references with another order compare equal."""
    order = index.argsort(dim=-1)
    return index.gather(-1, order), weights.gather(-1, order)


# --------------------------------------------------------------------------------- references (plain, per token)
def ref_softmax(x, w, k, norm):
    """Mixtral (norm=True) / Qwen-MoE, OLMoE (norm=False)."""
    probs = F.softmax(x.double() @ w.double().t(), dim=-1)
    idx, wts = [], []
    for row in probs:
        top = sorted(range(len(row)), key=lambda e: -row[e].item())[:k]
        vals = torch.stack([row[e] for e in top])
        if norm:
            vals = vals / vals.sum()
        idx.append(top)
        wts.append(vals)
    return torch.tensor(idx), torch.stack(wts).float()


def ref_sigmoid_grouped(x, w, bias, k, n_group, topk_group, norm, scale):
    """DeepSeek-V3: groups ranked by the sum of their top-2 biased scores; experts chosen by biased score inside the
    best groups; weights from the unbiased scores, renormalised, scaled."""
    scores = torch.sigmoid(x.double() @ w.double().t())
    E = scores.shape[1]
    per = E // n_group
    idx, wts = [], []
    for row in scores:
        biased = row + bias.double()
        group_score = [sorted(biased[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
        allowed = [e for e in range(E) if e // per in groups]
        top = sorted(allowed, key=lambda e: -biased[e].item())[:k]
        vals = torch.stack([row[e] for e in top])
        if norm:
            vals = vals / vals.sum()
        idx.append(top)
        wts.append(vals * scale)
    return torch.tensor(idx), torch.stack(wts).float()


@pytest.mark.parametrize("k,norm", [(1, True), (2, True), (2, False), (3, False)])
def test_softmax_topk_matches_reference(k, norm):
    config = tiny_config(num_experts=6, num_experts_per_tok=k, norm_topk_prob=norm)
    router = _router(config).eval()
    x = torch.randn(37, config.hidden_size)
    logits, weights, index, dropped = router(x)
    assert dropped is None and weights.dtype == torch.float32 and logits.dtype == torch.float32
    ref_index, ref_weights = ref_softmax(x, router.weight, k, norm)
    index, weights = _sorted_pairs(index, weights)
    ref_index, ref_weights = _sorted_pairs(ref_index, ref_weights)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    if norm:
        torch.testing.assert_close(weights.sum(-1), torch.ones(37))


def test_top1_switch_routing_is_argmax_with_weight_one():
    config = tiny_config(num_experts=4, num_experts_per_tok=1, norm_topk_prob=True)
    router = _router(config).eval()
    x = torch.randn(20, config.hidden_size)
    logits, weights, index, _ = router(x)
    assert torch.equal(index[:, 0], logits.argmax(-1))
    torch.testing.assert_close(weights, torch.ones(20, 1))


@pytest.mark.parametrize("n_group,topk_group,k", [(1, 1, 2), (4, 2, 3), (2, 1, 2), (8, 3, 4)])
def test_sigmoid_grouped_routing_matches_deepseek_reference(n_group, topk_group, k):
    config = tiny_config(
        num_experts=16, num_experts_per_tok=k, router_type="sigmoid", n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    router = _router(config, seed=n_group).eval()
    router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(41, config.hidden_size)
    _, weights, index, _ = router(x)
    ref_index, ref_weights = ref_sigmoid_grouped(
        x, router.weight, router.e_score_correction_bias, k, n_group, topk_group, True, 2.5
    )
    index, weights = _sorted_pairs(index, weights)
    ref_index, ref_weights = _sorted_pairs(ref_index, ref_weights)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.full((41,), 2.5))


def test_correction_bias_changes_selection_but_not_weights_formula():
    config = tiny_config(num_experts=4, num_experts_per_tok=1, router_type="sigmoid", norm_topk_prob=False)
    router = _router(config).eval()
    x = torch.randn(16, config.hidden_size)
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # force expert 3
    logits, weights, index, _ = router(x)
    assert (index == 3).all()
    torch.testing.assert_close(weights[:, 0], torch.sigmoid(logits[:, 3]))  # unbiased score


def test_softmax_router_matches_transformers_mixtral_router():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = tiny_config(num_experts=8, num_experts_per_tok=2)
    ours = _router(config).eval()
    theirs = MixtralTopKRouter(MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2))
    theirs.weight.data.copy_(ours.weight.data)
    x = torch.randn(29, 32)
    l1, w1, i1, _ = ours(x)
    l2, w2, i2 = theirs(x)
    torch.testing.assert_close(l1, l2)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2)


# ---------------------------------------------------------------------------------------------------------- capacity
def test_capacity_limits_every_expert_and_counts_drops():
    config = tiny_config(num_experts=4, num_experts_per_tok=2, capacity_factor=0.5)
    router = _router(config).train()
    router.weight.data.mul_(0.1)
    router.weight.data[0] += 0.3  # skew routing so expert 0 overflows
    x = torch.randn(64, config.hidden_size).abs()
    _, weights, index, dropped = router(x)
    capacity = math.ceil(0.5 * 64 * 2 / 4)
    assert router.capacity(64) == capacity == 16
    kept = index[~dropped]
    assert torch.bincount(kept, minlength=4).max() <= capacity
    # Every expert fills up to min(demand, capacity): nothing is dropped from an expert with room.
    demand = torch.bincount(index.reshape(-1), minlength=4)
    assert torch.equal(torch.bincount(kept, minlength=4), demand.clamp(max=capacity))
    assert int(dropped.sum()) == int((demand - capacity).clamp(min=0).sum()) > 0
    assert (weights[dropped] == 0).all() and (weights[~dropped] > 0).all()


def test_capacity_priority_first_choices_before_second_choices_in_token_order():
    config = tiny_config(num_experts=2, num_experts_per_tok=1, capacity_factor=1.0)
    router = SparseMoERouter(config).train()
    index = torch.tensor([[0], [0], [1], [0], [0], [1]])  # capacity = ceil(6 * 1 / 2) = 3
    dropped = router.over_capacity(index)
    assert dropped[:, 0].tolist() == [False, False, False, False, True, False]
    index2 = torch.tensor([[0, 1], [1, 0], [0, 1]])  # capacity = ceil(3*2/2) = 3; firsts: 0,1,0 seconds: 1,0,1
    config2 = tiny_config(num_experts=2, num_experts_per_tok=2, capacity_factor=1.0)
    assert not SparseMoERouter(config2).over_capacity(index2).any()
    config3 = tiny_config(num_experts=2, num_experts_per_tok=2, capacity_factor=0.5)  # capacity 2
    dropped3 = SparseMoERouter(config3).over_capacity(index2)
    # expert 0: first choices t0, t2 fill it -> second choice of t1 dropped; expert 1: first of t1, second of t0.
    assert dropped3.tolist() == [[False, False], [False, True], [False, True]]


def test_dropped_assignments_keep_only_the_residual_and_eval_is_dropless():
    torch.manual_seed(0)
    config = tiny_config(num_experts=4, num_experts_per_tok=1, capacity_factor=0.25)
    block = SparseMoEBlock(config)
    for p in block.parameters():
        p.data.normal_(0, 0.5)
    x = torch.randn(2, 16, config.hidden_size)
    block.train()
    _, _, index, dropped = block.gate(x.reshape(-1, config.hidden_size))
    out = block(x).reshape(-1, config.hidden_size)
    assert dropped.any()
    fully_dropped = dropped.all(-1)
    assert torch.equal(out[fully_dropped], torch.zeros_like(out[fully_dropped]))  # block adds nothing
    block.eval()
    assert block.gate(x.reshape(-1, config.hidden_size))[3] is None
    out_eval = block(x).reshape(-1, config.hidden_size)
    assert (out_eval[fully_dropped].abs().sum(-1) > 0).all()


def test_dropped_fraction_is_reported_in_training_outputs():
    config = tiny_config(capacity_factor=0.5)
    model = SparseMoEForCausalLM(config).train()
    ids = torch.randint(3, 97, (4, 16))
    out = model(ids, labels=ids)
    assert out.dropped_fraction is not None and 0 < out.dropped_fraction.item() < 1
    model.eval()
    assert model(ids, labels=ids).dropped_fraction is None  # dropless


# ------------------------------------------------------------------------------------------------------------ losses
def _model_and_batch(**overrides):
    torch.manual_seed(0)
    config = tiny_config(router_aux_loss_coef=0.1, router_z_loss_coef=0.01, **overrides)
    model = SparseMoEForCausalLM(config).eval()
    ids = torch.randint(3, 97, (2, 10))
    return config, model, ids


def test_aux_loss_ignores_left_padding_when_mask_is_given():
    config, model, ids = _model_and_batch()
    mask = torch.ones_like(ids)
    pad = 4
    padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), mask], dim=1)
    clean = model(ids, attention_mask=mask, output_router_logits=True)
    masked = model(padded, attention_mask=padded_mask, output_router_logits=True)
    unmasked = model(padded, output_router_logits=True)
    torch.testing.assert_close(masked.aux_loss, clean.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(masked.z_loss, clean.z_loss, atol=1e-6, rtol=1e-5)
    assert (unmasked.aux_loss - clean.aux_loss).abs() > 1e-4


def test_aux_loss_equals_transformers_mixtral_function():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config, model, ids = _model_and_batch()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model(ids, attention_mask=mask, output_router_logits=True)
    expected = load_balancing_loss_func(out.router_logits, config.num_experts, config.num_experts_per_tok, mask)
    torch.testing.assert_close(out.aux_loss, expected, atol=1e-6, rtol=1e-5)


def test_z_loss_matches_formula():
    config, model, ids = _model_and_batch()
    out = model(ids, output_router_logits=True)
    logits = torch.cat(out.router_logits)
    expected = torch.logsumexp(logits.double(), dim=-1).pow(2).mean()
    torch.testing.assert_close(out.z_loss.double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(router_z_loss(out.router_logits), out.z_loss)


def test_both_losses_reach_loss_without_output_router_logits():
    config, model, ids = _model_and_batch()
    out = model(ids, labels=ids)
    assert out.router_logits is None  # not asked for, not returned
    lm_only = model.loss_function(out.logits, ids, config.vocab_size)
    expected = lm_only + 0.1 * out.aux_loss + 0.01 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss > 0 and out.z_loss > 0
    # Gradients of the aux loss reach the router weights through the loss.
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_coefficients_zero_leave_lm_loss_alone():
    torch.manual_seed(0)
    config = tiny_config(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    model = SparseMoEForCausalLM(config).eval()
    ids = torch.randint(3, 97, (2, 10))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, model.loss_function(out.logits, ids, config.vocab_size))


def test_sigmoid_aux_loss_uses_actual_selection():
    config, model, ids = _model_and_batch(router_type="sigmoid", num_experts=4, n_group=2, topk_group=1)
    out = model(ids, output_router_logits=True)
    probs = [torch.sigmoid(l) / torch.sigmoid(l).sum(-1, keepdim=True) for l in out.router_logits]
    counts = sum(torch.bincount(i.reshape(-1), minlength=4).float() for i in out.router_indices)
    rows = sum(l.shape[0] for l in out.router_logits)
    expected = 4 * ((counts / rows) * (sum(p.sum(0) for p in probs) / rows)).sum()
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(
        load_balancing_loss(out.router_logits, out.router_indices, 4, "sigmoid"), out.aux_loss
    )


# ------------------------------------------------------------------------------------------- aux-loss-free balancing
def test_update_router_biases_follows_deepseek_rule():
    torch.manual_seed(0)
    config = tiny_config(router_type="sigmoid", router_bias_update_rate=0.01, router_aux_loss_coef=0.0)
    model = SparseMoEForCausalLM(config).train()
    ids = torch.randint(3, 97, (2, 12))
    model(ids, labels=ids).loss.backward()
    routers = [m for m in model.modules() if isinstance(m, SparseMoERouter)]
    loads = [r.expert_load.clone() for r in routers]
    assert all(l.sum() == 2 * 12 * config.num_experts_per_tok for l in loads)
    assert update_router_biases(model) == len(routers) == 2
    for router, load in zip(routers, loads):
        torch.testing.assert_close(router.e_score_correction_bias, 0.01 * torch.sign(load.mean() - load))


def test_bias_balancing_reduces_imbalance():
    torch.manual_seed(0)
    config = tiny_config(num_experts=4, num_experts_per_tok=1, router_type="sigmoid", router_bias_update_rate=0.05)
    router = SparseMoERouter(config).train()
    router.weight.data.normal_(0, 1)
    router.weight.data[0] += 2.0  # expert 0 is everyone's favourite
    x = torch.randn(256, config.hidden_size).abs()
    router(x)
    before = router.expert_load.max().item()
    for _ in range(60):
        router(x)
        update_router_biases(router)
    router(x)
    assert router.expert_load.max().item() < 0.6 * before
    bias = router.e_score_correction_bias
    assert bias[0] < bias[1:].max()  # the favourite got pushed below some other expert


def test_jitter_noise_only_in_training():
    config = tiny_config(router_jitter_noise=0.5)
    router = _router(config)
    x = torch.randn(8, config.hidden_size)
    router.eval()
    assert torch.equal(router(x)[0], router(x)[0])
    router.train()
    assert not torch.equal(router(x)[0], router(x)[0])


def test_expert_loads_accumulate_over_micro_batches_until_the_update():
    torch.manual_seed(0)
    config = tiny_config(router_type="sigmoid", router_bias_update_rate=0.01)
    router = _router(config).train()
    x1, x2 = torch.randn(10, config.hidden_size), torch.randn(7, config.hidden_size)
    i1, i2 = router(x1)[2], router(x2)[2]
    load = torch.bincount(torch.cat([i1, i2]).reshape(-1), minlength=config.num_experts).float()
    assert torch.equal(router.expert_load, load)
    update_router_biases(router)
    torch.testing.assert_close(router.e_score_correction_bias, 0.01 * torch.sign(load.mean() - load))
    assert router.expert_load.sum() == 0  # reset for the next step
    router.eval()
    router(x1)
    assert router.expert_load.sum() == 0  # evaluation does not count


def test_router_bias_callback_updates_biases_once_per_optimizer_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    from modeling_sparse_moe.recipes.training import RouterBiasUpdateCallback

    torch.manual_seed(0)
    config = tiny_config(router_type="sigmoid", router_bias_update_rate=0.01, router_aux_loss_coef=0.0)
    model = SparseMoEForCausalLM(config)
    ids = torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[RouterBiasUpdateCallback()]).train()
    for router in (m for m in model.modules() if isinstance(m, SparseMoERouter)):
        steps = router.e_score_correction_bias / 0.01
        # Three updates of +-1 (or 0 for an expert exactly at the mean) each: integer, |.| <= 3, not all zero.
        torch.testing.assert_close(steps, steps.round())
        assert steps.abs().max() <= 3 and steps.abs().sum() > 0
        assert router.expert_load.sum() == 0
