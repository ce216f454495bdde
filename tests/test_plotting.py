"""The routing and loss pictures: PNGs of the expected pixel size that are not blank, and the data behind them."""

import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, set_seed

import modeling_sparse_moe  # noqa: F401
from modeling_sparse_moe.recipes import plotting
from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(load_text_corpus(max_chars=30_000), vocab_size=512)


@pytest.fixture(scope="module")
def model():
    set_seed(0)
    config = AutoConfig.from_pretrained("configs/tiny")
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a router with real preferences (zero-initialised routers route by index ties)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    return model


def _image(path):
    pixels = mpimg.imread(path)  # H x W x 4 floats in [0, 1]
    return pixels[..., :3]


def _assert_not_blank(pixels, min_colours=20):
    assert pixels.std() > 0.05
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) >= min_colours
    assert (pixels < 0.5).mean() > 0.002  # some dark ink (text, lines)


def test_load_heatmap(tmp_path):
    steps, layers, experts = 12, 2, 4
    rng = np.random.default_rng(0)
    history = []
    for step in range(1, steps + 1):
        load = rng.dirichlet(np.ones(experts), size=layers)
        history.append({"step": step * 10, "load": load.tolist()})
    path = plotting.plot_load_heatmap({"layers": [0, 1], "num_experts": experts, "history": history},
                                      tmp_path / "heat.png")
    pixels = _image(path)
    expected_height = round((1.2 + 0.28 * experts * layers + 0.6) * plotting.DPI)
    assert pixels.shape[:2] == (expected_height, 10 * plotting.DPI)
    _assert_not_blank(pixels, min_colours=30)


def test_token_routing(model, tokenizer, tmp_path):
    text = "The for statement iterates over the items of a sequence."
    routing = plotting.route_tokens(model, tokenizer, text)
    num_tokens = len(tokenizer(text)["input_ids"])
    experts, weights = np.asarray(routing["experts"]), np.asarray(routing["weights"])
    assert experts.shape == weights.shape == (2, num_tokens, 2)
    assert routing["layers"] == [0, 1] and len(routing["tokens"]) == num_tokens
    assert np.allclose(weights.sum(-1), 1.0, atol=1e-5)  # norm_topk_prob: the two weights of a token sum to 1
    assert (weights[..., 0] >= weights[..., 1]).all()  # heaviest choice first
    assert (experts[..., 0] != experts[..., 1]).all() and experts.min() >= 0 and experts.max() < 4
    assert len(np.unique(experts[..., 0])) > 1  # a random router sends tokens to different experts
    path = plotting.plot_token_routing(routing, tmp_path / "routing.png")
    pixels = _image(path)
    assert pixels.shape[:2] == (round((1.6 + 0.55 * 2) * plotting.DPI),
                                round(max(6.0, 0.55 * num_tokens + 2.5) * plotting.DPI))
    _assert_not_blank(pixels)


def test_expert_specialisation(model, tokenizer, tmp_path):
    texts = load_text_corpus(max_chars=5_000)[:6]
    spec = plotting.expert_top_tokens(model, tokenizer, texts, layer=1, top_n=5)
    total_tokens = sum(len(tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
    assert spec["layer"] == 1 and sum(spec["assignments"]) == total_tokens * 2
    for expert, tops in spec["experts"].items():
        counts = [count for _, count, _ in tops]
        assert counts == sorted(counts, reverse=True) and len(tops) <= 5
        assert all(0 < share <= 1 for _, _, share in tops)
    table = plotting.specialisation_table(spec)
    assert table.count("\n| ") == 4 + 1  # header + one row per expert
    path = plotting.plot_expert_specialisation(spec, tmp_path / "spec.png")
    pixels = _image(path)
    assert pixels.shape[:2] == (round((1.0 + 0.32 * 4) * plotting.DPI), round((2.0 + 1.35 * 6) * plotting.DPI))
    _assert_not_blank(pixels)
    with pytest.raises(ValueError, match="MoE layers"):
        plotting.expert_top_tokens(model, tokenizer, texts, layer=5)


def test_loss_curves(tmp_path):
    log_history = [{"loss": 6.0 - 0.1 * s, "step": s} for s in range(1, 21)]
    log_history += [{"eval_loss": 5.5 - 0.05 * s, "step": s} for s in (5, 10, 15, 20)]
    curve = plotting.loss_curves_from_log_history(log_history)
    assert len(curve["train"]) == 20 and curve["eval"][-1] == (20, pytest.approx(4.5))
    dense = {"train": [(s, 6.2 - 0.08 * s) for s in range(1, 21)], "eval": [(s, 5.7 - 0.04 * s) for s in (5, 10, 20)]}
    path = plotting.plot_loss_curves({"moe": curve, "dense": dense}, tmp_path / "curves.png", target=4.9)
    pixels = _image(path)
    assert pixels.shape[:2] == (500, 800)
    _assert_not_blank(pixels)
    # two models: blue (tab10 #0) and orange (#1) lines are both drawn
    rgb = (pixels * 255).astype(int)
    assert (np.abs(rgb - [31, 119, 180]).sum(-1) < 30).sum() > 200
    assert (np.abs(rgb - [255, 127, 14]).sum(-1) < 30).sum() > 200
    assert not math.isnan(pixels.mean())


def test_seed_bands_and_loss_vs_experts(tmp_path):
    curves = {"dense": [[(10, 5.0), (20, 4.5)], [(10, 5.1), (20, 4.6)]], "moe": [[(10, 4.9), (20, 4.4)]]}
    pixels = _image(plotting.plot_seed_bands(curves, tmp_path / "bands.png", target=4.5))
    assert pixels.shape[:2] == (500, 800)
    _assert_not_blank(pixels)
    with pytest.raises(ValueError, match="different steps"):
        plotting.plot_seed_bands({"x": [[(10, 5.0)], [(11, 5.0)]]}, tmp_path / "bad.png")
    points = {1: [4.6, 4.62], 2: [4.55], 4: [4.5, 4.52], 8: [4.45, 4.47]}
    pixels = _image(plotting.plot_loss_vs_experts(points, tmp_path / "experts.png", {"dense": [4.6, 4.61]}))
    assert pixels.shape[:2] == (450, 700)
    _assert_not_blank(pixels)
    with pytest.raises(ValueError, match="at least one"):
        plotting.plot_loss_vs_experts({}, tmp_path / "none.png")
