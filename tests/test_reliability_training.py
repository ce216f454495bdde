"""Reliability of training: exact Trainer resume, saves interrupted mid-write, bf16 stability, z-loss effect.

The bf16 runs are a 30-step smoke in the default suite; `test_bf16_training_few_hundred_steps` (marked slow) runs
300 steps per mode and prints the figures reported in README "Reliability":

    python -m pytest -q -s -m slow tests/test_reliability_training.py
"""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import transformers.modeling_utils
from modeling_sparse_moe import SparseMoEForCausalLM, update_router_biases
from modeling_sparse_moe.modeling_sparse_moe import SparseMoERouter
from modeling_sparse_moe.recipes.training import atomic_save_pretrained, is_complete_checkpoint, last_complete_checkpoint

from conftest import tiny_config


# ------------------------------------------------------------------------------------------------------------ helpers
class _Rows(torch.utils.data.Dataset):
    """Fixed token rows with some right padding (labels -100 and mask 0 there). `learnable`: each row counts up from
    a random start with a random stride in {1, 2, 3} (mod the vocabulary), so the loss can fall well below log(V)."""

    def __init__(self, n=24, seq=16, vocab=97, seed=0, learnable=False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)
        if learnable:
            start = torch.randint(0, vocab - 3, (n, 1), generator=g)
            stride = torch.randint(1, 4, (n, 1), generator=g)
            self.ids = (start + stride * torch.arange(seq)) % (vocab - 3) + 3
        self.mask = torch.ones_like(self.ids)
        for i in range(0, n, 3):
            self.mask[i, seq - 1 - i % 5 :] = 0
        self.ids[self.mask == 0] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


class _BiasUpdateCallback(TrainerCallback):
    """DeepSeek-V3 aux-loss-free balancing after every optimizer step; keeps a copy of the biases per step."""

    def __init__(self):
        self.biases = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        assert update_router_biases(model) > 0
        self.biases[state.global_step] = _biases(model)


