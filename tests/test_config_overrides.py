"""Every path that sets config values ends in the same ValueError naming the field, before any layer is built:
the constructor (test_reliability.py), `from_pretrained` / `from_dict` keyword overrides, `update`,
`update_from_string`, and plain attribute assignment followed by building a model."""

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEDecoderLayer

from conftest import tiny_config
from test_reliability import INVALID as ALL_INVALID

# NOTE: one case names a field derived at construction (head_dim from hidden_size // heads); an override of
# hidden_size keeps the loaded head_dim, as for every transformers config, so that case is constructor-only.
INVALID = [(overrides, field) for overrides, field in ALL_INVALID if field in overrides]
IDS = [f"{field}-{i}" for i, (_, field) in enumerate(INVALID)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    SparseMoEForCausalLM(tiny_config()).save_pretrained(path)
    return path


@pytest.mark.parametrize("overrides,field", INVALID, ids=IDS)
def test_from_pretrained_overrides_are_validated(saved, overrides, field):
    with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
        AutoConfig.from_pretrained(saved, **overrides)


@pytest.mark.parametrize("overrides,field", INVALID[::4], ids=IDS[::4])
def test_model_from_pretrained_overrides_fail_before_loading(saved, overrides, field, monkeypatch):
    built = []
    monkeypatch.setattr(SparseMoEDecoderLayer, "__init__", lambda *a, **k: built.append(1) or 1 / 0)
    with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
        AutoModelForCausalLM.from_pretrained(saved, **overrides)
    assert built == []  # refused before any layer was built


@pytest.mark.parametrize("overrides,field", INVALID, ids=IDS)
def test_from_dict_overrides_are_validated(overrides, field):
    with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
        SparseMoEConfig.from_dict(tiny_config().to_dict(), **overrides)


@pytest.mark.parametrize("overrides,field", INVALID, ids=IDS)
def test_update_is_validated_and_rolled_back(overrides, field):
    config = tiny_config()
    before = config.to_dict()
    with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
        config.update(overrides)
    assert config.to_dict() == before  # a refused update changes nothing


@pytest.mark.parametrize("text,field", [
    ("num_experts_per_tok=9", "num_experts_per_tok"),
    ("n_group=3", "n_group"),
    ("hidden_size=-3", "hidden_size"),
    ("router_type=cosine", "router_type"),
])
def test_update_from_string_is_validated_and_rolled_back(text, field):
    config = tiny_config()
    before = config.to_dict()
    with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
        config.update_from_string(text)
    assert config.to_dict() == before


@pytest.mark.parametrize("overrides,field", INVALID, ids=IDS)
def test_setattr_then_build_fails_before_any_layer(overrides, field, monkeypatch):
    config = tiny_config()
    built = []
    monkeypatch.setattr(SparseMoEDecoderLayer, "__init__", lambda *a, **k: built.append(1) or 1 / 0)
    with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
        for key, value in overrides.items():  # a strict type check may already refuse here, naming the field too
            setattr(config, key, value)
        SparseMoEForCausalLM(config)
    assert built == []


def test_the_issue_examples_name_the_field(saved):
    cases = [
        (dict(router_type="sigmoid", n_group=8, topk_group=4), "n_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(hidden_size=-3), "hidden_size"),
    ]
    for overrides, field in cases:
        with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
            AutoConfig.from_pretrained(saved, **overrides)
    with pytest.raises(ValueError, match=r"SparseMoEConfig\.num_experts_per_tok="):
        AutoModelForCausalLM.from_pretrained(saved, num_experts_per_tok=9)


def test_valid_two_step_change_is_allowed():
    """Related fields changed one by one may pass through an invalid state; only the final state is judged."""
    config = tiny_config(num_experts=4, n_group=2, topk_group=1, router_type="sigmoid")
    config.num_experts = 6  # 6 % 2 == 0 still fine; now go to 3 groups of 2
    config.n_group = 3
    model = SparseMoEForCausalLM(config)
    assert model.config.n_group == 3
    config.update({"num_experts": 8, "n_group": 4})
    assert (config.num_experts, config.n_group) == (8, 4)


# ------------------------------------------------------------------------------------- the recipes' --config_overrides
# One valid, non-default value for every constructor field a user can set (the config's dataclass fields, those of
# PreTrainedConfig included; `transformers_version` is written by save_pretrained), as `--config_overrides` text, and
# the values the built config must hold. Fields whose default is None are set from None here: tiny has
# capacity_factor, sliding_window, shared_expert_intermediate_size, architectures, dtype, id2label, problem_type None.
OVERRIDE_CASES = {
    "architectures": ('architectures=["SparseMoEForCausalLM"]', {"architectures": ["SparseMoEForCausalLM"]}),
    "output_hidden_states": ("output_hidden_states=true", {"output_hidden_states": True}),
    "return_dict": ("return_dict=false", {"return_dict": False}),
    "dtype": ("dtype=bfloat16", {"dtype": torch.bfloat16}),
    "chunk_size_feed_forward": ("chunk_size_feed_forward=4", {"chunk_size_feed_forward": 4}),
    "is_encoder_decoder": ("is_encoder_decoder=true", {"is_encoder_decoder": True}),
    "id2label": ('id2label={"0": "neg", "1": "pos"}', {"id2label": {0: "neg", 1: "pos"}}),
    "label2id": ('label2id={"neg": 0, "pos": 1}', {"label2id": {"neg": 0, "pos": 1}}),
    "problem_type": ("problem_type=single_label_classification", {"problem_type": "single_label_classification"}),
    "vocab_size": ("vocab_size=1000", {"vocab_size": 1000}),
    "hidden_size": ("hidden_size=64", {"hidden_size": 64}),
    "num_hidden_layers": ("num_hidden_layers=3", {"num_hidden_layers": 3}),
    "num_attention_heads": ("num_attention_heads=8", {"num_attention_heads": 8}),
    "num_key_value_heads": ("num_key_value_heads=4", {"num_key_value_heads": 4}),
    "head_dim": ("head_dim=16", {"head_dim": 16}),
    "hidden_act": ("hidden_act=gelu", {"hidden_act": "gelu"}),
    "intermediate_size": ("intermediate_size=96", {"intermediate_size": 96}),
    "max_position_embeddings": ("max_position_embeddings=512", {"max_position_embeddings": 512}),
    "rope_parameters": ('rope_parameters={"rope_type": "default", "rope_theta": 10000.0}',
                        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "rms_norm_eps": ("rms_norm_eps=1e-5", {"rms_norm_eps": 1e-5}),
    "attention_bias": ("attention_bias=true", {"attention_bias": True}),
    "attention_out_bias": ("attention_out_bias=true", {"attention_out_bias": True, "attention_bias": False}),
    "attention_dropout": ("attention_dropout=0.1", {"attention_dropout": 0.1}),
    "sliding_window": ("sliding_window=64", {"sliding_window": 64}),
    "qk_norm": ("qk_norm=head", {"qk_norm": "head"}),
    "tie_word_embeddings": ("tie_word_embeddings=true", {"tie_word_embeddings": True}),
    "initializer_range": ("initializer_range=0.05", {"initializer_range": 0.05}),
    "pad_token_id": ("pad_token_id=none", {"pad_token_id": None}),
    "bos_token_id": ("bos_token_id=5", {"bos_token_id": 5}),
    "eos_token_id": ("eos_token_id=[2,3]", {"eos_token_id": [2, 3]}),
    "use_cache": ("use_cache=false", {"use_cache": False}),
    "num_experts": ("num_experts=8", {"num_experts": 8}),
    "num_experts_per_tok": ("num_experts_per_tok=1", {"num_experts_per_tok": 1}),
    "moe_intermediate_size": ("moe_intermediate_size=48", {"moe_intermediate_size": 48}),
    # the shared width is derived when unset (moe_intermediate_size 32 x 2), as for a freshly built config
    "num_shared_experts": ("num_shared_experts=2", {"num_shared_experts": 2, "shared_expert_intermediate_size": 64}),
    "shared_expert_intermediate_size": ("num_shared_experts=1,shared_expert_intermediate_size=256",
                                        {"num_shared_experts": 1, "shared_expert_intermediate_size": 256}),
    "shared_expert_gate": ("shared_expert_gate=true,num_shared_experts=1",
                           {"shared_expert_gate": True, "num_shared_experts": 1,
                            "shared_expert_intermediate_size": 32}),
    "first_k_dense_replace": ("first_k_dense_replace=1", {"first_k_dense_replace": 1}),
    "moe_layer_freq": ("moe_layer_freq=2", {"moe_layer_freq": 2}),
    "mlp_only_layers": ("mlp_only_layers=[0,1]", {"mlp_only_layers": [0, 1]}),
    "router_type": ("router_type=softmax", {"router_type": "softmax"}),  # the shipped configs route with sigmoid
    "norm_topk_prob": ("norm_topk_prob=false", {"norm_topk_prob": False}),
    "routed_scaling_factor": ("routed_scaling_factor=2.5", {"routed_scaling_factor": 2.5}),
    "n_group": ("n_group=2", {"n_group": 2}),
    "topk_group": ("n_group=4,topk_group=2", {"n_group": 4, "topk_group": 2}),
    "capacity_factor": ("capacity_factor=1.25", {"capacity_factor": 1.25}),
    "router_jitter_noise": ("router_jitter_noise=0.01", {"router_jitter_noise": 0.01}),
    "router_skip_threshold": ("router_skip_threshold=0.3", {"router_skip_threshold": 0.3}),
    "router_aux_loss_coef": ("router_aux_loss_coef=0.02", {"router_aux_loss_coef": 0.02}),
    "router_aux_loss_scope": ("router_aux_loss_scope=per_layer", {"router_aux_loss_scope": "per_layer"}),
    "router_z_loss_coef": ("router_z_loss_coef=0.002", {"router_z_loss_coef": 0.002}),
    "router_bias_update_rate": ("router_bias_update_rate=0.001", {"router_bias_update_rate": 0.001}),
    "output_router_logits": ("output_router_logits=true", {"output_router_logits": True}),
}
NOT_USER_SET = {"transformers_version"}


def _recipe_config(overrides):
    """What `scripts/pretrain.py --config_name tiny --config_overrides ...` (and the quickstart) builds."""
    from modeling_sparse_moe.recipes.pretraining import ModelArguments, build_config

    return build_config(ModelArguments(config_name="tiny", config_overrides=overrides))


def test_the_override_cases_cover_every_constructor_field():
    fields = {f.name for f in dataclasses.fields(SparseMoEConfig) if f.init} - NOT_USER_SET
    assert set(OVERRIDE_CASES) == fields


@pytest.mark.parametrize("field", sorted(OVERRIDE_CASES))
def test_config_overrides_set_every_field(field):
    text, expected = OVERRIDE_CASES[field]
    default = _recipe_config(None)
    assert getattr(default, field) != expected[field]  # the case changes the field
    config = _recipe_config(text)
    for key, value in expected.items():
        assert getattr(config, key) == value, key
        if isinstance(value, float):
            assert type(getattr(config, key)) is float, key  # parsed by the declared type, not left a string
    untouched = {k: v for k, v in default.to_dict().items() if k not in expected}  # nothing else changes
    assert {k: config.to_dict()[k] for k in untouched} == untouched
    config.validate()  # a valid config: a model can be built from it



@pytest.mark.parametrize("text,field,value", [
    ("capacity_factor=none", "capacity_factor", None),
    ("sliding_window=null", "sliding_window", None),
    ("qk_norm=none", "qk_norm", "none"),  # a str field: 'none' is its value, not None
    ("capacity_factor=1", "capacity_factor", 1),
    ("rms_norm_eps=1", "rms_norm_eps", 1.0),
])
def test_none_and_declared_types(text, field, value):
    start = _recipe_config("capacity_factor=1.25,sliding_window=64,qk_norm=head")
    from modeling_sparse_moe.recipes.pretraining import apply_config_overrides

    config = apply_config_overrides(start, text)
    assert getattr(config, field) == value and type(getattr(config, field)) is type(value)
    assert getattr(start, field) != value or field == "capacity_factor"  # the copy changed, not the original


@pytest.mark.parametrize("text,field", [
    ("hidden_size=wide", "hidden_size"),  # not of the declared type
    ("num_experts=2.5", "num_experts"),
    ("use_cache=1", "use_cache"),
    ("capacity_factor=big", "capacity_factor"),
    ("qk_norm=null", "qk_norm"),  # a string, but not one of the valid ones: the config's validation names it
    ("capacity_factor=0", "capacity_factor"),  # typed right, refused by SparseMoEConfig.validate
    ("sliding_window=0", "sliding_window"),
    ("shared_expert_intermediate_size=0,num_shared_experts=1", "shared_expert_intermediate_size"),
    ("mlp_only_layers=[0,", "mlp_only_layers"),  # bad JSON
    ("mlp_only_layers=[5]", "mlp_only_layers"),
    ("eos_token_id=[2,x]", "eos_token_id"),
])
def test_bad_override_values_name_the_field(text, field):
    with pytest.raises(ValueError, match=rf"SparseMoEConfig\.{field}="):
        _recipe_config(text)


def test_task_recipes_take_the_same_overrides():
    """The issue's three: fields whose default is None, which `update_from_string` refused with a TypeError."""
    from modeling_sparse_moe.recipes.data import train_tokenizer
    from modeling_sparse_moe.tasks.common import ModelArguments, load_config

    tokenizer = train_tokenizer(["the same few words again and again"] * 4, vocab_size=300)
    args = ModelArguments(config_name="tiny",
                          config_overrides="capacity_factor=1.25,sliding_window=64,shared_expert_intermediate_size=256")
    config = load_config(args, tokenizer)
    assert (config.capacity_factor, config.sliding_window, config.shared_expert_intermediate_size) == (1.25, 64, 256)
    assert config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError, match=r"SparseMoEConfig\.capacity_factor="):
        load_config(ModelArguments(config_name="tiny", config_overrides="capacity_factor=-1"), tokenizer)
