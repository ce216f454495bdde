"""Training: Trainer makes the loss fall on real text; gradient checkpointing changes nothing."""

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.recipes.data import lm_blocks, load_text_corpus, train_tokenizer

from conftest import tiny_config


@pytest.fixture(scope="module")
def text_blocks():
    texts = load_text_corpus(max_chars=30_000)
    tokenizer = train_tokenizer(texts, vocab_size=300)
    blocks = lm_blocks(tokenizer, texts, block_size=32)
    return tokenizer, blocks


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = torch.tensor(self.blocks[i])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def test_trainer_30_steps_make_the_loss_fall(tmp_path, text_blocks):
    tokenizer, blocks = text_blocks
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, moe_intermediate_size=64,
                         initializer_range=0.02, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    model = SparseMoEForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=5, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print("losses", losses)
    assert len(losses) == 6
    assert losses[0] > math.log(len(tokenizer)) - 0.5  # starts near uniform
    assert losses[-1] < losses[0] - 1.0, losses  # and falls clearly


@pytest.mark.parametrize("overrides", [{}, dict(capacity_factor=1.0, router_z_loss_coef=0.01)])
def test_gradient_checkpointing_gives_the_same_gradients(overrides):
    torch.manual_seed(0)
    config = tiny_config(router_aux_loss_coef=0.1, **overrides)
    model = SparseMoEForCausalLM(config).train()
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, ckpt = grads()
    torch.testing.assert_close(loss_plain, loss_ckpt)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5, msg=name)


def test_label_smoothing_shifts_labels_and_keeps_the_router_losses(tmp_path):
    """`--label_smoothing_factor` through `CausalLMTrainer` equals LabelSmoother's formula on shifted labels plus the
    router losses; plain Trainer (the control) scores unshifted labels and drops the router losses."""
    from transformers.trainer_pt_utils import LabelSmoother

    from modeling_sparse_moe.recipes.training import CausalLMTrainer

    torch.manual_seed(0)
    config = tiny_config(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    model = SparseMoEForCausalLM(config).train()
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt, as the task recipes make
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    with torch.no_grad():
        out = model(**inputs)
        reference = LabelSmoother(epsilon=0.1)(out, labels, shift_labels=True)
        router = 0.1 * out.aux_loss + 0.01 * out.z_loss
        ours = CausalLMTrainer(model=model, args=args).compute_loss(model, dict(inputs))
        plain = Trainer(model=model, args=args).compute_loss(model, dict(inputs))
    assert out.aux_loss > 0 and out.z_loss > 0
    # same fp32 values summed in a different order (log-softmax once vs twice): a few ulps of a loss near 4.6
    torch.testing.assert_close(ours, reference + router, rtol=0, atol=1e-5)
    # Trainer alone scores each position against its own token (unshifted) and leaves the router losses out
    torch.testing.assert_close(plain, LabelSmoother(epsilon=0.1)(out, labels), rtol=0, atol=1e-5)
    assert abs(plain.item() - (reference + router).item()) > 0.01
    # without smoothing our trainer is Trainer: the model's own loss (a second forward of the same weights: its BLAS
    # kernels may differ by memory alignment, so last-bit fp32 differences are allowed)
    args_plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with torch.no_grad():
        plain_loss = CausalLMTrainer(model=model, args=args_plain).compute_loss(model, dict(inputs))
    torch.testing.assert_close(plain_loss, out.loss, rtol=0, atol=1e-5)


def test_bias_updates_leave_the_frozen_base_of_an_adapter_alone(tmp_path):
    """Aux-loss-free bias updates move the router bias of a full model, but not of a PEFT model: the bias belongs to
    the frozen base, so base + adapter routes as the model did in training (reload, merge, export)."""
    from peft import LoraConfig, get_peft_model

    from modeling_sparse_moe.recipes.training import RouterBiasUpdateCallback

    torch.manual_seed(0)
    ids = torch.randint(3, 97, (16, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True)

    def biases(model):
        return torch.cat([b.detach().clone().flatten() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")])

    full = SparseMoEForCausalLM(tiny_config(router_type="sigmoid", router_bias_update_rate=0.01))
    before = biases(full)
    Trainer(model=full, args=args, train_dataset=data, callbacks=[RouterBiasUpdateCallback()]).train()
    assert not torch.equal(biases(full), before)  # the full model's biases moved

    base = SparseMoEForCausalLM(tiny_config(router_type="sigmoid", router_bias_update_rate=0.01))
    before = biases(base)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    Trainer(model=adapted, args=args, train_dataset=data, callbacks=[RouterBiasUpdateCallback()]).train()
    assert torch.equal(biases(adapted), before)  # bitwise: nothing wrote to the buffer
