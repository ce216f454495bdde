"""The memory planner (modeling_sparse_moe/compression/memory_planner.py) against real models: its fp32 / bf16 / int8 bytes equal
`get_memory_footprint()` of real small models, its NF4 layout bitsandbytes' real tensors, its LoRA count PEFT's
trainable parameters; Hub-style Mixtral config.json files plan like the real Mixtral; the shipped big configs have
their published sizes."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from transformers import MixtralConfig, MixtralForCausalLM

from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.int8_experts import quantize_experts_int8
from modeling_sparse_moe.compression.memory_planner import GIB, lora_parameter_count, meta_model, nf4_bytes, plan_memory

from conftest import tiny_config


VARIANTS = {
    "plain": {},
    "shared+qk_norm+dense_first": dict(num_shared_experts=1, shared_expert_intermediate_size=20, qk_norm="head",
                                        first_k_dense_replace=1),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_weight_bytes_equal_real_footprints(variant):
    config = tiny_config(**VARIANTS[variant])
    plan = plan_memory(config)
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(config)
    assert plan.num_parameters == sum(p.numel() for p in model.parameters())
    assert plan.weights["fp32"] == model.get_memory_footprint()
    model.to(torch.bfloat16)
    assert plan.weights["bf16"] == model.get_memory_footprint()
    quantize_experts_int8(model)
    assert plan.weights["int8"] == model.get_memory_footprint()
    assert plan.weights["nf4"] < plan.weights["nf4_experts"] < plan.weights["int8"] < plan.weights["bf16"]


def test_nf4_layout_equals_bitsandbytes_tensors():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(48, 64)
    for double_quant in (False, True):
        packed, state = functional.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
        )
        real = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            real += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the fp32 offset
        assert nf4_bytes(weight.numel(), double_quant) == real


def test_nf4_experts_are_at_most_0_3_of_bf16():
    plan = plan_memory("mixtral-8x7b")
    ratio = plan.parts["nf4"]["routed_experts"] / plan.parts["bf16"]["routed_experts"]
    assert 0.26 < ratio <= 0.30, ratio  # 4.5 bits per value: 0.28 of 16


def test_lora_count_equals_peft_trainable_parameters():
    peft = pytest.importorskip("peft")
    config = tiny_config(num_shared_experts=1, shared_expert_intermediate_size=20)
    model = SparseMoEForCausalLM(config)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    trainable = sum(p.numel() for p in peft.get_peft_model(model, lora).parameters() if p.requires_grad)
    assert lora_parameter_count(meta_model(config), 4, ("attention", "experts")) == trainable


def test_hub_mixtral_config_json_plans_like_the_real_mixtral(tmp_path):
    hf_config = MixtralConfig(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              max_position_embeddings=64)
    hf_config.save_pretrained(tmp_path)
    plan = plan_memory(str(tmp_path / "config.json"))
    real = MixtralForCausalLM(hf_config).to(torch.bfloat16)
    assert plan.num_parameters == sum(p.numel() for p in real.parameters())
    # our router also keeps two fp32 (E,) buffers per layer (selection bias, load counter)
    assert plan.weights["bf16"] == real.get_memory_footprint() + 2 * 2 * 4 * 4
    assert plan_memory(str(tmp_path)).weights == plan.weights  # the folder works as well


def test_shipped_big_configs_have_their_published_sizes():
    mixtral, olmoe, qwen = (plan_memory(name) for name in ("mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b"))
    assert round(mixtral.num_parameters / 1e9, 1) == 46.7
    assert round(olmoe.num_parameters / 1e9, 1) == 6.9
    assert round(qwen.num_parameters / 1e9, 1) == 30.5  # Qwen3-30B-A3B: 30.5 B total, 3.3 B active
    assert qwen.num_parameters == qwen.config.num_parameters()
    assert 3.3e9 <= qwen.config.num_active_parameters() < 3.4e9
    # Mixtral: bf16 weights do not fit an 80 GB GPU, NF4 ones fit 48 GB; its QLoRA run needs more than 24 GB
    assert not mixtral.fits(mixtral.weights["bf16"])[80] and mixtral.fits(mixtral.weights["nf4"])[48]
    assert mixtral.qlora.total > 24 * GIB
    # with bf16 experts (what bitsandbytes' quantizer alone leaves) the QLoRA run does not fit an 80 GB GPU
    assert mixtral.qlora_float_experts_total > 80 * GIB
    assert olmoe.fits(olmoe.qlora.total)[24]


def test_cli_prints_tables_and_refuses_unknown_configs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "plan_memory_script", Path(__file__).resolve().parents[1] / "scripts" / "plan_memory.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["tiny", "--json", str(tmp_path / "p.json")]) == 0
    assert "| nf4 |" in capsys.readouterr().out and (tmp_path / "p.json").is_file()
    assert script.main(["no-such-config"]) == 1
    assert capsys.readouterr().err.startswith("error: 'no-such-config' is neither")


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_experts_equal_the_4bit_experts_footprint(double_quant):
    """The "nf4_experts" layout is the footprint of `quantization.quantize_experts` (4-bit routed experts, the rest
    bf16), byte for byte (that module lands with the 4-bit work; skipped where it is absent)."""
    quantization = pytest.importorskip("modeling_sparse_moe.quantization")
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = tiny_config(hidden_size=64, moe_intermediate_size=64)
    plan = plan_memory(config, double_quant=double_quant)
    model = SparseMoEForCausalLM(copy.deepcopy(config)).to(torch.bfloat16)
    quantization.quantize_experts(model, BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant
    ))
    assert plan.weights["nf4_experts"] == model.get_memory_footprint()


def test_pruned_rows_equal_real_pruned_models():
    """The rows for pruned configs equal `get_memory_footprint()` of a model pruned with prune_experts (fp32, and
    int8 after quantize_experts_int8), and the routed experts shrink by exactly kept / num_experts (the rest of the
    difference is the router's rows)."""
    from modeling_sparse_moe.compression.pruning import prune_experts

    config = tiny_config(num_experts=8)
    plan = plan_memory(config, pruned_experts=(6, 4))
    for kept in (6, 4):
        torch.manual_seed(0)
        model = prune_experts(SparseMoEForCausalLM(copy.deepcopy(config)), kept, "random")
        assert plan.pruned[kept]["fp32"] == model.get_memory_footprint()
        quantize_experts_int8(model.to(torch.bfloat16))
        assert plan.pruned[kept]["int8"] == model.get_memory_footprint()
        routed = plan.parts["bf16"]["routed_experts"]
        assert plan.pruned_experts_bytes[kept]["bf16"] == routed * kept // 8
    assert "| nf4, pruned to 4 experts |" in plan.table()
    with pytest.raises(ValueError, match="pruned_experts: 1 must be from num_experts_per_tok=2"):
        plan_memory(config, pruned_experts=(1,))