class _RecordingTrainer(Trainer):
    """Records every micro-batch loss at full precision (the logged `loss` is averaged and rounded)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses, self.batches = [], []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        self.losses.append((self.state.global_step, loss.item()))
        self.batches.append(inputs["input_ids"].clone())
        return result


def _biases(model):
    return {n: m.e_score_correction_bias.clone() for n, m in model.named_modules() if isinstance(m, SparseMoERouter)}


# Bias balancing, capacity dropping, jitter and attention dropout: state in buffers and RNG that resume must restore.
RESUME_CONFIG = dict(
    num_experts=8, router_type="sigmoid", n_group=2, topk_group=1, router_bias_update_rate=0.01,
    router_aux_loss_coef=0.0, router_z_loss_coef=1e-3, capacity_factor=1.0, router_jitter_noise=0.1,
    attention_dropout=0.1,
)


def _trainer(output_dir, seed, max_steps, save_steps, callbacks=(), save_total_limit=None):
    torch.manual_seed(seed)  # a different init than the run that wrote the checkpoint: all must come from it
    model = SparseMoEForCausalLM(tiny_config(**RESUME_CONFIG))
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, logging_steps=1,
        save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit, report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = _RecordingTrainer(model=model, args=args, train_dataset=_Rows(), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    return trainer


# ------------------------------------------------------------------------------------------------------------- resume
def test_trainer_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """9 optimizer steps of 2 micro-batches over 24 rows (3 steps per epoch): the resumed run starts mid-epoch 2 and
    crosses an epoch boundary. Losses, weights and router biases must be bit-identical on CPU."""
    full_callback = _BiasUpdateCallback()
    full = _trainer(tmp_path / "full", seed=0, max_steps=9, save_steps=4, callbacks=[full_callback])
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert is_complete_checkpoint(checkpoint)

    # The router bias buffers are in the checkpoint, equal to the live ones after step 4, and non-trivial.
    saved = load_file(checkpoint / "model.safetensors")
    saved_biases = {k.removesuffix(".e_score_correction_bias"): v for k, v in saved.items()
                    if k.endswith("e_score_correction_bias")}
    assert len(saved_biases) == 2
    for name, bias in full_callback.biases[4].items():
        assert torch.equal(saved_biases[name], bias) and bias.abs().sum() > 0

    resumed_callback = _BiasUpdateCallback()
    resumed = _trainer(tmp_path / "resumed", seed=123, max_steps=9, save_steps=4, callbacks=[resumed_callback])
    resumed.train(resume_from_checkpoint=str(checkpoint))

    after = [loss for step, loss in full.losses if step >= 4]
    assert len(after) == 10 and len(resumed.losses) == 10  # 5 steps x 2 micro-batches
    assert [loss for _, loss in resumed.losses] == after  # exact, not approximate
    assert all(torch.equal(a, b) for a, b in zip(resumed.batches, full.batches[8:]))  # same data order
    for step in range(5, 10):
        for name, bias in full_callback.biases[step].items():
            assert torch.equal(resumed_callback.biases[step][name], bias), (step, name)
    for (name, p_full), (_, p_resumed) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p_full, p_resumed), name
    logged = lambda t: [(h["step"], h["loss"]) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert logged(resumed) == logged(full) and len(logged(full)) == 9  # steps 1-4 come from the checkpoint


# -------------------------------------------------------------------------------------------------- interrupted saves
def _crash_on_nth_write(monkeypatch, n):
    """Make transformers' safetensors writer write half of the file, then raise, on its n-th call."""
    real = transformers.modeling_utils.safe_save_file
    calls = {"n": 0}

    def flaky(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == n:
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as handle:
                handle.truncate(os.path.getsize(filename) // 2)
            raise OSError(28, "No space left on device (simulated)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", flaky)


def test_trainer_crash_mid_save_never_leaves_a_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    """What transformers 5.24 guarantees: trainer_state.json is written last and older checkpoints are rotated only
    after a save finishes. So a crash while writing checkpoint-4's weights leaves checkpoint-4 without
    trainer_state.json and keeps checkpoint-2 (despite save_total_limit=1). What it does not: get_last_checkpoint
    (resume_from_checkpoint=True) still picks checkpoint-4, and fails there; last_complete_checkpoint picks 2."""
    _crash_on_nth_write(monkeypatch, n=2)
    trainer = _trainer(tmp_path, seed=0, max_steps=6, save_steps=2, save_total_limit=1)
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    monkeypatch.undo()

    broken, good = tmp_path / "checkpoint-4", tmp_path / "checkpoint-2"
    assert broken.is_dir() and good.is_dir()
    assert not (broken / "trainer_state.json").exists()
    assert not is_complete_checkpoint(broken)
    assert (good / "trainer_state.json").exists() and (good / "optimizer.pt").exists()
    assert is_complete_checkpoint(good) and json.loads((good / "trainer_state.json").read_text())["global_step"] == 2

    assert get_last_checkpoint(str(tmp_path)) == str(broken)
    with pytest.raises(Exception, match="incomplete metadata, file not fully covered"):
        _trainer(tmp_path / "retry", seed=0, max_steps=6, save_steps=2).train(resume_from_checkpoint=str(broken))
    assert last_complete_checkpoint(tmp_path) == str(good)
    # A later folder with trainer_state.json but truncated weights is not complete either.
    shutil.copytree(good, tmp_path / "checkpoint-6")
    state = json.loads((good / "trainer_state.json").read_text())
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 6}))
    assert is_complete_checkpoint(tmp_path / "checkpoint-6")
    weights = tmp_path / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert not is_complete_checkpoint(tmp_path / "checkpoint-6")
    assert last_complete_checkpoint(tmp_path) == str(good)
    shutil.rmtree(tmp_path / "checkpoint-6")
    resumed = _trainer(tmp_path / "retry", seed=7, max_steps=6, save_steps=10)
    resumed.train(resume_from_checkpoint=last_complete_checkpoint(tmp_path))
    assert resumed.state.global_step == 6 and all(math.isfinite(loss) for _, loss in resumed.losses)


