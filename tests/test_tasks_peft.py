"""LoRA helpers: which weights each --lora_target part adapts, merge equality, adapter size and reload, QLoRA checks."""

import pytest
import torch
from peft import PeftModel

from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.tasks.peft_utils import (
    adapter_report, apply_lora, check_qlora_available, lora_config, merge_max_abs_diff,
)
from modeling_sparse_moe.tasks.common import LoraArguments

from conftest import tiny_config


def _adapted(seed=0, target="attention,router,experts"):
    torch.manual_seed(seed)
    base = SparseMoEForCausalLM(tiny_config()).eval()
    model = apply_lora(base, LoraArguments(lora_r=4, lora_alpha=8, lora_target=target), task_type="CAUSAL_LM")
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op (B = 0); make the adapter matter
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    return model


def test_parts_name_the_moe_weights():
    cfg = lora_config(4, target="attention,router,experts")
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(cfg.target_parameters) == {"mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    dense = SparseMoEForCausalLM(tiny_config(mlp_only_layers=[0, 1]))
    cfg = lora_config(4, target="attention,router,experts,mlp", model=dense)
    assert not cfg.target_parameters and "gate_proj" in cfg.target_modules  # no router/experts in a dense model
    with pytest.raises(ValueError, match="names nothing"):
        lora_config(4, target="router,experts", model=dense)


def test_merge_equals_adapter_and_adapter_reloads_identically(tmp_path):
    model = _adapted()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("mlp.gate" in n for n in trainable) and any("experts" in n for n in trainable)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-2  # router + experts + attention deltas change the output
    assert merge_max_abs_diff(model, ids) < 1e-4

    model.save_pretrained(tmp_path / "adapter")
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    report = adapter_report(model, str(tmp_path / "adapter"), base_params)
    assert report["adapter_bytes"] < 0.5 * report["base_model_bytes_fp32"]
    assert report["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.manual_seed(0)
    fresh = SparseMoEForCausalLM(tiny_config()).eval()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)


def test_qlora_runs_on_cpu_and_refuses_full_fine_tuning():
    check_qlora_available(lora_r=8)  # bitsandbytes >= 0.48 quantizes on CPU: no refusal
    with pytest.raises(ValueError, match="--lora_r 8"):
        check_qlora_available(lora_r=0)
