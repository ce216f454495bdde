"""PEFT LoRA on attention and on the 3D expert weights (`target_parameters`)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_sparse_moe import SparseMoEForCausalLM

from conftest import tiny_config


def _lora_model(seed=0):
    torch.manual_seed(seed)
    base = SparseMoEForCausalLM(tiny_config()).eval()
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    return base, get_peft_model(base, cfg)


def test_lora_on_experts_trains_only_adapters_and_merges_exactly(tmp_path):
    base, model = _lora_model()
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if "lora" not in n}
    with torch.no_grad():
        before = model(ids).logits
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in trainable) and all("lora" in n for n in trainable)

    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-3
    # Base weights untouched; the expert LoRA really moves the experts' output.
    for n, p in base.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n

    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)  # same seed as _lora_model: the same base weights
    fresh = SparseMoEForCausalLM(tiny_config()).eval()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, after, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_expert_lora_reaches_every_experts_implementation(impl):
    base, model = _lora_model(seed=1)
    base.set_experts_implementation(impl)
    for name, p in model.named_parameters():
        if "experts" in name and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # make the expert delta non-zero
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_adapter = model(ids).logits
        with model.disable_adapter():
            without = model(ids).logits
    assert (with_adapter - without).abs().max() > 1e-3