def test_save_pretrained_overwrite_crash_loses_the_old_save_but_atomic_save_does_not(tmp_path, monkeypatch):
    torch.manual_seed(0)
    old_model = SparseMoEForCausalLM(tiny_config())
    new_model = SparseMoEForCausalLM(tiny_config(num_shared_experts=1))

    plain = tmp_path / "plain"
    old_model.save_pretrained(plain)
    _crash_on_nth_write(monkeypatch, n=1)
    with pytest.raises(OSError, match="simulated"):
        new_model.save_pretrained(plain)
    monkeypatch.undo()
    with pytest.raises(Exception):  # noqa: B017  (the in-place save destroyed the previous model)
        SparseMoEForCausalLM.from_pretrained(plain)

    atomic = tmp_path / "atomic"
    atomic_save_pretrained(old_model, atomic)
    before = {p.name: p.read_bytes() for p in atomic.iterdir()}
    _crash_on_nth_write(monkeypatch, n=1)
    with pytest.raises(OSError, match="simulated"):
        atomic_save_pretrained(new_model, atomic)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in atomic.iterdir()} == before  # byte-identical
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic", "plain"]  # no temporary folder left behind

    atomic_save_pretrained(new_model, atomic)  # a successful overwrite swaps the new model in
    reloaded = SparseMoEForCausalLM.from_pretrained(atomic)
    assert reloaded.config.num_shared_experts == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic", "plain"]
    for (name, a), (_, b) in zip(new_model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


# -------------------------------------------------------------------------------------------------------------- bf16
def _bf16_run(mode, steps, z_loss_coef=1e-3, seed=0, lr=3e-3):
    """Train the tiny config on a fixed batch stream. mode: "autocast" (fp32 weights, bf16 compute) or "bf16"
    (bf16 weights and optimizer state). Returns per-step figures and router-logit statistics."""
    torch.manual_seed(seed)
    config = tiny_config(router_z_loss_coef=z_loss_coef, router_aux_loss_coef=0.01, capacity_factor=1.25,
                         router_jitter_noise=0.01, initializer_range=0.02)
    model = SparseMoEForCausalLM(config).train()
    if mode == "bf16":
        model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = _Rows(n=256, seq=32, seed=seed, learnable=True)
    g = torch.Generator().manual_seed(seed)
    losses, logit_dtypes, nonfinite = [], set(), 0
    for _ in range(steps):
        batch = [data[i] for i in torch.randint(0, len(data), (8,), generator=g).tolist()]
        inputs = {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = model(**inputs, output_router_logits=True)
        logit_dtypes |= {logits.dtype for logits in out.router_logits}
        out.loss.backward()
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        nonfinite += (not torch.isfinite(out.loss)) or (not grads_finite)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    params_finite = all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ids = data.ids[:16]
        router_logits = torch.cat(model(ids, attention_mask=data.mask[:16], output_router_logits=True).router_logits)
    return dict(
        losses=losses, logit_dtypes=logit_dtypes, nonfinite_steps=nonfinite, params_finite=params_finite,
        mean_abs_logit=router_logits.abs().mean().item(),
        mean_spread=(router_logits - router_logits.mean(-1, keepdim=True)).abs().mean().item(),  # shift-invariant
        mean_lse_sq=torch.logsumexp(router_logits.float(), -1).pow(2).mean().item(),
        bias_dtypes={m.e_score_correction_bias.dtype for m in model.modules() if isinstance(m, SparseMoERouter)},
    )


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_bf16_training_smoke_has_no_nan_and_routes_in_fp32(mode):
    run = _bf16_run(mode, steps=30)
    print(mode, "first/last loss", run["losses"][0], run["losses"][-1])
    assert run["nonfinite_steps"] == 0 and run["params_finite"]
    assert run["logit_dtypes"] == {torch.float32}  # fix: autocast used to give bf16 router logits
    assert run["bias_dtypes"] == {torch.float32}  # fix: model.to(bf16) used to cast the correction bias
    assert sum(run["losses"][-5:]) / 5 < run["losses"][0] - 0.3  # and it learns


def test_bf16_bias_updates_are_not_lost_to_rounding():
    """In a bf16 buffer, 0.5 + 1e-3 rounds back to 0.5: balancing would silently stop. The buffer stays fp32."""
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(tiny_config(router_type="sigmoid", router_bias_update_rate=1e-3)).to(torch.bfloat16)
    model.train()
    routers = [m for m in model.modules() if isinstance(m, SparseMoERouter)]
    for router in routers:
        router.e_score_correction_bias.fill_(0.5)
    model(torch.randint(3, 97, (4, 16)))
    loads = [router.expert_load.clone() for router in routers]
    update_router_biases(model)
    for router, load in zip(routers, loads):
        expected = 0.5 + 1e-3 * torch.sign(load.mean() - load)
        torch.testing.assert_close(router.e_score_correction_bias, expected)
        assert (router.e_score_correction_bias != 0.5).any()
    model.float()  # and a round trip through other dtypes keeps the exact values
    torch.testing.assert_close(routers[0].e_score_correction_bias, 0.5 + 1e-3 * torch.sign(loads[0].mean() - loads[0]))


def _z_loss_figures(mode, steps, lr):
    without = _bf16_run(mode, steps=steps, z_loss_coef=0.0, lr=lr)
    with_z = _bf16_run(mode, steps=steps, z_loss_coef=1e-2, lr=lr)
    print(f"{mode}, {steps} steps, lr {lr}: z-loss 0 vs 1e-2: mean logsumexp^2 {without['mean_lse_sq']:.3f} vs "
          f"{with_z['mean_lse_sq']:.3f}; mean |logit| {without['mean_abs_logit']:.3f} vs "
          f"{with_z['mean_abs_logit']:.3f}; "
          f"mean |logit - token mean| {without['mean_spread']:.3f} vs {with_z['mean_spread']:.3f}; final loss "
          f"{sum(without['losses'][-10:]) / 10:.3f} vs {sum(with_z['losses'][-10:]) / 10:.3f}")
    return without, with_z


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_z_loss_shrinks_the_router_logsumexp(mode):
    """The z-loss penalises logsumexp(logits)^2, which it can lower by shifting every logit down: what shrinks is
    logsumexp (it moves toward 0), not necessarily mean |logit| (README "Reliability" has the figures)."""
    without, with_z = _z_loss_figures(mode, steps=30, lr=1e-2)
    assert with_z["mean_lse_sq"] < 0.9 * without["mean_lse_sq"]
    assert with_z["nonfinite_steps"] == without["nonfinite_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_bf16_training_few_hundred_steps(mode):
    steps = int(os.environ.get("SPARSE_MOE_BF16_STEPS", "300"))
    run = _bf16_run(mode, steps=steps)
    print(f"{mode}: {steps} steps, non-finite steps {run['nonfinite_steps']}, loss {run['losses'][0]:.3f} -> "
          f"{sum(run['losses'][-10:]) / 10:.3f}, router logits {run['logit_dtypes']}")
    assert run["nonfinite_steps"] == 0 and run["params_finite"] and run["logit_dtypes"] == {torch.float32}
    assert sum(run["losses"][-10:]) / 10 < 1.0  # learnt the counting pattern
    without, with_z = _z_loss_figures(mode, steps=steps, lr=3e-3)
    assert without["nonfinite_steps"] == with_z["nonfinite_steps"] == 0
    assert with_z["mean_lse_sq"] < 0.5 * without["mean_lse_sq"]
