"""Conversion to and from transformers' MoE families, sparse upcycling of dense models, streaming folder conversion.

Reference numerics are the transformers classes themselves, built from their own configs at tiny size in fp32 with
random weights (norm weights around 1, biases non-zero, routers sharp enough that routing is decisive).
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM
from modeling_sparse_moe.interop import families
from modeling_sparse_moe.interop.conversion import (
    convert_folder,
    from_hf,
    hf_config_from_sparse,
    to_hf,
    upcycle,
    upcycle_folder,
)
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEBlock

from conftest import assert_fp32_close, misalign_


REPO = Path(__file__).resolve().parents[1]
ATTN = "eager"
VOCAB = 100
TOL = 1e-5
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Each family at tiny size, exercising its particular features.
MOE_CASES = {
    # sliding window shorter than the test sequences
    "mixtral": lambda: (
        MixtralForCausalLM,
        MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=4, sliding_window=6),
    ),
    # qkv bias without o bias, gated shared expert, an mlp-only layer, no top-k renormalisation
    "qwen2_moe": lambda: (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        ),
    ),
    # per-head qk-norm, head_dim != hidden/heads, q/k/v/o bias, sparse step 2, tied embeddings, sliding window
    "qwen3_moe": lambda: (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=4,
            head_dim=16,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=3,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            attention_bias=True,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=7,
        ),
    ),
    # full-width qk-norm, top-k not renormalised
    "olmoe": lambda: (
        OlmoeForCausalLM,
        OlmoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    ),
}

DENSE_CASES = {
    "llama": lambda: (LlamaForCausalLM, LlamaConfig(**COMMON, num_hidden_layers=2, intermediate_size=48)),
    "mistral": lambda: (
        MistralForCausalLM,
        MistralConfig(**COMMON, num_hidden_layers=2, intermediate_size=48, sliding_window=6),
    ),
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(**COMMON, num_hidden_layers=2, intermediate_size=48)),
    "qwen3": lambda: (
        Qwen3ForCausalLM,
        Qwen3Config(**COMMON, num_hidden_layers=2, intermediate_size=48, head_dim=16, tie_word_embeddings=True),
    ),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: norms around 1, biases non-zero, routers sharp."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                param.copy_(1.0 * noise)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def build(cases, family, seed=0):
    model_class, config = cases[family]()
    config._attn_implementation = ATTN
    return randomize_(model_class(config), seed)


@pytest.fixture(scope="module")
def hf_models():
    return {family: build(MOE_CASES, family, seed=i) for i, family in enumerate(MOE_CASES)}


def padded_batch(seed=0, batch=3, length=12):
    """Random ids with left padding of different lengths (row 0 unpadded)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
    ids[mask == 0] = COMMON["pad_token_id"]
    return ids, mask


@torch.no_grad()
def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def max_delta(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def disk_keys(folder) -> set[str]:
    keys = set()
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def load_cli():
    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ============================================================================================================ from_hf
@pytest.mark.parametrize("family", list(MOE_CASES))
def test_from_hf_logits_and_generation_match(hf_models, family):
    hf = hf_models[family]
    ours = from_hf(hf)
    assert isinstance(ours, SparseMoEForCausalLM)
    assert ours.config._attn_implementation == ATTN
    ids, mask = padded_batch()
    assert max_delta(logits(hf, ids, mask), logits(ours, ids, mask), mask) <= TOL

    generate = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = hf.generate(ids, **generate)
        got = ours.generate(ids, **generate)
    assert torch.equal(expected, got)


def test_from_hf_maps_features(hf_models):
    qwen2 = from_hf(hf_models["qwen2_moe"]).config
    assert (qwen2.attention_bias, qwen2.attention_out_bias) == (True, False)
    assert (qwen2.num_shared_experts, qwen2.shared_expert_gate, qwen2.shared_expert_intermediate_size) == (1, True, 24)
    assert qwen2.mlp_only_layers == [0] and qwen2.norm_topk_prob is False
    qwen3 = from_hf(hf_models["qwen3_moe"]).config
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.moe_layer_freq, qwen3.sliding_window) == ("head", 16, 2, 7)
    assert [qwen3.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert qwen3.tie_word_embeddings and qwen3.attention_out_bias
    assert from_hf(hf_models["olmoe"]).config.qk_norm == "full"
    assert from_hf(hf_models["mixtral"]).config.sliding_window == 6


# ============================================================================================================== to_hf
@pytest.mark.parametrize("family", list(MOE_CASES))
def test_to_hf_round_trip_is_identical(hf_models, family, tmp_path):
    hf = hf_models[family]
    back = to_hf(from_hf(hf), family)
    assert type(back) is type(hf)
    assert_same_state(hf.state_dict(), back.state_dict())
    ids, mask = padded_batch(seed=1)
    assert_fp32_close(logits(hf, ids, mask), logits(misalign_(copy.deepcopy(back), nudge=True), ids, mask))

    # The export loads with plain AutoModelForCausalLM (no remote code) in the family's own on-disk layout.
    hf.save_pretrained(tmp_path / "reference")
    back.save_pretrained(tmp_path / "export")
    assert not list((tmp_path / "export").glob("*.py"))
    assert disk_keys(tmp_path / "export") == disk_keys(tmp_path / "reference")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation=ATTN)
    assert type(reloaded) is type(hf)
    assert_same_state(hf.state_dict(), reloaded.state_dict())
    assert_fp32_close(logits(hf, ids, mask), logits(misalign_(reloaded, nudge=True), ids, mask))


