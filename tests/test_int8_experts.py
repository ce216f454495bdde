"""int8 experts (modeling_sparse_moe/int8_experts.py): the int8 path against the eager reference run on the
dequantized weights (fp32 tolerance: the same weights, the scale applied after the product), in every path (decode
plan, grouped plan, compiled gathered decode, compiled custom op), with idle experts, dropped assignments and top-k 2;
the whole model against fp32 within the error int8 rounding allows; generate; bad inputs. Timings and perplexity
live in scripts/bench_int8.py."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from transformers import AutoModelForCausalLM

from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM
from modeling_sparse_moe.int8_experts import (
    Int8Experts,
    Int8Linear,
    dequantize_per_channel,
    quantize_experts_int8,
    quantize_per_channel,
)
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEExperts

from conftest import tiny_config


HIDDEN, FFN, NUM_EXPERTS, TOP_K = 16, 12, 6, 2
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_experts(hidden_act="silu"):
    config = SparseMoEConfig(
        hidden_size=HIDDEN, moe_intermediate_size=FFN, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
        num_attention_heads=2, num_key_value_heads=1, hidden_act=hidden_act,
    )
    experts = SparseMoEExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.5)
        experts.down_proj.normal_(0, 0.5)
    return experts, Int8Experts.from_experts(experts, hidden_act).eval()


def dequantized_reference(int8: Int8Experts, hidden_act="silu") -> SparseMoEExperts:
    """The eager reference loop holding the weights the int8 module stands for."""
    reference, _ = make_experts(hidden_act)
    gate_up, down = int8.dequantized()
    with torch.no_grad():
        reference.gate_up_proj.copy_(gate_up)
        reference.down_proj.copy_(down)
    reference.config._experts_implementation = "eager"
    return reference


def routing(num_tokens, idle=(2,), drop=True, seed=0):
    """Distinct experts per token from the non-idle ones; with `drop`, one assignment is dropped (index E, weight 0)."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(NUM_EXPERTS) if e not in idle])
    index = torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:TOP_K]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, TOP_K, generator=generator) + 0.1
    if drop and num_tokens > 1:
        index[1, 0], weights[1, 0] = NUM_EXPERTS, 0.0
    return index, weights


def test_per_channel_rounding_is_within_half_a_step():
    w = torch.randn(3, 10, 7) * torch.logspace(-3, 1, 10).view(1, 10, 1)  # channels of very different ranges
    w[0, 0] = 0.0  # an all-zero channel
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (3, 10) and scale.dtype == torch.float32
    assert q.abs().max() == 127
    error = (dequantize_per_channel(q, scale) - w).abs()
    assert bool((error <= scale.unsqueeze(-1) / 2 * (1 + 1e-6)).all())
    assert bool((dequantize_per_channel(q, scale)[0, 0] == 0).all())


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 17])  # decode plan, host plan with a drop, sorted plans
@pytest.mark.parametrize("hidden_act", ["silu", "gelu"])
def test_int8_path_equals_dequantized_reference(num_tokens, hidden_act):
    _, int8 = make_experts(hidden_act)
    reference = dequantized_reference(int8, hidden_act)
    index, weights = routing(num_tokens, drop=num_tokens != 1)
    x = torch.randn(num_tokens, HIDDEN)
    with torch.no_grad():
        out = int8(x, index, weights)
        expected = reference(x, index, weights)
    torch.testing.assert_close(out, expected, **FP32)
    assert not bool((out == 0).all(dim=-1).any())


def test_int8_experts_read_only_busy_experts(monkeypatch):
    """Only experts with rows are widened: the int8 -> float conversion runs on busy experts' weights alone."""
    _, int8 = make_experts()
    index, weights = routing(9, idle=(0, 2, 5), drop=False)
    widened = []
    from modeling_sparse_moe import int8_experts as module

    real = module._int8_linear
    monkeypatch.setattr(module, "_int8_linear", lambda x, q, s: widened.append(q.data_ptr()) or real(x, q, s))
    with torch.no_grad():
        int8(torch.randn(9, HIDDEN), index, weights)
    busy = {int8.gate_up_proj[e].data_ptr() for e in (1, 3, 4)} | {int8.down_proj[e].data_ptr() for e in (1, 3, 4)}
    assert set(widened) == busy


