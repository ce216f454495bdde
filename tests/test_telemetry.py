"""Router telemetry in Trainer's logs: keys and sane values, exactness under gradient accumulation and gradient
checkpointing, agreement with the model's own aux/z losses, aux-loss-free balancing on a skewed router; a console
that prints the router summary only while log_history, the JSON and TensorBoard get every series; the dead-expert
warning."""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

import modeling_sparse_moe  # noqa: F401
from modeling_sparse_moe.recipes.training import (
    CONSOLE_ROUTER_KEYS,
    TELEMETRY_FILE,
    RouterBiasUpdateCallback,
    RouterTelemetry,
    RouterTelemetryCallback,
    add_router_telemetry,
    dead_experts,
)

NUM_ROWS, SEQ = 8, 16


def _config(**overrides):
    config = AutoConfig.from_pretrained("configs/tiny")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _data(seed=0, vocab=512):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (NUM_ROWS, SEQ), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _train(tmp_path, name, *, config=None, steps=1, batch=NUM_ROWS, accumulation=1, lr=1e-3, callbacks=(),
           telemetry=True, **args):
    set_seed(0)
    model = AutoModelForCausalLM.from_config(config or _config())
    args = {"report_to": "none", "disable_tqdm": True, **args}
    training_args = TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=lr, logging_steps=1, save_strategy="no",
        use_cpu=True, seed=0, **args,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=_data(), callbacks=list(callbacks))
    if telemetry:
        add_router_telemetry(trainer)
    trainer.train()
    return trainer


def _telemetry_file(trainer):
    return json.loads((Path(trainer.args.output_dir) / TELEMETRY_FILE).read_text())


