"""HF-style tiny-config model tests: every head, Auto classes, save/load, attention backends, variants."""

import pytest
import torch

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from modeling_sparse_moe import (
    SparseMoEConfig,
    SparseMoEForCausalLM,
    SparseMoEForQuestionAnswering,
    SparseMoEForSequenceClassification,
    SparseMoEForTokenClassification,
    SparseMoEModel,
)

from conftest import assert_fp32_close, misalign_, tiny_config

B, S = 3, 11

HEADS = [
    (AutoModel, SparseMoEModel),
    (AutoModelForCausalLM, SparseMoEForCausalLM),
    (AutoModelForSequenceClassification, SparseMoEForSequenceClassification),
    (AutoModelForTokenClassification, SparseMoEForTokenClassification),
    (AutoModelForQuestionAnswering, SparseMoEForQuestionAnswering),
]


def _ids(seed=0, batch=B, seq=S, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def _main_output(model, out):
    if isinstance(model, SparseMoEForQuestionAnswering):
        return torch.stack([out.start_logits, out.end_logits])
    return out.last_hidden_state if isinstance(model, SparseMoEModel) else out.logits


@pytest.mark.parametrize("auto_class,model_class", HEADS, ids=[m.__name__ for _, m in HEADS])
def test_auto_from_config_builds_our_class_with_expected_shapes(auto_class, model_class):
    config = tiny_config(num_labels=5)
    model = auto_class.from_config(config).eval()
    assert type(model) is model_class
    out = model(_ids())
    expected = {
        SparseMoEModel: (B, S, 32),
        SparseMoEForCausalLM: (B, S, 97),
        SparseMoEForSequenceClassification: (B, 5),
        SparseMoEForTokenClassification: (B, S, 5),
        SparseMoEForQuestionAnswering: (2, B, S),
    }[model_class]
    assert tuple(_main_output(model, out).shape) == expected
    assert torch.isfinite(_main_output(model, out)).all()


@pytest.mark.parametrize("auto_class,model_class", HEADS, ids=[m.__name__ for _, m in HEADS])
def test_save_and_reload_gives_identical_outputs(tmp_path, auto_class, model_class):
    torch.manual_seed(0)
    config = tiny_config(num_labels=3, router_type="sigmoid", num_shared_experts=1, shared_expert_gate=True)
    model = model_class(config).eval()
    # Non-trivial buffer so that reload has to restore it.
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is model_class
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert state.keys() == reloaded_state.keys()
    assert all(torch.equal(state[k], reloaded_state[k]) for k in state)  # identical weights: guaranteed everywhere
    misalign_(reloaded, nudge=True)
    ids = _ids(1)
    with torch.no_grad():
        expected, got = _main_output(model, model(ids)), _main_output(reloaded, reloaded(ids))
    assert not torch.equal(expected, got)  # the nudge is seen: a bitwise assertion here would fail
    assert_fp32_close(got, expected)  # outputs: equal up to fp32 rounding, on every CPU


def test_classification_heads_losses_include_router_losses():
    torch.manual_seed(0)
    config = tiny_config(num_labels=3, router_aux_loss_coef=0.5)
    ids = _ids()
    seq = SparseMoEForSequenceClassification(config).eval()
    out = seq(ids, labels=torch.tensor([0, 1, 2]))
    plain = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2]))
    assert out.loss > plain + 0.4  # aux loss ~ K = 2 for a near-uniform router, times 0.5
    qa = SparseMoEForQuestionAnswering(config).eval()
    positions = torch.tensor([1, 2, 3])
    out = qa(ids, start_positions=positions, end_positions=positions)
    assert torch.isfinite(out.loss)


def test_sequence_classification_pools_last_non_pad_token():
    torch.manual_seed(0)
    model = SparseMoEForSequenceClassification(tiny_config(num_labels=2)).eval()
    ids = _ids(batch=1, seq=6)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # right padding with pad id 0
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