@pytest.mark.parametrize(
    "family, features",
    [
        # window on every layer (Qwen2-MoE: layer_types), first dense layer (-> mlp_only_layers), fused shared experts
        ("qwen2_moe", dict(sliding_window=5, first_k_dense_replace=1, num_shared_experts=2, shared_expert_gate=True,
                           attention_bias=True, attention_out_bias=False, norm_topk_prob=False)),
        ("qwen3_moe", dict(qk_norm="head", head_dim=16, moe_layer_freq=2, mlp_only_layers=[3], attention_bias=True)),
        ("mixtral", dict(sliding_window=5, num_hidden_layers=2)),
        ("olmoe", dict(qk_norm="full", attention_bias=True, num_hidden_layers=2, norm_topk_prob=False)),
    ],
)  # fmt: skip
def test_to_hf_from_native_sparse_model(family, features):
    """A SparseMoE model trained natively exports with the same logits, and comes back identical."""
    config = SparseMoEConfig(
        **{**COMMON, "num_hidden_layers": 4, "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 8,
           "num_experts_per_tok": 2, **features}
    )  # fmt: skip
    ours = randomize_(SparseMoEForCausalLM._from_config(config, attn_implementation=ATTN), seed=5)
    exported = to_hf(ours, family)
    ids, mask = padded_batch(seed=4)
    assert max_delta(logits(ours, ids, mask), logits(exported, ids, mask), mask) <= TOL
    back = from_hf(exported)
    assert_same_state(ours.state_dict(), back.state_dict())
    assert [back.config.is_moe_layer(i) for i in range(4)] == [config.is_moe_layer(i) for i in range(4)]