@pytest.mark.parametrize("num_tokens", [1, 3])  # 1 x 2 <= 6 experts: gathered; 3 x 2 = 6: gathered with a drop
def test_compiled_decode_equals_eager(num_tokens):
    _, int8 = make_experts()
    index, weights = routing(num_tokens)
    x = torch.randn(num_tokens, HIDDEN)
    with torch.no_grad():
        eager = int8(x, index, weights)
        compiled = torch.compile(int8, fullgraph=True, dynamic=False)(x, index, weights)
        code = torch._dynamo.explain(int8)(x, index, weights).graphs[0].code
    assert "sparse_moe." not in code, code  # the fused gathered path, no custom op
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_prefill_runs_the_custom_op():
    _, int8 = make_experts()
    index, weights = routing(7)
    x = torch.randn(7, HIDDEN)
    with torch.no_grad():
        eager = int8(x, index, weights)
        compiled = torch.compile(int8, fullgraph=True, dynamic=False)(x, index, weights)
        code = torch._dynamo.explain(int8)(x, index, weights).graphs[0].code
    assert "sparse_moe.int8_experts" in code
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(
        torch.ops.sparse_moe.int8_experts.default,
        (x, index, weights, int8.gate_up_proj, int8.gate_up_proj_scale, int8.down_proj, int8.down_proj_scale, "silu"),
    )


def test_int8_linear_eager_and_compiled_equal_dequantized_linear():
    linear = torch.nn.Linear(16, 10, bias=True)
    int8 = Int8Linear.from_linear(linear).eval()
    reference = torch.nn.Linear(16, 10, bias=True)
    with torch.no_grad():
        reference.weight.copy_(dequantize_per_channel(int8.weight, int8.weight_scale))
        reference.bias.copy_(linear.bias)
        for x in (torch.randn(1, 1, 16), torch.randn(2, 5, 16)):  # decode (fused reduction when compiled), prefill
            expected = reference(x)
            torch.testing.assert_close(int8(x), expected, **FP32)
            torch.testing.assert_close(torch.compile(int8, fullgraph=True, dynamic=False)(x), expected, **FP32)


def _int8_relative_tolerance(model: SparseMoEForCausalLM, sequential_products: int) -> float:
    """Relative error that int8 rounding allows the logits: each weight moves by at most scale/2 (uniform, variance
    scale^2/12), so a product's output moves by about scale / (sqrt(12) * rms(w)) relative to itself; that ratio,
    taken at its worst channel, times the number of quantized products on a token's path, times 3 for slack."""
    worst = 0.0
    for module in model.modules():
        if isinstance(module, Int8Experts):
            pairs = ((module.gate_up_proj, module.gate_up_proj_scale), (module.down_proj, module.down_proj_scale))
            for q, scale in pairs:
                rms = dequantize_per_channel(q, scale).pow(2).mean(dim=-1).sqrt()
                worst = max(worst, (scale / (math.sqrt(12) * rms)).max().item())
    return 3 * sequential_products * worst


