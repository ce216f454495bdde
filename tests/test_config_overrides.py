"""Every path that sets config values ends in the same ValueError naming the field, before any layer is built:
the constructor (test_reliability.py), `from_pretrained` / `from_dict` keyword overrides, `update`,
`update_from_string`, and plain attribute assignment followed by building a model."""

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
