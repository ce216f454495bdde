"""Balanced by default: the recipes' router settings (`pretraining.BALANCED_ROUTER`: sigmoid scores with DeepSeek-V3's
aux-loss-free bias updates, aux 0.01 + z 0.001) keep every expert of every layer in use where the older recipe default
(softmax, aux 0.01 + z 0.001, no bias updates) lets experts die, and every recipe (configs/demo and configs/tiny, the
quickstart at each size, the MoE-vs-dense study) uses them. The per-layer load-balancing loss
(`router_aux_loss_scope="per_layer"`) sees what the pooled one cannot."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, get_cosine_schedule_with_warmup, set_seed

from conftest import tiny_config
from modeling_sparse_moe import quickstart
from modeling_sparse_moe.recipes import pretraining, study
from modeling_sparse_moe.configs import config_path
from modeling_sparse_moe import SparseMoEConfig
from modeling_sparse_moe.modeling_sparse_moe import load_balancing_loss, update_router_biases
from modeling_sparse_moe.recipes.pretraining import BALANCED_ROUTER
from modeling_sparse_moe.recipes.study import STUDY_BASE, expert_shares
from modeling_sparse_moe.recipes.training import RouterTelemetry

OLD_DEFAULT = {"router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001, "router_bias_update_rate": 0.0}
# The goal for the quickstart: every expert of every layer gets at least 0.3x the uniform share at the end.
FLOOR = 0.3
STEPS, WINDOW, BATCH, SEQ = 40, 10, 8, 32


def _stub_tokens(num_rows=64, seq=SEQ, vocab=97, seed=0):
    """Zipf-distributed token ids (like words in text): a few frequent tokens give the routers something to
    specialise on, and collapse on."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab - 3, dtype=torch.float32)
    return (torch.multinomial(weights, num_rows * seq, replacement=True, generator=generator) + 4).view(num_rows, seq)