# ============================================================================================================ folders
@pytest.mark.parametrize("family", list(MOE_CASES))
def test_folder_conversion_equals_in_memory(hf_models, family, tmp_path):
    hf = hf_models[family]
    expected = from_hf(hf).state_dict()
    src = tmp_path / "src"
    hf.save_pretrained(src, max_shard_size="40KB")
    (src / "tokenizer_config.json").write_text("{}")
    assert (src / "model.safetensors.index.json").is_file()  # a multi-shard source

    assert_same_state(expected, from_hf(src).state_dict())

    dst = convert_folder(src, tmp_path / "sparse", max_shard_size="40KB")
    assert (dst / "model.safetensors.index.json").is_file() and (dst / "modeling_sparse_moe.py").is_file()
    assert (dst / "tokenizer_config.json").is_file()
    reloaded = SparseMoEForCausalLM.from_pretrained(dst)
    assert_same_state(expected, reloaded.state_dict())
    # the same config and Hub-facing code files `save_pretrained` writes
    reloaded.save_pretrained(tmp_path / "saved")
    assert {p.name for p in dst.glob("*.py")} == {p.name for p in (tmp_path / "saved").glob("*.py")}
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert json.loads((dst / "config.json").read_text())["auto_map"] == saved_config["auto_map"]

    back = convert_folder(dst, tmp_path / "back", to=family)
    assert disk_keys(back) == disk_keys(src)  # the family's own per-expert layout, as engines expect
    assert not list(back.glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(back)
    assert type(reloaded) is type(hf)
    assert_same_state(hf.state_dict(), reloaded.state_dict())


def test_folder_with_fused_expert_layout_and_bf16(hf_models, tmp_path):
    """A folder saved with the in-memory (fused) names reads too, and a bf16 checkpoint stays bf16."""
    hf = hf_models["mixtral"]
    src = tmp_path / "fused"
    src.mkdir()
    hf.config.save_pretrained(src)
    state = {key: value.to(torch.bfloat16).contiguous() for key, value in hf.state_dict().items()}
    save_file(state, src / "model.safetensors")
    assert any(key.endswith("experts.gate_up_proj") for key in disk_keys(src))

    ours = from_hf(src)
    assert ours.dtype == torch.bfloat16
    expected = from_hf(copy.deepcopy(hf).to(torch.bfloat16)).state_dict()
    assert_same_state(expected, ours.state_dict())
    dst = convert_folder(src, tmp_path / "sparse")
    with safe_open(dst / "model.safetensors", framework="pt") as handle:
        assert handle.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_dtype() == "BF16"
        assert handle.get_slice("model.layers.0.mlp.gate.e_score_correction_bias").get_dtype() == "F32"


STREAM_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import psutil, torch
    from transformers import AutoConfig
    from modeling_sparse_moe import SparseMoEForCausalLM
    from modeling_sparse_moe.interop.conversion import convert_folder, sparse_config_from_hf

    # warm-up: modules transformers imports lazily (config classes, meta-device model build) are not checkpoint memory
    with torch.device("meta"):
        SparseMoEForCausalLM(sparse_config_from_hf(AutoConfig.from_pretrained(sys.argv[1])))

    def rss():
        return psutil.Process().memory_info().rss

    try:  # reset the kernel's peak-RSS counter (VmHWM) so that it measures the conversion only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no procfs: sample RSS every millisecond instead
        samples, done = [0], threading.Event()
        def sample():
            while not done.is_set():
                samples.append(rss())
                time.sleep(0.001)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        def peak():
            done.set()
            sampler.join()
            return max(samples)

    baseline = rss()
    convert_folder(sys.argv[1], sys.argv[2], max_shard_size="10MB")
    print(json.dumps({"baseline": baseline, "peak": max(peak(), baseline)}))
    """
)


def write_big_mixtral(folder: Path, layers=8, hidden=256, ffn=448, experts=8, vocab=1000) -> int:
    """A ~100 MB multi-shard Mixtral checkpoint in the per-expert layout, written without building the model."""
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=experts,
    )
    folder.mkdir()
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=generator) * 0.02

    shards = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        if i % 2 == 0:
            shards.append({})
        layer = f"model.layers.{i}"
        shard = shards[-1]
        for name, shape in (("q", (hidden, hidden)), ("k", (hidden // 2, hidden)), ("v", (hidden // 2, hidden))):
            shard[f"{layer}.self_attn.{name}_proj.weight"] = rand(*shape)
        shard[f"{layer}.self_attn.o_proj.weight"] = rand(hidden, hidden)
        shard[f"{layer}.input_layernorm.weight"] = torch.ones(hidden)
        shard[f"{layer}.post_attention_layernorm.weight"] = torch.ones(hidden)
        shard[f"{layer}.block_sparse_moe.gate.weight"] = rand(experts, hidden)
        for e in range(experts):
            base = f"{layer}.block_sparse_moe.experts.{e}"
            shard[f"{base}.w1.weight"], shard[f"{base}.w3.weight"] = rand(ffn, hidden), rand(ffn, hidden)
            shard[f"{base}.w2.weight"] = rand(hidden, ffn)
    shards[-1].update({"model.norm.weight": torch.ones(hidden), "lm_head.weight": rand(vocab, hidden)})
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def test_streaming_conversion_peak_memory(tmp_path):
    """Folder conversion of a ~100 MB checkpoint (five input shards of <= 25 MB) stays well below one checkpoint's
    size in extra RSS: it holds one 10 MB output shard, one layer's fused experts and one open input shard, never the
    model."""
    checkpoint_bytes = write_big_mixtral(tmp_path / "mixtral")
    assert 90e6 < checkpoint_bytes < 110e6
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", STREAM_SCRIPT, str(tmp_path / "mixtral"), str(tmp_path / "sparse")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    extra = measured["peak"] - measured["baseline"]
    print(f"\nstreaming conversion: checkpoint {checkpoint_bytes / 1e6:.1f} MB, peak extra RSS {extra / 1e6:.1f} MB")
    # Measured 51-58 MB (0.53-0.60x) over repeated runs; a converter that materialised the model would need >= 1x.
    # The bound leaves room for allocator noise on a loaded machine (one CI-like run exceeded 0.75x once).
    assert extra < 0.95 * checkpoint_bytes, f"peak extra RSS {extra / 1e6:.1f} MB"
    written = sum(f.stat().st_size for f in (tmp_path / "sparse").glob("*.safetensors"))
    assert len(list((tmp_path / "sparse").glob("*.safetensors"))) >= 9
    assert abs(written - checkpoint_bytes) < 0.02 * checkpoint_bytes


def test_folder_conversion_reports_progress_per_shard(hf_models, tmp_path, capsys):
    src = tmp_path / "src"
    hf_models["mixtral"].save_pretrained(src, max_shard_size="40KB")
    dst = convert_folder(src, tmp_path / "sparse", max_shard_size="40KB")
    shards = sorted(dst.glob("model-*.safetensors"))
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.startswith("shard ")]
    assert len(shards) >= 2 and len(lines) == len(shards)  # one line per written shard
    assert lines[0].startswith("shard 1: ") and "GiB written" in lines[-1]
    assert "converting" in captured.err  # the progress bar over tensors


# ========================================================================================================= DeepSeek-V3
def test_deepseek_v3_moe_block_equals_sparse_moe_block():
    """Sigmoid scores, a non-zero selection-only correction bias, group-limited top-k, shared experts, scaling."""
    torch.manual_seed(0)
    hidden, experts, ffn, shared = 32, 16, 12, 2
    reference_config = DeepseekV3Config(
        hidden_size=hidden,
        moe_intermediate_size=ffn,
        n_routed_experts=experts,
        n_shared_experts=shared,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    reference_config._experts_implementation = "eager"
    reference = DeepseekV3MoE(reference_config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0.0, 0.3)
        reference.gate.e_score_correction_bias.normal_(0.0, 0.5)

    config = SparseMoEConfig(
        hidden_size=hidden,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=experts,
        num_experts_per_tok=4,
        moe_intermediate_size=ffn,
        num_shared_experts=shared,
        router_type="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
    )
    config._experts_implementation = "eager"
    ours = SparseMoEBlock(config).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing and not unexpected
    assert reference.gate.e_score_correction_bias.abs().min() > 0

    x = torch.randn(3, 9, hidden)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert (expected - got).abs().max().item() <= TOL
    # The bias and the group limit both matter on these weights: without them the output changes.
    with torch.no_grad():
        ours.gate.e_score_correction_bias.zero_()
        assert (expected - ours(x)).abs().max().item() > 1e-3


# ============================================================================================================ upcycle
@pytest.mark.parametrize("family", list(DENSE_CASES))
def test_upcycle_equals_dense_model_at_init(family, tmp_path):
    dense = build(DENSE_CASES, family)
    moe = upcycle(dense, num_experts=4, num_experts_per_tok=2)
    assert all(moe.config.is_moe_layer(i) for i in range(moe.config.num_hidden_layers))
    ids, mask = padded_batch(seed=2)
    assert max_delta(logits(dense, ids, mask), logits(moe, ids, mask), mask) <= TOL
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(experts[0], experts[-1])

    dense.save_pretrained(tmp_path / "dense")
    dst = upcycle_folder(tmp_path / "dense", tmp_path / "moe", 4, 2)
    assert_same_state(moe.state_dict(), SparseMoEForCausalLM.from_pretrained(dst).state_dict())
    assert_same_state(moe.state_dict(), upcycle(tmp_path / "dense", 4, 2).state_dict())


def test_upcycle_noise_and_overrides():
    dense = build(DENSE_CASES, "llama")
    moe = upcycle(dense, 4, 2, noise_std=0.01, moe_layer_freq=2, router_aux_loss_coef=0.02)
    assert [moe.config.is_moe_layer(i) for i in range(2)] == [False, True]
    assert torch.equal(moe.model.layers[0].mlp.gate_proj.weight, dense.model.layers[0].mlp.gate_proj.weight)
    experts = moe.model.layers[1].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])
    ids, mask = padded_batch(seed=3)
    delta = max_delta(logits(dense, ids, mask), logits(moe, ids, mask), mask)
    assert 0 < delta < 0.5


def test_upcycled_experts_diverge_with_training():
    """No noise: identical experts at init; 20 steps with the aux loss make them different from each other."""
    torch.manual_seed(0)
    moe = upcycle(build(DENSE_CASES, "qwen3"), 4, 2, router_aux_loss_coef=0.05).train()
    optimizer = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    for step in range(20):
        ids = torch.randint(3, VOCAB, (4, 8))
        loss = moe(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for layer in moe.model.layers:
        weights = layer.mlp.experts.gate_up_proj.detach()
        gaps = [(weights[a] - weights[b]).abs().max().item() for a in range(4) for b in range(a + 1, 4)]
        assert min(gaps) > 1e-3, gaps


# ===================================================================================================== unsupported
def sparse(**overrides):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
    )
    fields.update(overrides)
    return SparseMoEConfig(**fields)


@pytest.mark.parametrize(
    "family, overrides, expected",
    [
        (
            "mixtral",
            dict(router_type="sigmoid", num_shared_experts=1, qk_norm="head", first_k_dense_replace=1),
            ["router_type='sigmoid'", "num_shared_experts=1", "qk_norm='head'", "dense MLP layers [0]"],
        ),
        ("mixtral", dict(norm_topk_prob=False, attention_bias=True), ["norm_topk_prob=False", "attention_bias=True"]),
        ("qwen2_moe", dict(), ["num_shared_experts=0"]),
        ("qwen2_moe", dict(num_shared_experts=1, attention_bias=True), ["shared_expert_gate=False", "attention_out"]),
        ("qwen3_moe", dict(qk_norm="head", routed_scaling_factor=2.5), ["routed_scaling_factor=2.5"]),
        ("qwen3_moe", dict(), ["qk_norm='none'"]),
        ("qwen3_moe", dict(qk_norm="head", attention_bias=True, attention_out_bias=False), ["attention_bias=True"]),
        ("olmoe", dict(qk_norm="full", n_group=2, topk_group=1), ["n_group=2/topk_group=1"]),
        ("olmoe", dict(qk_norm="full", sliding_window=8, moe_layer_freq=2), ["sliding_window=8", "dense MLP"]),
        ("olmoe", dict(qk_norm="full", head_dim=16), ["head_dim=16"]),
    ],
)
def test_to_hf_lists_every_unsupported_feature(family, overrides, expected):
    with pytest.raises(ValueError) as error:
        hf_config_from_sparse(sparse(**overrides), family)
    for feature in expected:
        assert feature in str(error.value), (feature, str(error.value))


def test_to_hf_rejects_correction_bias_and_unknown_family():
    model = SparseMoEForCausalLM(sparse(qk_norm="head")).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[0] = 0.5
    with pytest.raises(ValueError, match=r"e_score_correction_bias non-zero in layers \[1\]"):
        to_hf(model, "qwen3_moe")
    with pytest.raises(ValueError, match="family must be one of"):
        to_hf(model, "deepseek_v3")


def test_to_hf_keeps_structure_and_drops_training_only_settings(monkeypatch):
    """Capacity, z-loss and bias updates only act in training: exported with a warning, not refused."""
    warnings = []
    monkeypatch.setattr(families.logger, "warning", warnings.append)
    config = sparse(qk_norm="head", capacity_factor=1.25, router_z_loss_coef=0.001, first_k_dense_replace=1)
    hf_config = hf_config_from_sparse(config, "qwen3_moe")
    assert hf_config.model_type == "qwen3_moe" and hf_config.mlp_only_layers == [0]
    assert len(warnings) == 1 and "capacity_factor=1.25" in warnings[0] and "router_z_loss_coef" in warnings[0]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: OlmoeForCausalLM(OlmoeConfig(**COMMON, num_hidden_layers=1, intermediate_size=16, num_experts=4,
                                              num_experts_per_tok=2, clip_qkv=8.0)), ["clip_qkv=8.0"]),
        (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, num_hidden_layers=4, intermediate_size=16,
                                                    moe_intermediate_size=8, shared_expert_intermediate_size=8,
                                                    num_experts=4, num_experts_per_tok=2, use_sliding_window=True,
                                                    sliding_window=4, max_window_layers=4)),
         ["sliding window on layers [0, 2] only"]),
        (lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_hidden_layers=1, intermediate_size=16)),
         ["'llama'", "upcycle"]),
    ],
)  # fmt: skip
def test_from_hf_lists_every_unsupported_feature(make, expected):
    with pytest.raises(ValueError) as error:
        from_hf(make())
    for feature in expected:
        assert feature in str(error.value), (feature, str(error.value))


@pytest.mark.parametrize(
    "make, kwargs, expected",
    [
        (lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_hidden_layers=1, intermediate_size=16, mlp_bias=True)),
         dict(hidden_size=64, num_shared_experts=1, not_a_field=1),
         ["mlp_bias=True", "hidden_size: copied", "num_shared_experts: upcycling", "not_a_field: not a"]),
        (lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, num_hidden_layers=2, intermediate_size=16,
                                              use_sliding_window=True, sliding_window=4, max_window_layers=1)),
         dict(), ["sliding window on layers [1] only"]),
        (lambda: build(MOE_CASES, "olmoe"), dict(), ["'olmoe'", "from_hf"]),
    ],
)  # fmt: skip
def test_upcycle_lists_every_unsupported_feature(make, kwargs, expected):
    with pytest.raises(ValueError) as error:
        upcycle(make(), 4, 2, **kwargs)
    for feature in expected:
        assert feature in str(error.value), (feature, str(error.value))


# ================================================================================================================ CLI
def test_cli_converts_both_ways_and_upcycles(hf_models, tmp_path):
    cli = load_cli()
    hf = hf_models["olmoe"]
    hf.save_pretrained(tmp_path / "olmoe")
    assert cli.main(["--from", "auto", str(tmp_path / "olmoe"), str(tmp_path / "sparse")]) == 0
    assert_same_state(from_hf(hf).state_dict(), SparseMoEForCausalLM.from_pretrained(tmp_path / "sparse").state_dict())
    assert cli.main(["--to", "olmoe", str(tmp_path / "sparse"), str(tmp_path / "back")]) == 0
    assert_same_state(hf.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict())

    build(DENSE_CASES, "mistral").save_pretrained(tmp_path / "mistral")
    argv = ["--upcycle", "--num-experts", "4", "--top-k", "1", str(tmp_path / "mistral"), str(tmp_path / "moe")]
    assert cli.main(argv) == 0
    assert SparseMoEForCausalLM.from_pretrained(tmp_path / "moe").config.num_experts_per_tok == 1


def test_cli_failure_message_and_no_partial_output(hf_models, tmp_path, capsys):
    cli = load_cli()
    hf_models["mixtral"].save_pretrained(tmp_path / "mixtral")
    # wrong direction: a Mixtral folder is not a SparseMoE folder
    assert cli.main(["--to", "qwen3_moe", str(tmp_path / "mixtral"), str(tmp_path / "out")]) == 1
    assert "expects a SparseMoE folder" in capsys.readouterr().err
    # declared family does not match
    assert cli.main(["--from", "olmoe", str(tmp_path / "mixtral"), str(tmp_path / "out")]) == 1
    assert "model_type='mixtral'" in capsys.readouterr().err
    # an existing DST is never touched without --overwrite
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert cli.main(["--from", "auto", str(tmp_path / "mixtral"), str(tmp_path / "taken")]) == 1
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixtral", "taken"]


def test_cli_failure_mid_stream_leaves_nothing(hf_models, tmp_path, capsys):
    """The last input shard is corrupt: the run fails after writing several output shards and leaves neither DST,
    nor its temporary folder, nor the parent folder it created."""
    src = tmp_path / "src"
    hf_models["qwen2_moe"].save_pretrained(src, max_shard_size="40KB")
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    last_shard = src / weight_map["lm_head.weight"]
    last_shard.write_bytes(last_shard.read_bytes()[:1000])
    out = tmp_path / "nested" / "out"
    argv = ["--from", "auto", "--max-shard-size", "20KB", str(src), str(out)]
    assert load_cli().main(argv) == 1
    assert "convert.py: error:" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "nested").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_out_of_vocab_pad_token_id_becomes_none():
    from transformers import MixtralConfig, MixtralForCausalLM

    from modeling_sparse_moe.interop.conversion import from_hf

    source = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=-1,
    ))
    assert from_hf(source).config.pad_token_id is None
