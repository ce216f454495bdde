"""Serving export (`modeling_sparse_moe.interop.export`, `scripts/export.py`): native-family folders with the same logits,
GGUF files read back with `gguf` (names, shapes, values, tokenizer fields) and run by a numpy reference of
llama.cpp's `llama` graph, refusals that leave nothing behind."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from conftest import assert_fp32_close, tiny_config

import gguf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.interop.conversion import convert_folder, from_hf, to_hf
from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer
from modeling_sparse_moe.recipes.pretraining import BALANCED_ROUTER
from modeling_sparse_moe.interop.export import (
    export_for_serving,
    gguf_tokenizer_fields,
    pick_family,
    quantize_gguf,
    write_gguf,
)


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import export as export_cli  # noqa: E402  (scripts/export.py)

VOCAB = 320  # model rows; the tokenizer has fewer tokens, so the GGUF pads the token list
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEXT = "The quick brown fox's 12 jumps -- don't stop!  Twice\tover\n the lazy dog's 3.5 dogs."

# family -> SparseMoE settings it holds (and its llama.cpp architecture runs)
FAMILY_CASES = {
    "mixtral": dict(),
    "qwen3_moe": dict(qk_norm="head", head_dim=16),
    "qwen2_moe": dict(num_shared_experts=1, shared_expert_gate=True, attention_bias=True, attention_out_bias=False,
                      norm_topk_prob=False),
    "olmoe": dict(qk_norm="full", norm_topk_prob=False, num_key_value_heads=4),
    "glm4_moe": dict(router_type="sigmoid", num_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                     num_hidden_layers=3, qk_norm="head", attention_bias=True, attention_out_bias=False),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(load_text_corpus(max_chars=4000), vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(seed=0, **overrides) -> SparseMoEForCausalLM:
    model = SparseMoEForCausalLM(tiny_config(vocab_size=VOCAB, **overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.02 if "norm" not in name else 0.1) + (
                1.0 if "norm" in name else 0.0))
            if "embed" in name or "lm_head" in name or "experts" in name:
                param.mul_(10)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias") and model.config.router_type == "sigmoid":
                module.e_score_correction_bias.copy_(torch.randn(module.num_experts, generator=generator) * 0.05)
    return model


def save(model, folder, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return Path(folder)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def ids_for(tokenizer):
    return torch.tensor([tokenizer(TEXT)["input_ids"][:20]])


def field(reader, key):
    return reader.get_field(key).contents()


# ============================================================================================= native family folders
@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_export_picks_the_family_and_logits_match(family, tokenizer, tmp_path):
    ours = make_model(**FAMILY_CASES[family])
    src = save(ours, tmp_path / "src", tokenizer)
    result = export_for_serving(src, tmp_path / "out", gguf="f16")
    assert result.family == family and result.gguf == tmp_path / "out" / "model-f16.gguf"

    out = tmp_path / "out"
    assert not list(out.glob("*.py")) and not list(tmp_path.glob(".*partial*"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    native = AutoModelForCausalLM.from_pretrained(out)  # no remote code
    assert type(native).__name__ == to_hf(ours, family).__class__.__name__
    ids = ids_for(tokenizer)
    assert_fp32_close(logits(native, ids), logits(ours, ids))

    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert reloaded_tok.chat_template == CHAT_TEMPLATE
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1

    reader = gguf.GGUFReader(result.gguf)
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
            "glm4_moe": "glm4moe"}[family]  # fmt: skip
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.expert_count") == 4 and field(reader, f"{arch}.expert_used_count") == 2
    assert field(reader, f"{arch}.block_count") == ours.config.num_hidden_layers
    assert field(reader, f"{arch}.attention.key_length") == ours.config.head_dim
    tensors = {t.name: t for t in reader.tensors}
    state = ours.state_dict()
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # routing stays fp32
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate_inp.weight"].data, state["model.layers.1.mlp.gate.weight"])
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert list(down.shape) == [ours.config.moe_intermediate_size, 32, 4]  # ggml order: (F, D, E)
    np.testing.assert_array_equal(down.data, state["model.layers.1.mlp.experts.down_proj"].half().numpy())
    up = state["model.layers.1.mlp.experts.gate_up_proj"][:, ours.config.moe_intermediate_size :]
    np.testing.assert_array_equal(tensors["blk.1.ffn_up_exps.weight"].data, up.half().numpy())
    if family == "glm4_moe":
        assert config["partial_rotary_factor"] == 1.0 == config["rope_parameters"]["partial_rotary_factor"]
        assert field(reader, "glm4moe.rope.dimension_count") == ours.config.head_dim
        assert field(reader, "glm4moe.expert_weights_scale") == pytest.approx(2.5)
        assert field(reader, "glm4moe.leading_dense_block_count") == 1
        assert field(reader, "glm4moe.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
        np.testing.assert_array_equal(tensors["blk.1.exp_probs_b.bias"].data,
                                      state["model.layers.1.mlp.gate.e_score_correction_bias"])
        assert "blk.0.ffn_gate.weight" in tensors and "blk.1.post_attention_norm.weight" in tensors
    if family == "qwen2_moe":
        assert list(tensors["blk.0.ffn_gate_inp_shexp.weight"].shape) == [32]


def test_glm4_moe_holds_group_limited_sigmoid_routing_with_bias(tokenizer, tmp_path):
    """DeepSeek-V3 style routing (sigmoid, correction bias, groups, scaling, shared experts) exports to GLM-4-MoE
    exactly; its GGUF carries the group counts llama.cpp's MoE graph reads."""
    settings = dict(router_type="sigmoid", num_experts=8, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                    num_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=3)  # fmt: skip
    ours = make_model(**settings)
    assert pick_family(ours.config, ours.state_dict()) == "glm4_moe"
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    glm = to_hf(ours, "glm4_moe")
    assert_fp32_close(logits(glm, ids), logits(ours, ids))
    back = from_hf(glm)  # and back: the same tensors, correction bias included
    assert back.config.router_type == "sigmoid" and (back.config.n_group, back.config.topk_group) == (4, 2)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    glm.save_pretrained(tmp_path / "glm")  # per-expert layout on disk, streamed back (`scripts/convert.py --from auto`)
    convert_folder(tmp_path / "glm", tmp_path / "back")
    for key, value in SparseMoEForCausalLM.from_pretrained(tmp_path / "back").state_dict().items():
        torch.testing.assert_close(value, ours.state_dict()[key], rtol=0, atol=0)
    glm.config.rope_parameters["partial_rotary_factor"] = 0.5  # real GLM-4.5 checkpoints rotate half of each head
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5: SparseMoE rotates every head dimension"):
        from_hf(glm)
    assert pick_family(ours.config, ours.state_dict(), gguf=True) == "glm4_moe"
    reader = gguf.GGUFReader(write_gguf(ours, tmp_path / "m.gguf", "glm4_moe", tokenizer))
    assert field(reader, "glm4moe.expert_group_count") == 4 and field(reader, "glm4moe.expert_group_used_count") == 2
    assert field(reader, "glm4moe.expert_shared_count") == 2


