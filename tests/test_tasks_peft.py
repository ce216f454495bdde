"""LoRA helpers: which weights each --lora_target part adapts, merge equality, adapter size and reload, QLoRA checks."""

import pytest
import torch
from peft import PeftModel

from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.tasks.peft_utils import (
    adapter_report, apply_lora, check_qlora_available, load_adapted, lora_config, merge_max_abs_diff,
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


def test_recipe_qlora_adapter_reloads_onto_either_base(tmp_path):
    """`--load_in_4bit --lora_target attention,experts` (apply_lora) saves an adapter that `load_adapted` puts back on
    the 4-bit base it was trained on (identical logits) and on the full-precision base (where it merges exactly)."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    # widths divisible by bitsandbytes' block size (32 at the least)
    SparseMoEForCausalLM(tiny_config(hidden_size=64, moe_intermediate_size=32)).save_pretrained(tmp_path / "base")
    base = SparseMoEForCausalLM.from_pretrained(tmp_path / "base")
    args = LoraArguments(lora_r=4, lora_alpha=8, lora_target="attention,experts", load_in_4bit=True)
    model = apply_lora(base, args, task_type="CAUSAL_LM").eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # make the adapter matter
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    assert sum(".experts." in n and "lora_" in n for n, _ in model.named_parameters()) == 2 * 2 * 2
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = model(ids).logits
        on_4bit = load_adapted(tmp_path / "base", tmp_path / "adapter", load_in_4bit=True)
        # NOTE: the recipe packs after an fp32 load, the reload packs while loading: the same packing (same process)
        torch.testing.assert_close(on_4bit(ids).logits, trained, rtol=0, atol=0)
        on_full = load_adapted(tmp_path / "base", tmp_path / "adapter")
    from peft import get_peft_model_state_dict

    saved, loaded = get_peft_model_state_dict(model), get_peft_model_state_dict(on_full)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad(), on_full.disable_adapter():
        plain = on_full(ids).logits
    with torch.no_grad():
        assert (on_full(ids).logits - plain).abs().max() > 1e-2  # the adapter acts on the full-precision base
    assert merge_max_abs_diff(on_full, ids) < 1e-4  # fp32 merge of a rank-4 delta: rounding only