VARIANTS = {
    "gqa-sdpa": dict(),
    "mha": dict(num_key_value_heads=4),
    "qk-head": dict(qk_norm="head"),
    "qk-full": dict(qk_norm="full"),
    "bias": dict(attention_bias=True),
    "qkv-bias-only": dict(attention_bias=True, attention_out_bias=False),
    "sliding": dict(sliding_window=4),
    "head-dim": dict(head_dim=16),
    "shared-gated": dict(num_shared_experts=2, shared_expert_gate=True),
    "dense-first": dict(first_k_dense_replace=1),
    "sigmoid-groups": dict(router_type="sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "top1": dict(num_experts_per_tok=1),
    "tied": dict(tie_word_embeddings=True),
    "rope-linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "rope-yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 32}),
    "rope-llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eager_and_sdpa_attention_agree_for_every_variant(name):
    torch.manual_seed(0)
    config = tiny_config(**VARIANTS[name])
    model = SparseMoEForCausalLM(config).eval()
    ids = _ids(seq=13)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    model.set_attn_implementation("sdpa")
    sdpa = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[mask.bool()], eager[mask.bool()], atol=2e-5, rtol=1e-4)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    config = tiny_config(sliding_window=3, num_hidden_layers=1)
    model = SparseMoEForCausalLM(config).eval()
    ids = _ids(batch=1, seq=10)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97  # token 0 is outside the window of token 9 with one layer
    out, out_changed = model(ids).logits, model(changed).logits
    torch.testing.assert_close(out[0, -1], out_changed[0, -1])
    assert not torch.allclose(out[0, 1], out_changed[0, 1])


def test_qk_norm_variants_have_the_documented_shapes():
    head = SparseMoEForCausalLM(tiny_config(qk_norm="head"))
    full = SparseMoEForCausalLM(tiny_config(qk_norm="full"))
    attn_h, attn_f = head.model.layers[0].self_attn, full.model.layers[0].self_attn
    assert attn_h.q_norm.weight.shape == (8,) and attn_h.k_norm.weight.shape == (8,)
    assert attn_f.q_norm.weight.shape == (32,) and attn_f.k_norm.weight.shape == (16,)


def test_outputs_hidden_states_attentions_and_router_logits():
    model = SparseMoEForCausalLM(tiny_config()).eval()
    model.set_attn_implementation("eager")
    out = model(_ids(), output_hidden_states=True, output_attentions=True, output_router_logits=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (B * S, 4)
    assert out.router_indices[0].shape == (B * S, 2)


def test_return_dict_false_gives_tuple():
    model = SparseMoEForCausalLM(tiny_config()).eval()
    ids = _ids()
    out = model(ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], model(ids, labels=ids).loss)


def test_config_dir_loads_with_autoconfig():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.iterdir() if (p / "config.json").exists())
    assert {"tiny", "demo", "mixtral-8x7b", "olmoe-1b-7b", "deepseek-style"} <= set(names)
    for name in names:
        config = AutoConfig.from_pretrained(root / name)
        assert isinstance(config, SparseMoEConfig)
    mixtral = AutoConfig.from_pretrained(root / "mixtral-8x7b")
    assert round(mixtral.num_parameters() / 1e9, 1) == 46.7
    assert round(mixtral.num_active_parameters() / 1e9, 1) == 12.9
    olmoe = AutoConfig.from_pretrained(root / "olmoe-1b-7b")
    assert round(olmoe.num_parameters() / 1e9, 1) == 6.9
    tiny = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "tiny"))
    assert tiny.num_parameters() == tiny.config.num_parameters()


def test_flex_attention_matches_eager_at_inference():
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(tiny_config()).eval()
    ids = _ids()
    with torch.no_grad():
        model.set_attn_implementation("flex_attention")
        flex = model(ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids).logits
    torch.testing.assert_close(flex, eager, atol=1e-5, rtol=1e-4)


def test_save_pretrained_auto_map_lists_every_head(tmp_path):
    import json

    SparseMoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_sparse_moe.SparseMoEConfig",
        "AutoModel": "modeling_sparse_moe.SparseMoEModel",
        "AutoModelForCausalLM": "modeling_sparse_moe.SparseMoEForCausalLM",
        "AutoModelForSequenceClassification": "modeling_sparse_moe.SparseMoEForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_sparse_moe.SparseMoEForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_sparse_moe.SparseMoEForQuestionAnswering",
    }
    for name in auto_map.values():
        assert (tmp_path / f"{name.split('.')[0]}.py").exists()