def test_sigmoid_routing_without_shared_experts_gets_an_all_zero_one(tokenizer, tmp_path):
    """GLM-4-MoE always has shared experts: a sigmoid-routed model without any exports with one whose weights are
    zero, which adds exactly 0 (folder and GGUF)."""
    ours = make_model(seed=4, router_type="sigmoid", norm_topk_prob=False, routed_scaling_factor=1.5)
    src = save(ours, tmp_path / "src", tokenizer)
    result = export_for_serving(src, tmp_path / "out", gguf="f32")
    assert result.family == "glm4_moe"
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert native.config.n_shared_experts == 1 and not native.model.layers[0].mlp.shared_experts.down_proj.weight.any()
    ids = ids_for(tokenizer)
    assert_fp32_close(logits(native, ids), logits(ours, ids))
    reader = gguf.GGUFReader(result.gguf)
    assert field(reader, "glm4moe.expert_shared_count") == 1
    actual = llama_cpp_reference_logits(reader, ids[0].numpy())
    np.testing.assert_allclose(actual, logits(ours, ids)[0].numpy(), rtol=1e-4, atol=1e-4)


# ====================================================================================================== GGUF values
def test_gguf_round_trip_f32_f16_q8_0(tokenizer, tmp_path):
    ours = make_model(qk_norm="head")
    state = ours.state_dict()
    key = "model.layers.0.self_attn.o_proj.weight"
    for outtype in ("f32", "f16", "q8_0"):
        path = write_gguf(ours, tmp_path / f"m-{outtype}.gguf", "qwen3_moe", tokenizer, outtype=outtype)
        tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
        assert field(gguf.GGUFReader(path), "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
        expected = state[key].numpy()
        tensor = tensors["blk.0.attn_output.weight"]
        if outtype == "f32":
            np.testing.assert_array_equal(tensor.data, expected)
        elif outtype == "f16":
            np.testing.assert_array_equal(tensor.data, expected.astype(np.float16))
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
            # Q8_0: blocks of 32 with scale d = amax/127 stored in fp16: each value within d/2, plus |q| <= 127 times
            # the fp16 rounding of d (relative 2^-11)
            step = np.abs(expected.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            assert (np.abs(values - expected).reshape(-1, 32) <= step * (0.5 + 127 / 2048) + 1e-7).all()
            assert np.abs(values - expected).max() > 0  # really quantized
        np.testing.assert_array_equal(tensors["blk.0.attn_q_norm.weight"].data, state[
            "model.layers.0.self_attn.q_norm.weight"].numpy())  # norms stay fp32 in every type
        assert sorted(tensors) == sorted(gguf_names(ours.config, qk_norm=True))
    assert not list(tmp_path.glob(".*partial"))

    with torch.no_grad():  # a weight float16 cannot hold stays float32 rather than becoming inf
        ours.model.layers[0].self_attn.o_proj.weight[0, 0] = 1e5
    path = write_gguf(ours, tmp_path / "big.gguf", "qwen3_moe", tokenizer)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert tensors["blk.0.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_output.weight"].data[0, 0] == 1e5
    assert tensors["blk.0.attn_v.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def gguf_names(config, qk_norm=False):
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")]
        names += [f"blk.{i}.attn_q_norm.weight", f"blk.{i}.attn_k_norm.weight"] if qk_norm else []
    return names


REFERENCE_CASES = {  # family -> settings: every architecture's graph features (groups, scaling, dense lead, ...)
    "mixtral": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3_moe": dict(qk_norm="head", head_dim=16,
                      rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)),
    "qwen2_moe": FAMILY_CASES["qwen2_moe"],
    "olmoe": FAMILY_CASES["olmoe"],
    "glm4_moe": dict(FAMILY_CASES["glm4_moe"], num_experts=8, n_group=4, topk_group=2, num_shared_experts=2,
                     shared_expert_intermediate_size=72),  # 3 experts wide: glm4_moe's n_shared_experts=3
}


@pytest.mark.parametrize("family", list(REFERENCE_CASES))
def test_gguf_numpy_reference_forward_equals_our_logits(family, tokenizer, tmp_path):
    """A numpy implementation of llama.cpp's graph for each architecture (RoPE style and linear scaling, qk-norms,
    gating, bias, groups, top-k normalisation and scale, shared experts, dense layers), fed only from the GGUF file,
    gives our logits: tensor names, layouts, the q/k permutation of `llama` and the metadata are what llama.cpp
    reads."""
    ours = make_model(seed=1, **REFERENCE_CASES[family])
    path = write_gguf(ours, tmp_path / "m.gguf", family, tokenizer, outtype="f32")
    ids = ids_for(tokenizer)
    expected = logits(ours, ids)[0].numpy()
    actual = llama_cpp_reference_logits(gguf.GGUFReader(path), ids[0].numpy())
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def llama_cpp_reference_logits(reader, ids):
    """llama.cpp's llama / qwen2moe / qwen3moe / olmoe / glm4moe graphs (src/models/*.cpp, `build_moe_ffn`) in
    numpy, from an f32 GGUF file's tensors and metadata."""
    w = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    arch = field(reader, "general.architecture")

    def meta(key, default=None):
        return field(reader, f"{arch}.{key}") if reader.get_field(f"{arch}.{key}") else default

    n_head, n_kv, head_dim = meta("attention.head_count"), meta("attention.head_count_kv"), meta("rope.dimension_count")
    eps, theta = meta("attention.layer_norm_rms_epsilon"), meta("rope.freq_base")
    position_scale = 1 / meta("rope.scaling.factor") if meta("rope.scaling.type") == "linear" else 1.0
    top_k = meta("expert_used_count")
    groups, groups_used = meta("expert_group_count", 0), meta("expert_group_used_count")
    sigmoid_gate = meta("expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    norm_w = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}.get(arch, meta("expert_weights_norm"))
    scale = meta("expert_weights_scale", 0.0)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731

    def rms(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    def rope(x):  # (S, H, hd); `llama` rotates adjacent pairs (GGML_ROPE_TYPE_NORM), the others halves (NEOX)
        positions = np.arange(x.shape[0])[:, None, None] * position_scale
        angle = positions * theta ** (-np.arange(0, head_dim, 2) / head_dim)
        first, second = (x[..., 0::2], x[..., 1::2]) if arch == "llama" else np.split(x, 2, axis=-1)
        rotated = (first * np.cos(angle) - second * np.sin(angle), first * np.sin(angle) + second * np.cos(angle))
        out = np.empty_like(x)
        if arch == "llama":
            out[..., 0::2], out[..., 1::2] = rotated
        else:
            out[..., : head_dim // 2], out[..., head_dim // 2 :] = rotated
        return out

    def linear(x, name):
        return x @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0)

    def ffn(x, b, suffix=""):
        return linear(silu(linear(x, f"{b}ffn_gate{suffix}")) * linear(x, f"{b}ffn_up{suffix}"), f"{b}ffn_down{suffix}")

    x = w["token_embd.weight"][ids]
    seq = len(ids)
    for i in range(meta("block_count")):
        b = f"blk.{i}."
        h = rms(x, w[b + "attn_norm.weight"])
        q, k, v = linear(h, b + "attn_q"), linear(h, b + "attn_k"), linear(h, b + "attn_v")
        if arch == "olmoe":  # full-width qk-norm before the heads are split
            q, k = rms(q, w[b + "attn_q_norm.weight"]), rms(k, w[b + "attn_k_norm.weight"])
        q, k, v = q.reshape(seq, n_head, head_dim), k.reshape(seq, n_kv, head_dim), v.reshape(seq, n_kv, head_dim)
        if arch != "olmoe" and b + "attn_q_norm.weight" in w:
            q, k = rms(q, w[b + "attn_q_norm.weight"]), rms(k, w[b + "attn_k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + linear(np.einsum("hqk,khd->qhd", probs, v).reshape(seq, -1), b + "attn_output")
        h = rms(x, w[b + ("post_attention_norm" if arch == "glm4moe" else "ffn_norm") + ".weight"])
        if b + "ffn_gate.weight" in w:  # a dense layer
            x = x + ffn(h, b)
            continue
        router = h @ w[b + "ffn_gate_inp.weight"].T
        p = sigmoid(router) if sigmoid_gate else np.exp(router - router.max(-1, keepdims=True))
        p = p if sigmoid_gate else p / p.sum(-1, keepdims=True)
        choice = p + w.get(b + "exp_probs_b.bias", 0)
        if groups > 1:
            grouped = choice.reshape(seq, groups, -1)
            group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
            keep = np.argsort(-group_scores, axis=-1)[:, :groups_used]
            mask = np.zeros_like(group_scores, bool)
            np.put_along_axis(mask, keep, True, axis=-1)
            choice = np.where(np.repeat(mask, grouped.shape[-1], axis=-1), choice, -np.inf)
        out = np.zeros_like(h)
        for t in range(seq):
            chosen = np.argsort(-choice[t])[:top_k]
            weights = p[t, chosen] / (p[t, chosen].sum() if norm_w else 1.0)
            weights = weights * (scale if scale not in (0.0, 1.0) else 1.0)
            for e, weight in zip(chosen, weights):
                expert = silu(w[b + "ffn_gate_exps.weight"][e] @ h[t]) * (w[b + "ffn_up_exps.weight"][e] @ h[t])
                out[t] += weight * (w[b + "ffn_down_exps.weight"][e] @ expert)
        if b + "ffn_gate_shexp.weight" in w:
            shared = ffn(h, b, "_shexp")
            if b + "ffn_gate_inp_shexp.weight" in w:
                shared = shared * sigmoid(h @ w[b + "ffn_gate_inp_shexp.weight"])[:, None]
            out = out + shared
        x = x + out
    return rms(x, w["output_norm.weight"]) @ w["output.weight"].T


# ================================================================================================== tokenizer fields
def test_gguf_tokenizer_fields(tokenizer, tmp_path):
    path = write_gguf(make_model(), tmp_path / "m.gguf", "mixtral", tokenizer)
    reader = gguf.GGUFReader(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == VOCAB and len(tokenizer) < VOCAB
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:4] == [gguf.TokenType.CONTROL] * 4  # <pad> <s> </s> <unk>
    assert set(types[4 : len(tokenizer)]) == {gguf.TokenType.NORMAL}
    assert set(types[len(tokenizer) :]) == {gguf.TokenType.UNUSED}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) > 0
    assert [field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("padding", "bos", "eos", "unknown")] == [
        0, 1, 2, 3]  # fmt: skip
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # our tokenizers add no BOS
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


# llama.cpp's "gpt-2" pre-tokenizer (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2): this regex, and text between two
# matches kept as a piece of its own (GPT-2's own regex ends in "|\s+" instead, which matches exactly those pieces)
LLAMA_CPP_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""


def llama_cpp_gpt2_split(text):
    pieces, end = [], 0
    for match in regex.finditer(LLAMA_CPP_GPT2_REGEX, text):
        pieces += [text[end : match.start()]] if match.start() > end else []
        pieces.append(match.group())
        end = match.end()
    return pieces + ([text[end:]] if end < len(text) else [])


def test_our_pre_tokenizer_splits_like_llama_cpp_gpt2(tokenizer):
    """The words our tokenizer's pre-tokenizer makes equal those llama.cpp makes for pre='gpt-2'."""
    from tokenizers import decoders

    byte_level = decoders.ByteLevel()
    odd = "naïve café — 2024's “quotes”\n\n  indented\tcode()\u00a0x\t\ty  "
    texts = [TEXT, odd, *load_text_corpus(max_chars=3000)]
    for text in texts:
        words = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        pieces = [byte_level.decode([word]) for word, _ in words]
        assert pieces == llama_cpp_gpt2_split(text)


def test_tokenizers_llama_cpp_would_split_differently_are_refused(tokenizer):
    from tokenizers import pre_tokenizers

    other = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()))
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(ValueError, match="pre_tokenizer .*add_prefix_space"):
        gguf_tokenizer_fields(other, VOCAB)
    with pytest.raises(ValueError, match="but the model has vocab_size=200"):
        gguf_tokenizer_fields(tokenizer, 200)


# =============================================================================================== adapters and refusals
def test_lora_adapter_is_merged_on_the_way(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = make_model(seed=2)
    base_dir = save(base, tmp_path / "base", tokenizer)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])  # LoRA on the 3D experts too
    peft_model = get_peft_model(make_model(seed=2), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))

    result = export_for_serving(tmp_path / "adapter", tmp_path / "out")  # tokenizer and base from the base folder
    ids = ids_for(tokenizer)
    merged = logits(peft_model.merge_and_unload().eval(), ids)
    assert (merged - logits(base, ids)).abs().max() > 1e-3  # the adapter changes the model
    assert result.family == "mixtral"
    assert_fp32_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ids), merged)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == CHAT_TEMPLATE

    # Without its base: a clear error, nothing written.
    adapter_config["base_model_name_or_path"] = str(tmp_path / "missing")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ValueError, match="LoRA adapter without its base model .*--base PATH"):
        export_for_serving(tmp_path / "adapter", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    export_for_serving(tmp_path / "adapter", tmp_path / "out3", base=base_dir)  # --base names it
    assert_fp32_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out3"), ids), merged)


def test_unsupported_config_is_refused_with_the_nearest_settings(tokenizer, tmp_path):
    src = save(make_model(router_type="sigmoid", num_shared_experts=1, sliding_window=8), tmp_path / "src", tokenizer)
    with pytest.raises(ValueError) as error:
        export_for_serving(src, tmp_path / "out")
    message = str(error.value)
    assert "No transformers family holds this model exactly" in message
    assert "Nearest: glm4_moe, after changing sliding_window=8" in message
    assert "- mixtral: e_score_correction_bias non-zero" in message and "router_type='sigmoid'" in message
    assert "--model-impl transformers" in message
    with pytest.raises(ValueError, match="Cannot export this SparseMoE model as qwen3_moe"):
        export_for_serving(src, tmp_path / "out", family="qwen3_moe")
    olmoe_gqa = make_model(qk_norm="full", norm_topk_prob=False)  # 2 kv heads for 4 query heads
    with pytest.raises(ValueError, match="llama.cpp's olmoe k-norm spans hidden_size"):
        write_gguf(olmoe_gqa, tmp_path / "x.gguf", "olmoe", tokenizer)
    # qwen2moe without q/k/v bias: zero biases (older llama.cpp requires them), the same logits
    qwen2 = make_model(num_shared_experts=1, shared_expert_gate=True, norm_topk_prob=False)
    reader = gguf.GGUFReader(write_gguf(qwen2, tmp_path / "q2.gguf", "qwen2_moe", tokenizer, outtype="f32"))
    assert not {t.name: t for t in reader.tensors}["blk.0.attn_k.bias"].data.any()
    ids = ids_for(tokenizer)
    np.testing.assert_allclose(llama_cpp_reference_logits(reader, ids[0].numpy()), logits(qwen2, ids)[0].numpy(),
                               rtol=1e-4, atol=1e-4)
    (tmp_path / "q2.gguf").unlink()
    # the family holds it, llama.cpp's graph does not: refused only when a GGUF is asked for
    src2 = save(make_model(qk_norm="head", norm_topk_prob=False), tmp_path / "src2", tokenizer)
    with pytest.raises(ValueError, match="norm_topk_prob=False: llama.cpp's qwen3moe always uses True") as error:
        export_for_serving(src2, tmp_path / "out", gguf="f16")
    assert "Without a GGUF, qwen3_moe holds it." in str(error.value)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src", "src2"]
    assert export_for_serving(src2, tmp_path / "out").family == "qwen3_moe"


def test_the_recipes_default_router_exports_to_glm4_moe_and_its_gguf(tokenizer, tmp_path):
    """A model with the recipes' balanced router (`BALANCED_ROUTER`: sigmoid + a trained selection bias) is held by
    GLM-4-MoE and llama.cpp's glm4moe: same logits natively and in the GGUF's numpy reference forward."""
    ours = make_model(seed=2, **BALANCED_ROUTER)
    biases = [m.e_score_correction_bias for m in ours.modules() if hasattr(m, "e_score_correction_bias")]
    assert biases and all(bias.abs().max() > 0 for bias in biases)
    src = save(ours, tmp_path / "src", tokenizer)
    result = export_for_serving(src, tmp_path / "out", gguf="f32")
    assert result.family == "glm4_moe"
    ids = ids_for(tokenizer)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_fp32_close(logits(native, ids), logits(ours, ids))
    reference = llama_cpp_reference_logits(gguf.GGUFReader(result.gguf), ids[0].numpy())
    np.testing.assert_allclose(reference, logits(ours, ids)[0].numpy(), rtol=1e-4, atol=1e-4)


def test_a_softmax_router_with_a_selection_bias_is_one_error_naming_cause_and_fix(tokenizer, tmp_path, capsys):
    model = make_model(router_bias_update_rate=0.005)  # the former recipe default: softmax + bias updates
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.fill_(0.01)
    src = save(model, tmp_path / "src", tokenizer)
    capsys.readouterr()  # save_pretrained's progress bar
    assert export_cli.main([str(src), str(tmp_path / "out"), "--gguf"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export.py: error: This model's softmax router has a selection bias")
    assert "e_score_correction_bias non-zero in layers [0, 1]" in err[0]
    assert "router_type='sigmoid'" in err[0] and "router_bias_update_rate=0" in err[0]
    assert "Nearest" not in err[0] and not (tmp_path / "out").exists()


def test_generation_settings_engines_lack_stay_out_of_the_exported_folder(tokenizer, tmp_path, capsys):
    model = make_model()
    model.generation_config.no_repeat_ngram_size = 3
    model.generation_config.num_beams = 2
    src = save(model, tmp_path / "src", tokenizer)
    assert export_cli.main([str(src), str(tmp_path / "out")]) == 0
    shipped = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert "no_repeat_ngram_size" not in shipped and shipped["num_beams"] == 2  # vLLM and llama.cpp have beams
    assert "leaves out no_repeat_ngram_size=3" in capsys.readouterr().out


def test_bad_input_is_refused_and_nothing_is_half_written(tokenizer, tmp_path, capsys, monkeypatch):
    src = save(make_model(), tmp_path / "src")  # no tokenizer
    with pytest.raises(ValueError, match=r"No tokenizer \(tokenizer.json\) in .*--tokenizer FOLDER"):
        export_for_serving(src, tmp_path / "out")
    tokenizer.save_pretrained(tmp_path / "tok")
    export_for_serving(src, tmp_path / "out", tokenizer=tmp_path / "tok")
    with pytest.raises(ValueError, match="already exists; .*--overwrite"):
        export_for_serving(src, tmp_path / "out", tokenizer=tmp_path / "tok")
    with monkeypatch.context() as patch:  # no llama.cpp quantizer anywhere
        patch.setitem(sys.modules, "llama_cpp", None)
        patch.delenv("LLAMA_QUANTIZE", raising=False)
        patch.setattr(shutil, "which", lambda name: None)
        with pytest.raises(ValueError, match="llama-quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M"):
            export_for_serving(src, tmp_path / "q4", tokenizer=tmp_path / "tok", gguf="q4_k_m")
    with pytest.raises(ValueError, match="family must be 'auto' or one of"):
        export_for_serving(src, tmp_path / "q4", tokenizer=tmp_path / "tok", family="deepseek_v3")
    with pytest.raises(ValueError, match="gguf must be one of"):
        export_for_serving(src, tmp_path / "q4", tokenizer=tmp_path / "tok", gguf="q3")
    assert not (tmp_path / "q4").exists()
    with pytest.raises(ValueError, match="is a mixtral folder, not SparseMoE: it is already in a transformers family"):
        export_for_serving(tmp_path / "out", tmp_path / "again")
    with pytest.raises(ValueError, match="is not a folder"):
        export_for_serving(tmp_path / "nowhere", tmp_path / "again")

    # the CLI: one error line and status 1; --overwrite replaces; a GGUF inside
    assert export_cli.main([str(src), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("export.py: error: ") and "already exists" in err
    argv = [str(src), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"), "--overwrite", "--gguf", "q8_0"]
    assert export_cli.parse_args(argv[:2] + ["--gguf"]).gguf == "f16"  # --gguf alone: f16
    assert export_cli.main(argv) == 0
    assert "(mixtral) and" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model-q8_0.gguf", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "tok"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's private 0700
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o666 & ~umask}


# ==================================================================================== in llama.cpp (engine checks)
@pytest.mark.engines
@pytest.mark.parametrize("family", list(REFERENCE_CASES))
def test_gguf_runs_in_llama_cpp_with_our_tokens_and_logits(family, tokenizer, tmp_path):
    """The f32 GGUF of each architecture, run by llama.cpp itself (llama-cpp-python): its tokenizer gives our ids
    (pre-tokenizer, merges, special tokens) and its logits equal ours to float rounding. Then a Q4_K_M made from the
    f16 file by llama.cpp's quantizer loads and runs. Needs the engines environment (SPARSE_MOE_ENGINE_CHECKS=1)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ours = make_model(seed=1, **REFERENCE_CASES[family])
    f32 = write_gguf(ours, tmp_path / "m-f32.gguf", family, tokenizer, outtype="f32")
    # NOTE: fp32 KV cache (GGML type 0): llama.cpp's default f16 cache would round keys and values.
    llm = llama_cpp.Llama(model_path=str(f32), n_ctx=64, logits_all=True, type_k=0, type_v=0, n_threads=1,
                          verbose=False)
    ids = tokenizer(TEXT)["input_ids"][:20]
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tokenizer(TEXT)["input_ids"]
    assert llm.token_bos() == 1 and llm.token_eos() == 2
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    expected = logits(ours, torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(theirs, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    del llm

    f16 = write_gguf(ours, tmp_path / "m-f16.gguf", family, tokenizer, outtype="f16")
    q4 = quantize_gguf(f16, tmp_path / "m-Q4_K_M.gguf", "Q4_K_M")
    assert field(gguf.GGUFReader(q4), "general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    small = llama_cpp.Llama(model_path=str(q4), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    small.eval(ids)
    assert np.isfinite(np.asarray(small.scores[: len(ids)])).all()


def test_k_quants_go_through_llama_quantize(tokenizer, tmp_path, monkeypatch):
    """`--gguf Q4_K_M` writes the f16 file, then runs llama.cpp's quantizer on it (here a stand-in `llama-quantize`
    that records its arguments and copies the file)."""
    fake = tmp_path / "llama-quantize"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\ncp "$1" "$2"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("LLAMA_QUANTIZE", str(fake))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # the binary path, even where llama-cpp-python is installed
    src = save(make_model(), tmp_path / "src", tokenizer)
    result = export_for_serving(src, tmp_path / "out", gguf="q4_k_m")
    assert result.gguf == tmp_path / "out" / "model-Q4_K_M.gguf" and result.gguf.is_file()
    assert (tmp_path / "out" / "model-f16.gguf").is_file()
    assert (tmp_path / "args").read_text().split()[-1] == "Q4_K_M"
    with pytest.raises(ValueError, match="qtype must be one of"):
        quantize_gguf(result.gguf, tmp_path / "x.gguf", "Q3_K_S")


# README's "Serve it" commands, as written (the lead's README registry can name this test)
README_SERVE_COMMANDS = [
    "python scripts/export.py out/quickstart/pretrain out/serve --gguf",
    "python scripts/export.py out/quickstart/translation out/serve-mt --gguf q8_0",
]


def test_readme_serve_commands_work_as_written(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, seed in (("pretrain", 5), ("translation", 6)):
        save(make_model(seed=seed), Path("out/quickstart") / name, tokenizer)
    for command in README_SERVE_COMMANDS:
        argv = command.split()
        assert argv[:2] == ["python", "scripts/export.py"]
        assert export_cli.main(argv[2:]) == 0, command
    assert sorted(p.name for p in Path("out/serve").glob("*.gguf")) == ["model-f16.gguf"]
    assert sorted(p.name for p in Path("out/serve-mt").glob("*.gguf")) == ["model-q8_0.gguf"]
    assert json.loads(Path("out/serve-mt/config.json").read_text())["model_type"] == "mixtral"