def test_model_close_to_fp32_and_smaller():
    config = tiny_config(num_shared_experts=1, shared_expert_intermediate_size=20)
    model = SparseMoEForCausalLM(config).eval()
    fp32_bytes = model.get_memory_footprint()
    int8 = quantize_experts_int8(copy.deepcopy(model))
    assert all(isinstance(layer.mlp.experts, Int8Experts) for layer in int8.model.layers)
    assert all(isinstance(layer.mlp.shared_experts.down_proj, Int8Linear) for layer in int8.model.layers)
    assert isinstance(int8.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # attention untouched by default
    E, D, F_, S = config.num_experts, config.hidden_size, config.moe_intermediate_size, 20
    L = config.num_hidden_layers
    int8_saved = L * ((3 * E * D * F_ + 3 * D * S) * 3 - 4 * (E * (2 * F_ + D) + 2 * S + D))
    assert fp32_bytes - int8.get_memory_footprint() == int8_saved  # 3 of every 4 bytes, minus the fp32 scales
    ids = torch.randint(3, config.vocab_size, (2, 12))
    with torch.no_grad():
        expected, actual = model(ids).logits, int8(ids).logits
    relative = ((actual - expected).norm() / expected.norm()).item()
    assert 0 < relative <= _int8_relative_tolerance(int8, 3 * L), relative  # routed + shared products per layer
    everything = quantize_experts_int8(copy.deepcopy(model), linears=True, lm_head=True)
    assert isinstance(everything.model.layers[0].self_attn.o_proj, Int8Linear)
    assert isinstance(everything.lm_head, Int8Linear)
    with torch.no_grad():
        relative_all = ((everything(ids).logits - expected).norm() / expected.norm()).item()
    assert 0 < relative_all < 0.05


def test_scales_stay_fp32_when_the_model_is_cast():
    model = quantize_experts_int8(SparseMoEForCausalLM(tiny_config()).eval(), linears=True)
    model.to(torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.int8 and experts.gate_up_proj_scale.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.randint(3, 97, (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_generate_matches_the_dequantized_model():
    """Greedy generate with int8 experts gives the tokens of the fp32 model holding the dequantized weights."""
    model = SparseMoEForCausalLM(tiny_config()).eval()
    int8 = quantize_experts_int8(copy.deepcopy(model))
    dequantized = copy.deepcopy(model)
    with torch.no_grad():
        for source, target in zip(int8.model.layers, dequantized.model.layers):
            gate_up, down = source.mlp.experts.dequantized()
            target.mlp.experts.gate_up_proj.copy_(gate_up)
            target.mlp.experts.down_proj.copy_(down)
    ids = torch.randint(3, 97, (2, 6))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = int8.generate(ids, **kwargs)
        assert out.shape == (2, 14)
        assert torch.equal(out, dequantized.generate(ids, **kwargs))


def test_training_is_refused_with_a_pointer_to_qlora():
    model = quantize_experts_int8(SparseMoEForCausalLM(tiny_config()))
    model.train()
    ids = torch.randint(3, 97, (1, 6))
    with pytest.raises(ValueError, match="QLoRA"):
        model(ids, labels=ids)  # embeddings require grad: the experts see grad-requiring inputs in train mode
    model.eval()
    experts = model.model.layers[0].mlp.experts
    experts.down_proj_scale.requires_grad_(True)
    with pytest.raises(ValueError, match="inference only"):
        model(ids)
    experts.down_proj_scale.requires_grad_(False)
    with torch.no_grad():
        model.train()(ids)  # train mode without gradients (e.g. generate left in train mode) is fine


def test_quantizing_twice_or_a_model_without_experts_is_refused():
    model = quantize_experts_int8(SparseMoEForCausalLM(tiny_config()))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts_int8(model)
    with pytest.raises(ValueError, match="no MoE blocks"):
        quantize_experts_int8(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------- save and reload
def _int8_model(**quantize):
    torch.manual_seed(0)
    config = tiny_config(num_shared_experts=1, shared_expert_intermediate_size=20)
    return quantize_experts_int8(SparseMoEForCausalLM(config).eval(), **quantize)


@pytest.mark.parametrize("quantize", [dict(), dict(linears=True, lm_head=True)])
def test_int8_model_saves_and_reloads_with_equal_logits(tmp_path, quantize):
    model = _int8_model(**quantize)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["int8_quantization"]
    assert saved["format"] == "int8_per_channel" and "model.layers.0.mlp.experts" in saved["modules"]
    assert ("lm_head" in saved["modules"]) == bool(quantize)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    int8_names = {n for n, m in reloaded.named_modules() if isinstance(m, (Int8Experts, Int8Linear))}
    assert int8_names == set(saved["modules"])
    for name, tensor in model.state_dict().items():  # the stored int8 codes and fp32 scales come back exactly
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        # the same int8 codes and scales; fp32 tolerance only because a reloaded tensor may sit at another alignment
        # (BLAS kernels may differ in the last bits, see conftest.misalign_)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert reloaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False).tolist() == model.generate(
            ids[:1, :4], max_new_tokens=5, do_sample=False).tolist()


def test_int8_folder_with_a_4bit_config_is_one_clear_error(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    _int8_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="int8 model .* cannot be loaded with a 4-bit quantization_config"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (~10 s)
def test_int8_hub_folder_loads_through_its_remote_code(tmp_path):
    from modeling_sparse_moe.interop.hub import save_for_hub

    model = _int8_model(linears=True, lm_head=True)
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    save_for_hub(model, tmp_path / "hub")
    assert (tmp_path / "hub" / "int8_experts.py").is_file()
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hub')!r}, trust_remote_code=True).eval()\n"
        "assert 'modeling_sparse_moe' not in sys.modules and type(model).__module__.startswith('transformers_modules')\n"
        f"saved = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad(): out = model(saved['ids']).logits\n"
        "torch.testing.assert_close(out, saved['logits'], rtol=1e-5, atol=1e-5)\n"
        "print(type(model.lm_head).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("Int8Linear")