def _train(router: dict) -> tuple[list[list[float]], float]:
    """8 experts top-2, 2 layers, AdamW 1e-2 with warmup + cosine (the quickstart's schedule, a tiny model's learning
    rate), 40 steps of 8 x 32 tokens; bias updates after each step as `RouterBiasUpdateCallback` makes them. Returns
    each expert's share of its layer's assignments over the last 10 steps (x uniform) and the mean training loss of
    those steps."""
    set_seed(0)
    config = tiny_config(num_experts=8, **router)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_cosine_schedule_with_warmup(optimizer, STEPS // 20, STEPS)
    telemetry = RouterTelemetry(model)
    tokens = _stub_tokens()
    order = torch.Generator().manual_seed(0)
    losses = []
    for step in range(STEPS):
        if step == STEPS - WINDOW:
            telemetry.reset()
        batch = tokens[torch.randint(0, len(tokens), (BATCH,), generator=order)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_router_biases(model)  # a no-op at rate 0
        losses.append(float(loss.detach()))
    loads = telemetry.loads()
    return expert_shares([loads[layer] for layer in sorted(loads)]), sum(losses[-WINDOW:]) / WINDOW


def test_balanced_router_keeps_every_expert_in_use_where_the_old_default_collapses():
    balanced, balanced_loss = _train(BALANCED_ROUTER)
    old, old_loss = _train(OLD_DEFAULT)
    # Every expert of both layers keeps >= 0.3x its share (measured here: min 0.70x; softmax with bias updates at 0.005,
    # the former default: 0.80x; a per-layer aux loss of 0.01 / 0.02 / 0.05 without bias updates: 0.04x / 0.09x /
    # 0.13x, which is why the default balances with the bias, on a sigmoid router that GLM-4-MoE exports) ...
    assert min(min(layer) for layer in balanced) >= FLOOR, balanced
    # ... while the old default starves experts on the same tokens (measured: min 0.01x, 7 of 16 under 0.15x).
    assert min(min(layer) for layer in old) < FLOOR / 3, old
    assert sum(share < FLOOR for layer in old for share in layer) >= 4, old
    # Balance is not bought with the loss (measured: within 0.02 nats of each other).
    assert balanced_loss < old_loss + 0.1


def test_every_recipe_uses_the_balanced_router():
    for name in ("demo", "tiny"):  # the pretraining recipe's default config; the task recipes' from-scratch one
        shipped = AutoConfig.from_pretrained(config_path(name))
        for key, value in BALANCED_ROUTER.items():
            assert getattr(shipped, key) == value, (name, key)
    for name, size in quickstart.SIZES.items():
        config = pretraining.build_config(
            pretraining.ModelArguments(config_name=config_path(size.model), config_overrides=size.overrides)
        )
        for key, value in BALANCED_ROUTER.items():
            assert getattr(config, key) == value, (name, key)
    for key, value in BALANCED_ROUTER.items():
        assert STUDY_BASE[key] == value


def test_expert_shares_are_multiples_of_the_uniform_share():
    assert expert_shares([[10, 30, 0, 0], [5, 5, 5, 5]]) == [[1.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert expert_shares([[0, 0]]) == [[0.0, 0.0]]


def test_study_variants_carry_router_learning_rate_and_init():
    overrides, options = study._split_run_options(
        "num_experts=8,router_lr_scale=0.1,mlp_only_layers=[0,1],router_init_std=0"
    )
    assert overrides == "num_experts=8,mlp_only_layers=[0,1]"
    assert options == {"router_lr_scale": 0.1, "router_init_std": 0.0}
    with pytest.raises(ValueError, match="router_lr_scale='fast' is not a number"):
        study._split_run_options("router_lr_scale=fast")
    args = study.StudyArguments(learning_rate=1e-3)
    run = study._StudyRun("x", tiny_config(), args, seed=0, options=options)
    routers = [p for n, p in run.model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert routers and all(float(p.detach().abs().max()) == 0.0 for p in routers)
    assert run.optimizer.param_groups[-1]["lr"] == pytest.approx(1e-4 * 0)  # scheduler warmup starts at 0
    assert run.scheduler.base_lrs[-1] == pytest.approx(1e-4)


def test_quickstart_preset_sets_the_quickstart_optimisation_and_explicit_flags_win():
    args = study.StudyArguments(preset="quickstart", steps=1600)
    study._apply_preset(args)
    assert (args.steps, args.learning_rate, args.warmup_steps, args.weight_decay, args.adam_beta2) == (
        1600, 2e-3, 20, 0.0, 0.999)
    with pytest.raises(ValueError, match="only preset is 'quickstart'"):
        study._apply_preset(study.StudyArguments(preset="nope"))


def _routed(layers_experts: list[list[int]], tokens: int = 8, num_experts: int = 4):
    """Router logits and top-2 indices where every token of layer l goes to experts `layers_experts[l]`, with router
    probabilities that agree (the chosen experts get most of the mass)."""
    logits, indices = [], []
    for chosen in layers_experts:
        row = torch.full((num_experts,), -4.0)
        row[chosen] = 4.0
        logits.append(row.expand(tokens, num_experts).clone())
        indices.append(torch.tensor(chosen).expand(tokens, len(chosen)).clone())
    return tuple(logits), tuple(indices)


def test_per_layer_balancing_loss_sees_a_layer_that_the_pooled_loss_cannot():
    # Layer 0 uses experts 0 and 1 only, layer 1 experts 2 and 3 only: pooled over layers, every expert gets its share.
    logits, indices = _routed([[0, 1], [2, 3]])
    pooled = load_balancing_loss(logits, indices, 4)
    per_layer = load_balancing_loss(logits, indices, 4, scope="per_layer")
    balanced_logits, balanced_indices = _routed([[0, 1], [2, 3]][:1] + [[0, 1]])  # both layers on experts 0 and 1
    # Pooled over the two layers every expert gets f_e = 1/2 of the rows and P_e = 1/4: E * sum f P = 4 * 4/8 = 2.0.
    assert float(pooled) == pytest.approx(2.0, rel=1e-6)
    # Each layer alone: two experts with f = 1 and P = p (softmax of [4, 4, -4, -4]), two idle: 4 * 2p ~ 4.0.
    p = torch.tensor([4.0, 4.0, -4.0, -4.0]).softmax(-1)[0].item()
    assert float(per_layer) == pytest.approx(8 * p, rel=1e-6)
    # The per-layer value is the mean of each layer's own (pooled over one layer) loss.
    each = [load_balancing_loss(logits[i:i + 1], indices[i:i + 1], 4) for i in range(2)]
    assert float(per_layer) == pytest.approx(float(sum(each) / 2), rel=1e-6)
    # With both layers on the same two experts the two scopes agree.
    assert float(load_balancing_loss(balanced_logits, balanced_indices, 4, scope="per_layer")) == pytest.approx(
        float(load_balancing_loss(balanced_logits, balanced_indices, 4)), rel=1e-6)


def test_per_layer_scope_reaches_the_model_loss_and_bad_values_are_refused():
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 12))
    losses = {}
    for scope in ("pooled", "per_layer"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(router_aux_loss_coef=1.0, router_aux_loss_scope=scope))
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        each = [load_balancing_loss(out.router_logits[i:i + 1], out.router_indices[i:i + 1], 4) for i in range(2)]
        pooled = load_balancing_loss(out.router_logits, out.router_indices, 4)
        expected = sum(each) / 2 if scope == "per_layer" else pooled
        assert float(out.aux_loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6), scope
        losses[scope] = float(out.aux_loss.detach())
    assert losses["per_layer"] >= losses["pooled"] - 1e-6  # Cauchy-Schwarz: pooling can only hide imbalance
    with pytest.raises(ValueError, match="router_aux_loss_scope.*must be one of"):
        SparseMoEConfig(router_aux_loss_scope="layer")