class _Sink(TrainerCallback):
    """Stands for a `report_to` integration: registered before the telemetry callback, it sees what it is handed."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_telemetry_keys_and_values_in_log_history(tmp_path):
    config = _config()
    sink = _Sink()
    trainer = _train(tmp_path, "keys", config=config, steps=3, callbacks=[sink])
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3
    # add_router_telemetry runs ahead of every other callback, so sinks (TensorBoard, W&B, ...) get the metrics too
    assert [row["router/load_imbalance"] for row in sink.seen if "loss" in row] == [
        row["router/load_imbalance"] for row in logs]
    experts = config.num_experts
    for row in logs:
        for layer in (0, 1):
            fractions = [row[f"router/layer_{layer}/load_e{e}"] for e in range(experts)]
            assert sum(fractions) == pytest.approx(1.0, abs=1e-9)
            assert all(0.0 <= f <= 1.0 for f in fractions)
            assert row[f"router/layer_{layer}/load_imbalance"] == pytest.approx(max(fractions) * experts)
            assert 0.0 < row[f"router/layer_{layer}/entropy"] <= math.log(experts) + 1e-6
            assert row[f"router/layer_{layer}/dropped_fraction"] == 0.0
        assert row["router/load_imbalance"] >= 1.0
        assert row["router/load_cv"] >= 0.0
        assert row["router/z_loss"] > 0.0
        assert row["router/entropy"] == pytest.approx(
            (row["router/layer_0/entropy"] + row["router/layer_1/entropy"]) / 2)
    data = _telemetry_file(trainer)
    assert data["layers"] == [0, 1] and data["num_experts"] == experts
    assert [row["step"] for row in data["history"]] == [1, 2, 3]
    # every token of the step counted once, K assignments each
    assert all(sum(layer) == NUM_ROWS * SEQ * config.num_experts_per_tok for row in data["history"]
               for layer in row["counts"])


def test_telemetry_matches_the_models_aux_and_z_loss(tmp_path):
    """The window of step 1 is the whole (initial-weights) batch: its pooled aux and z losses are the model's."""
    set_seed(0)
    model = AutoModelForCausalLM.from_config(_config())
    ids = torch.tensor(_data()["input_ids"])
    with torch.no_grad():
        out = model.train()(input_ids=ids, labels=ids)
    trainer = _train(tmp_path, "aux", steps=1)
    row = next(row for row in trainer.state.log_history if "loss" in row)
    assert row["router/aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert row["router/z_loss"] == pytest.approx(out.z_loss.item(), rel=1e-5)


def _window(trainer):
    row = next(row for row in trainer.state.log_history if "loss" in row)
    return {k: v for k, v in row.items() if k.startswith("router/")}, _telemetry_file(trainer)["history"][0]["counts"]


def test_gradient_accumulation_counts_like_one_batch(tmp_path):
    one, counts_one = _window(_train(tmp_path, "ga1", batch=NUM_ROWS, accumulation=1))
    two, counts_two = _window(_train(tmp_path, "ga2", batch=NUM_ROWS // 2, accumulation=2))
    assert counts_one == counts_two  # integer loads: exactly the same
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_does_not_count_the_recomputation(tmp_path, reentrant):
    plain, counts_plain = _window(_train(tmp_path, "plain", steps=1))
    ckpt, counts_ckpt = _window(
        _train(tmp_path, f"ckpt{reentrant}", steps=1, gradient_checkpointing=True,
               gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    )
    assert counts_ckpt == counts_plain
    assert sum(counts_ckpt[0]) == NUM_ROWS * SEQ * 2  # not 2x: the recomputation forward is skipped
    for key in plain:
        assert ckpt[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key


def test_padding_is_not_counted():
    set_seed(0)
    model = AutoModelForCausalLM.from_config(_config()).train()
    telemetry = RouterTelemetry(model)
    ids = torch.randint(4, 512, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert [sum(c) for c in telemetry.loads().values()] == [13 * 2, 13 * 2]
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # eval-mode forwards are not training telemetry
    assert [sum(c) for c in telemetry.loads().values()] == [13 * 2, 13 * 2]
    telemetry.remove()
    model.train()
    with torch.no_grad():
        model(input_ids=ids)
    assert [sum(c) for c in telemetry.loads().values()] == [13 * 2, 13 * 2]


def test_callback_passed_to_trainer_reaches_log_history(tmp_path):
    trainer = _train(tmp_path, "plaincb", telemetry=False, callbacks=[RouterTelemetryCallback(per_expert=False)])
    row = next(row for row in trainer.state.log_history if "loss" in row)
    assert "router/load_imbalance" in row and "router/layer_1/entropy" in row
    assert not any("load_e" in key for key in row)


def _skewed_config(rate):
    # softmax scores lie in [0, 1]: a +0.6 correction bias on expert 0 puts it in (nearly) every token's top-2
    return _config(router_bias_update_rate=rate, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)


def _skew(trainer_model):
    for module in trainer_model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.copy_(torch.tensor([0.6, 0.0, 0.0, 0.0]))


def _train_skewed(tmp_path, name, rate, callbacks):
    set_seed(0)
    model = AutoModelForCausalLM.from_config(_skewed_config(rate))
    with torch.no_grad():
        _skew(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=30, per_device_train_batch_size=NUM_ROWS, learning_rate=1e-3,
        logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_data(), callbacks=callbacks)
    add_router_telemetry(trainer)
    trainer.train()
    return [row["router/load_imbalance"] for row in trainer.state.log_history if "loss" in row]


def test_bias_updates_move_a_skewed_router_toward_uniform(tmp_path):
    balanced = _train_skewed(tmp_path, "bias", 0.02, [RouterBiasUpdateCallback()])
    control = _train_skewed(tmp_path, "nobias", 0.0, [RouterBiasUpdateCallback()])
    assert balanced[0] > 1.9 and control[0] > 1.9  # expert 0 takes ~half of all assignments (uniform: a quarter)
    assert control[-1] > 1.9  # nothing corrects it without bias updates
    assert balanced[-1] < 1.35
    assert balanced[-1] < balanced[0] - 0.5


def test_dropped_fraction_matches_the_model_under_capacity():
    set_seed(0)
    model = AutoModelForCausalLM.from_config(_config(capacity_factor=0.5)).train()
    with torch.no_grad():
        for layer in model.model.layers:  # a router with preferences, so some experts overflow
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    telemetry = RouterTelemetry(model)
    ids = torch.tensor(_data()["input_ids"])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    summary = telemetry.summary()
    assert out.dropped_fraction.item() > 0.1
    assert summary["router/dropped_fraction"] == pytest.approx(out.dropped_fraction.item(), rel=1e-6)
    assert summary["router/aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------------- console, TensorBoard, dead experts
PER_LAYER = ("router/layer_", "load_e")


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_console_prints_loss_lr_and_the_router_summary_only(tmp_path, capsys, disable_tqdm):
    trainer = _train(tmp_path, f"console{disable_tqdm}", steps=2, disable_tqdm=disable_tqdm)
    printed = capsys.readouterr()
    console = printed.out + printed.err
    lines = [line for line in console.splitlines() if "'loss'" in line]
    assert len(lines) == 2  # one line per logging step
    for line in lines:
        for key in ("'learning_rate'", *(f"'{key}'" for key in CONSOLE_ROUTER_KEYS)):
            assert key in line, (key, line)
    assert not any(part in console for part in PER_LAYER), console
    # the full series are where they belong: log_history (trainer_state.json) and router_telemetry.json
    row = next(row for row in trainer.state.log_history if "loss" in row)
    assert sum(row[f"router/layer_1/load_e{e}"] for e in range(4)) == pytest.approx(1.0)
    assert row["router/max_imbalance"] == max(row[f"router/layer_{layer}/load_imbalance"] for layer in (0, 1))
    shares = [row[f"router/layer_{layer}/load_e{e}"] * 4 for layer in (0, 1) for e in range(4)]
    assert row["router/min_expert_share"] == pytest.approx(min(shares))
    assert len(_telemetry_file(trainer)["history"][0]["counts"]) == 2


def test_tensorboard_event_files_hold_every_router_series(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _train(tmp_path, "tb", steps=3, report_to=["tensorboard"])
    events = list(Path(trainer.args.output_dir).rglob("events.out.tfevents.*"))
    assert events
    scalars = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    history = {row["step"]: row for row in trainer.state.log_history if "loss" in row}
    for key in ("router/layer_0/load_e3", "router/layer_1/min_expert_share", "router/max_imbalance", "router/aux_loss"):
        series = scalars[f"train/{key}"]  # Trainer's TensorBoard callback files training logs under train/
        assert [step for step, _ in series] == [1, 2, 3]
        assert [value for _, value in series] == pytest.approx([history[step][key] for step, _ in series], rel=1e-6)


def test_dead_experts_rule():
    def row(step, layer0, layer1):
        return {"step": step, "counts": [layer0, layer1]}

    history = [row(1, [0, 5, 5, 6], [4, 4, 4, 4]), row(2, [1, 5, 5, 5], [4, 4, 4, 4]),
               row(3, [0, 6, 5, 5], [4, 4, 4, 4]), row(4, [0, 5, 6, 5], [8, 0, 4, 4])]
    assert dead_experts(history, step=2, window=3, threshold=0.1) == []  # the window is not full yet
    # steps 2..4: expert 0 of layer 0 got 1 of 48 assignments = 1/12 of the uniform 12
    found = dead_experts(history, step=4, window=3, threshold=0.1)
    assert found == [{"layer": 0, "expert": 0, "share": pytest.approx(4 / 48), "step": 4}]
    assert dead_experts(history, step=4, window=3, threshold=0.05) == []
    # a one-step window sees layer 1's expert 1 at 0 as well
    assert [(f["layer"], f["expert"]) for f in dead_experts(history, 4, 1, 0.1)] == [(0, 0), (1, 1)]


def _collapse(model):
    # softmax scores lie in [0, 1]: +1 on experts 0 and 1 puts them in every token's top-2, so 2 and 3 get nothing
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))


def _train_for_dead_experts(tmp_path, name, collapse):
    set_seed(0)
    model = AutoModelForCausalLM.from_config(_config())
    if collapse:
        with torch.no_grad():
            _collapse(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=NUM_ROWS, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_data())
    add_router_telemetry(trainer, dead_expert_window=4, dead_expert_threshold=0.1)
    trainer.train()
    return trainer


def test_dead_expert_warning_fires_once_per_expert_on_a_collapsed_router(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="modeling_sparse_moe.recipes.training"):
        trainer = _train_for_dead_experts(tmp_path, "collapsed", collapse=True)
    warnings = [r.getMessage() for r in caplog.records if "Dead expert" in r.getMessage()]
    named = sorted((layer, expert) for layer in (0, 1) for expert in (2, 3))
    assert len(warnings) == 4  # steps 4, 5 and 6 see them dead; each (layer, expert) is warned about once
    for (layer, expert), message in zip(named, sorted(warnings)):
        assert f"layer {layer}, expert {expert} got 0.000x" in message
        assert "router_aux_loss_coef (now 0.01)" in message and "router_bias_update_rate" in message
        assert "RouterBiasUpdateCallback" in message and "num_shared_experts" in message
    data = _telemetry_file(trainer)
    assert data["dead_expert_rule"] == {"window_steps": 4, "threshold": 0.1}
    assert sorted((row["layer"], row["expert"]) for row in data["dead_experts"]) == named
    assert {(row["step"], row["share"]) for row in data["dead_experts"]} == {(4, 0.0)}


def test_dead_expert_warning_is_quiet_on_a_balanced_router(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="modeling_sparse_moe.recipes.training"):
        trainer = _train_for_dead_experts(tmp_path, "balanced", collapse=False)
    assert not [r for r in caplog.records if "Dead expert" in r.getMessage()]
    data = _telemetry_file(trainer)
    assert data["dead_experts"] == []
    # the rule did judge this run (steps 4..6) and every expert kept well over the threshold
    assert min(row["min_expert_share"] for row in data["history"] if row["step"] >= 4) > 0.5
