"""SparseMoEConfig: validation names the field, structure helpers, parameter counts."""

import pytest

from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEBlock

from conftest import tiny_config

INVALID = [
    # (overrides, field named in the error)
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),  # top-k > experts
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),  # does not divide heads
    (dict(n_group=3), "n_group"),  # does not divide 4 experts
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=2), "topk_group"),  # 1 group of 1 expert < top-2
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
    (dict(router_z_loss_coef=-1.0), "router_z_loss_coef"),
    (dict(router_bias_update_rate=-0.01), "router_bias_update_rate"),
    (dict(router_jitter_noise=-0.1), "router_jitter_noise"),
    (dict(router_jitter_noise=1.5), "router_jitter_noise"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(router_type="relu"), "router_type"),
    (dict(qk_norm="layer"), "qk_norm"),
    (dict(hidden_act="not_an_activation"), "hidden_act"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(num_experts=-1), "num_experts"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(moe_layer_freq=0), "moe_layer_freq"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(mlp_only_layers=[5]), "mlp_only_layers"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),  # gate without shared experts
    (dict(attention_dropout=1.0), "attention_dropout"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(head_dim=0), "head_dim"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(capacity_factor="big"), "capacity_factor"),
]


@pytest.mark.parametrize("overrides,field", INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_field_raises_value_error_naming_it(overrides, field):
    with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
        tiny_config(**overrides)


def test_zero_experts_builds_a_dense_model():
    config = tiny_config(num_experts=0)
    assert not any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def test_layer_layout_first_k_dense_freq_and_mlp_only():
    config = tiny_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2, mlp_only_layers=[3])
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    model = SparseMoEForCausalLM(config)
    assert [isinstance(layer.mlp, SparseMoEBlock) for layer in model.model.layers] == [
        False, True, False, False, False, True
    ]


def _count(model, include_router=True):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(tie_word_embeddings=True),
        dict(num_shared_experts=2, shared_expert_gate=True, attention_bias=True, qk_norm="head"),
        dict(qk_norm="full", attention_bias=True, attention_out_bias=False, first_k_dense_replace=1),
        dict(num_experts=8, num_experts_per_tok=3, head_dim=16, moe_layer_freq=2, num_hidden_layers=3),
    ],
)
def test_num_parameters_and_active_parameters_match_direct_count(overrides):
    config = tiny_config(**overrides)
    model = SparseMoEForCausalLM(config)
    assert config.num_parameters() == model.num_parameters() == _count(model)
    # Active per token: everything except the routed experts not chosen, counted from the real modules.
    inactive = 0
    for module in model.modules():
        if isinstance(module, SparseMoEBlock):
            per_expert = (module.experts.gate_up_proj.numel() + module.experts.down_proj.numel()) // config.num_experts
            inactive += per_expert * (config.num_experts - config.num_experts_per_tok)
    assert config.num_active_parameters() == _count(model) - inactive
    assert config.num_active_parameters() < config.num_parameters()


def test_round_trip_through_dict_keeps_every_field():
    config = tiny_config(router_type="sigmoid", n_group=2, topk_group=1, capacity_factor=1.25, qk_norm="full")
    again = SparseMoEConfig.from_dict(config.to_dict())
    for key in ("router_type", "n_group", "topk_group", "capacity_factor", "qk_norm", "num_experts"):
        assert getattr(again, key) == getattr(config, key)
