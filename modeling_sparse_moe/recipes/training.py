"""Trainer callbacks for MoE training (router bias updates, router telemetry, training time) and helpers that keep a
run's work safe.

What transformers 5.24 guarantees, and what it does not (read from `Trainer._save_checkpoint` and
`PreTrainedModel.save_pretrained`):
  - `Trainer` writes `checkpoint-N` in place: weights first, then optimizer, scheduler and RNG states, and
    `trainer_state.json` last. Older checkpoints are rotated away only after that. A crash mid-save therefore leaves
    the previous checkpoint intact and a `checkpoint-N` without `trainer_state.json`, possibly with a truncated
    `model.safetensors`.
  - But `get_last_checkpoint`, which `train(resume_from_checkpoint=True)` uses, picks the highest `checkpoint-N`
    folder whether or not it is complete. `last_complete_checkpoint` below skips the incomplete ones.
  - `save_pretrained` also writes in place: a crash while overwriting a folder leaves neither the old nor the new
    model. `atomic_save_pretrained` writes a sibling folder and swaps it in with renames.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import time

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..modeling_sparse_moe import (
    SparseMoERouter,
    _data_parallel_world,
    _sum_over_ranks,
    router_probabilities,
    update_router_biases,
)

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------- label smoothing
class CausalLMTrainer(Trainer):
    """`Trainer` whose `--label_smoothing_factor` is right for `SparseMoEForCausalLM`.

    NOTE: transformers 5.x `Trainer.compute_loss` pops the labels when label smoothing is on and shifts them only
    when the model's class name is in the static `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (transformers' own classes).
    For any other causal LM, ours included, each position's logits are scored against the position's own token,
    and whatever the model adds to its loss (our router aux loss and z-loss) is dropped. Here the labels stay in
    the inputs, the model computes its own loss (shifted cross-entropy + router losses), and the smoothing term is
    added on the same target tokens with the same normaliser: loss + eps * (mean over the vocabulary of -log p - NLL),
    which is LabelSmoother's (1 - eps) * NLL + eps * smooth."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        smoother = self.label_smoother
        if smoother is None or "labels" not in inputs or not _is_sparse_moe_causal_lm(self.accelerator.unwrap_model(model)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.label_smoother = None  # the model computes the (shifted) loss itself
        try:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        finally:
            self.label_smoother = smoother
        labels = inputs["labels"][..., 1:]
        log_probs = torch.log_softmax(outputs.logits[..., :-1, :].float(), dim=-1)
        mask = labels.ne(smoother.ignore_index)
        nll = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        uniform = -log_probs.mean(dim=-1)
        count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        if torch.is_tensor(count):
            count = count.to(loss.device)
        term = ((uniform - nll) * mask).sum() / count
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            term = term * (self.accelerator.num_processes // tp_size)  # as Trainer scales the model's loss
        loss = loss + smoother.epsilon * term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


def _is_sparse_moe_causal_lm(model) -> bool:
    from ..modeling_sparse_moe import SparseMoEForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    return isinstance(base, SparseMoEForCausalLM)


_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
_INDEX_FILE = "model.safetensors.index.json"


class RouterBiasUpdateCallback(TrainerCallback):
    """DeepSeek-V3 aux-loss-free balancing for `Trainer`: after every optimizer step, nudge each router's
    `e_score_correction_bias` by `config.router_bias_update_rate * sign(mean load - load)`, using the expert loads of
    all micro-batches of that step. A no-op while the rate is 0, and on a PEFT model: an adapter trains only its own
    weights, and the bias belongs to the frozen base, so base + adapter (reloaded, merged or exported) routes exactly as
    the model did in training.

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RouterBiasUpdateCallback()])
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and getattr(model, "peft_config", None) is None:
            update_router_biases(model)


# --------------------------------------------------------------------------------------------------- router telemetry
TELEMETRY_FILE = "router_telemetry.json"


def _in_backward() -> bool:
    """Whether this code runs inside autograd's backward pass: true for the recomputation forward of gradient
    checkpointing (reentrant or not), false for every ordinary forward."""
    return torch._C._current_graph_task_id() != -1


class _LayerStats:
    """Running sums for one router since the last reset, kept on the router's device (no host sync per step)."""

    def __init__(self, num_experts: int, device: torch.device):
        self.counts_E = torch.zeros(num_experts, dtype=torch.int64, device=device)  # top-k assignments per expert
        self.prob_sum_E = torch.zeros(num_experts, dtype=torch.float32, device=device)  # sum of router probabilities
        self.entropy_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.z_sum = torch.zeros((), dtype=torch.float32, device=device)  # sum of logsumexp(logits)^2
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.dropped = torch.zeros((), dtype=torch.int64, device=device)


class RouterTelemetry:
    """Accumulates what every router of `model` did in training forwards, through one forward hook per router (plus a
    pre-hook on `model` that remembers `attention_mask`, so padding is not counted).

    Per MoE layer: assignments per expert (integer `bincount` of the chosen top-k, before capacity dropping),
    dropped assignments, the sum of router-distribution entropies, of router probabilities and of logsumexp(logits)^2.
    From these `summary()` derives load fractions, imbalance, entropy, dropped fraction and the Switch aux loss and
    ST-MoE z-loss of the window, exactly as if the window had been one batch: a step's micro-batches under gradient
    accumulation sum to the same integers as the whole batch in one forward.

    Cost: no extra forward; per router and micro-batch one softmax, one `special.entr`, one logsumexp over the
    (T, E) logits and one bincount of the (T, K) choices, all on the device (see docs/training.md for the measured
    overhead). The recomputation forward of gradient checkpointing runs inside backward and is skipped, so each
    micro-batch counts once. Eval-mode forwards (evaluation, generation) are not counted.
    """

    def __init__(self, model: torch.nn.Module):
        self.routers: dict[int, SparseMoERouter] = {}
        for name, module in model.named_modules():
            if isinstance(module, SparseMoERouter):
                self.routers[_layer_index(name, len(self.routers))] = module
        self.stats: dict[int, _LayerStats] = {}
        self._mask = None
        self._handles = []
        if not self.routers:
            return
        self._handles.append(model.register_forward_pre_hook(self._remember_mask, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._forget_mask))
        for layer, router in self.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        self.reset()

    @property
    def layers(self) -> list[int]:
        return list(self.routers)

    def reset(self) -> None:
        for layer, router in self.routers.items():
            self.stats[layer] = _LayerStats(router.num_experts, router.weight.device)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _remember_mask(self, module, args, kwargs):
        self._mask = kwargs.get("attention_mask")

    def _forget_mask(self, module, args, output):
        self._mask = None

    def _hook(self, layer: int):
        def hook(router, args, output):
            if not router.training or _in_backward():
                return
            with torch.no_grad():
                self._accumulate(layer, router, *output)

        return hook

    def _accumulate(self, layer, router, logits_TE, weights_TK, index_TK, dropped_TK) -> None:
        stats = self.stats[layer]
        if stats.counts_E.device != logits_TE.device:  # the model moved after the hooks were attached
            self.stats[layer] = stats = _LayerStats(router.num_experts, logits_TE.device)
        num_tokens = logits_TE.shape[0]
        mask = self._mask
        keep_T = None
        if mask is not None and mask.dim() == 2 and mask.numel() == num_tokens and not bool(mask.all()):
            keep_T = mask.reshape(-1).to(logits_TE.device).bool()
            logits_TE, index_TK = logits_TE[keep_T], index_TK[keep_T]
            dropped_TK = dropped_TK[keep_T] if dropped_TK is not None else None
        probs_TE = router_probabilities(logits_TE, router.router_type)
        stats.counts_E += torch.bincount(index_TK.reshape(-1), minlength=router.num_experts)
        stats.prob_sum_E += probs_TE.sum(dim=0)
        stats.entropy_sum += torch.special.entr(probs_TE).sum()
        stats.z_sum += torch.logsumexp(logits_TE.float(), dim=-1).pow(2).sum()
        stats.tokens += logits_TE.shape[0]
        if dropped_TK is not None:
            stats.dropped += dropped_TK.sum()

    def all_reduce(self) -> None:
        """Sum the window's statistics over the ranks of the default process group, in one all-reduce, so that every
        rank's `summary()` and `loads()` describe the whole data-parallel batch (as `update_router_biases` pools the
        loads). Every rank must call it; a no-op in one process. Ranks that hold copies of the same batch (tensor /
        expert parallel replicas) scale every sum alike: the fractions, imbalance, entropy, aux and z losses are
        unchanged, the integer counts are multiplied by the number of copies."""
        if _data_parallel_world() <= 1 or not self.stats:
            return
        layers = list(self.stats)
        device = self.stats[layers[0]].counts_E.device
        parts = []
        for layer in layers:
            stats = self.stats[layer]
            scalars = torch.stack([stats.entropy_sum.double(), stats.z_sum.double(), stats.tokens.double(),
                                   stats.dropped.double()])
            parts.append(torch.cat([stats.counts_E.double(), stats.prob_sum_E.double(), scalars]).to(device))
        # NOTE: float64 holds the integer counts exactly up to 2^53.
        pooled = _sum_over_ranks(torch.cat(parts)).split([part.numel() for part in parts])
        for layer, values in zip(layers, pooled):
            stats = self.stats[layer]
            num_experts = stats.counts_E.numel()
            values = values.to(stats.counts_E.device)
            stats.counts_E = values[:num_experts].round().long()
            stats.prob_sum_E = values[num_experts : 2 * num_experts].float()
            stats.entropy_sum, stats.z_sum = values[-4].float(), values[-3].float()
            stats.tokens, stats.dropped = values[-2].round().long(), values[-1].round().long()

    def loads(self) -> dict[int, list[int]]:
        """Integer assignments per expert, per MoE layer, since the last reset."""
        return {layer: stats.counts_E.tolist() for layer, stats in self.stats.items()}

    def summary(self, per_expert: bool = True, prefix: str = "router/") -> dict[str, float]:
        """Metrics of the window since the last reset, as flat `{name: float}` (empty when nothing was counted):
        per layer `layer_{i}/load_e{j}` (fraction of assignments, sums to 1), `load_imbalance` (max / mean load),
        `min_expert_share` (min / mean load: the least-used expert's load as a multiple of the uniform share),
        `load_cv` (std / mean), `entropy` (mean router entropy, nats, <= log E), `dropped_fraction`, `aux_loss`,
        `z_loss`; the same names without `layer_{i}/` average them over layers, except `aux_loss`, pooled over layers as
        the model's loss pools it (equal to the model's `aux_loss` when the window is one batch), and
        `min_expert_share`, the minimum over layers. `max_imbalance` is the maximum of the layers' `load_imbalance`.
        `CONSOLE_ROUTER_KEYS` names the three that make the console's summary."""
        per_layer: dict[int, dict[str, float]] = {}
        fractions: dict[int, list[float]] = {}
        for layer, stats in self.stats.items():
            tokens = int(stats.tokens)
            if tokens == 0:
                continue
            counts_E = stats.counts_E.double().cpu()
            num_experts = counts_E.numel()
            fraction_E = counts_E / counts_E.sum()
            mean = fraction_E.mean()
            prob_E = stats.prob_sum_E.double().cpu() / tokens
            per_layer[layer] = {
                "load_imbalance": float(fraction_E.max() / mean),
                "min_expert_share": float(fraction_E.min() / mean),
                "load_cv": float(fraction_E.std(unbiased=False) / mean),
                "entropy": float(stats.entropy_sum) / tokens,
                "dropped_fraction": float(stats.dropped) / float(counts_E.sum()),
                "aux_loss": float(num_experts * torch.sum(counts_E / tokens * prob_E)),
                "z_loss": float(stats.z_sum) / tokens,
            }
            fractions[layer] = fraction_E.tolist()
        if not per_layer:
            return {}
        metrics: dict[str, float] = {}
        for name in next(iter(per_layer.values())):
            metrics[prefix + name] = sum(values[name] for values in per_layer.values()) / len(per_layer)
        # NOTE: the model pools the aux loss over layers (assignments and probabilities summed, then multiplied),
        # which is not the mean of the per-layer products; report the pooled value, as the loss sees it.
        counted = [self.stats[layer] for layer in per_layer]
        tokens = sum(int(stats.tokens) for stats in counted)
        counts_E = sum(stats.counts_E.double().cpu() for stats in counted)
        prob_E = sum(stats.prob_sum_E.double().cpu() for stats in counted)
        metrics[prefix + "aux_loss"] = float(counts_E.numel() * torch.sum(counts_E / tokens * prob_E / tokens))
        # the console's one-line summary: the worst layer, not the average, is what shows a dying expert
        metrics[prefix + "max_imbalance"] = max(values["load_imbalance"] for values in per_layer.values())
        metrics[prefix + "min_expert_share"] = min(values["min_expert_share"] for values in per_layer.values())
        for layer, values in per_layer.items():
            for name, value in values.items():
                metrics[f"{prefix}layer_{layer}/{name}"] = value
            if per_expert:
                for expert, fraction in enumerate(fractions[layer]):
                    metrics[f"{prefix}layer_{layer}/load_e{expert}"] = fraction
        return metrics


def _layer_index(module_name: str, fallback: int) -> int:
    match = re.search(r"layers\.(\d+)\.", module_name)
    return int(match.group(1)) if match else fallback


# What the console prints of the router metrics at each log: one line with loss and learning rate. Every other
# `router/...` metric (per layer, per expert) goes to `trainer.state.log_history`, router_telemetry.json and the
# `report_to` integrations only.
CONSOLE_ROUTER_KEYS = ("router/max_imbalance", "router/min_expert_share", "router/dropped_fraction")


def console_logs(logs: dict) -> dict:
    """`logs` without the router metrics that are not in `CONSOLE_ROUTER_KEYS` (a new dict)."""
    return {key: value for key, value in logs.items() if not key.startswith("router/") or key in CONSOLE_ROUTER_KEYS}


class RouterSummaryProgressCallback(ProgressCallback):
    """`ProgressCallback` (the tqdm bars) whose printed log lines carry the router summary, not the per-layer,
    per-expert series."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs) if logs is not None else None, **kwargs)


class RouterSummaryPrinterCallback(PrinterCallback):
    """`PrinterCallback` (`--disable_tqdm`) that prints the router summary, not the per-layer, per-expert series."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs) if logs is not None else None, **kwargs)


def summarize_router_console(trainer) -> None:
    """Swap `trainer`'s console callback (`ProgressCallback`, or `PrinterCallback` with `disable_tqdm`) for its
    router-summary version, in place. The logs themselves are untouched: `log_history` and the `report_to`
    integrations still receive every metric."""
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        for plain, summary in ((ProgressCallback, RouterSummaryProgressCallback),
                               (PrinterCallback, RouterSummaryPrinterCallback)):
            if type(callback) is plain:
                swapped = summary.__new__(summary)
                swapped.__dict__.update(callback.__dict__)  # keeps its settings (max_str_len, bars)
                callbacks[i] = swapped


DEAD_EXPERT_ADVICE = (
    "To keep experts alive, try: a larger router_aux_loss_coef (now {aux}); aux-loss-free bias balancing, "
    "router_bias_update_rate=1e-3 with RouterBiasUpdateCallback (the pretraining recipe adds it when the rate is > 0; "
    "now {rate}); router_jitter_noise=0.01; a lower router learning rate; or a shared expert (num_shared_experts=1)."
)


def dead_experts(history: list[dict], step: int, window: int, threshold: float) -> list[dict]:
    """The experts whose share of their layer's assignments, over the logged rows of the last `window` steps up to
    `step` (rows of router_telemetry.json's `history`, with integer `counts` per layer and expert), is below
    `threshold` times the uniform share 1/E. Empty until `step >= window`, so that a few noisy early steps are not
    judged. Each: `{"layer": position in the rows' layers, "expert", "share": load / uniform load, "step"}`."""
    if step < window:
        return []
    rows = [row for row in history if step - window < row["step"] <= step]
    if not rows:
        return []
    found = []
    for layer in range(len(rows[-1]["counts"])):
        counts_E = [sum(values) for values in zip(*(row["counts"][layer] for row in rows))]
        total = sum(counts_E)
        if total == 0:
            continue
        for expert, count in enumerate(counts_E):
            share = count * len(counts_E) / total
            if share < threshold:
                found.append({"layer": layer, "expert": expert, "share": share, "step": step})
    return found


class RouterTelemetryCallback(TrainerCallback):
    """Router telemetry in `Trainer`'s logs: at every `logging_steps` the metrics of `RouterTelemetry.summary()` over
    the steps since the previous log are merged into that log entry (`trainer.state.log_history` and, when attached
    with `add_router_telemetry(trainer)`, every `report_to` integration: TensorBoard shows them as `router/...`
    scalars), and the per-expert loads of every log are written to `output_dir/router_telemetry.json` for
    `plotting.plot_load_heatmap`. `add_router_telemetry` also makes the console print only the summary
    (`CONSOLE_ROUTER_KEYS`).

        trainer = Trainer(model=model, args=args, train_dataset=data)
        add_router_telemetry(trainer)   # or callbacks=[RouterTelemetryCallback()]: every sink but `report_to` ones

    Dead experts: once `dead_expert_window` steps have run, an expert whose share of its layer's assignments over the
    last `dead_expert_window` steps falls below `dead_expert_threshold` times the uniform share gets one WARNING (per
    layer and expert, per run) that names it and says what to try; the JSON lists them under `dead_experts`.

    NOTE: `Trainer` hands the same `logs` dict to its callbacks in order, and the `report_to` integrations come first
    in that order; `add_router_telemetry` puts this callback before them so they see the router metrics too.
    """

    def __init__(self, per_expert: bool = True, json_file: str | None = TELEMETRY_FILE, dead_expert_window: int = 50,
                 dead_expert_threshold: float = 0.1):
        if dead_expert_window < 1:
            raise ValueError(f"dead_expert_window={dead_expert_window} must be >= 1 (steps)")
        if not 0 <= dead_expert_threshold < 1:
            raise ValueError(f"dead_expert_threshold={dead_expert_threshold} must be in [0, 1) (x the uniform share)")
        self.per_expert = per_expert
        self.json_file = json_file
        self.dead_expert_window = dead_expert_window
        self.dead_expert_threshold = dead_expert_threshold
        self.telemetry: RouterTelemetry | None = None
        self.history: list[dict] = []
        self.dead: list[dict] = []  # one entry per (layer, expert) found dead, when first found
        self._layers: list[int] = []
        self._config = None
        self._started = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.telemetry is None:
            self.telemetry = RouterTelemetry(model)
            self._layers = self.telemetry.layers
            self._config = getattr(model, "config", None)
        self._started = False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self._started:
            self._started = True
            # NOTE: on resume, `Trainer` restores `state.global_step` after `on_train_begin`; keep the logged history
            # (and the dead experts found) of the steps that this run does not repeat.
            saved = self._read(args)
            self.history = [row for row in saved.get("history", []) if row["step"] <= state.global_step]
            self.dead = [row for row in saved.get("dead_experts", []) if row["step"] <= state.global_step]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.telemetry is None or logs is None or "loss" not in logs:
            return
        self.telemetry.all_reduce()  # every rank logs the whole batch's routing (a no-op in one process)
        metrics = self.telemetry.summary(per_expert=self.per_expert)
        loads = self.telemetry.loads()
        self.telemetry.reset()
        if not metrics:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        self.history.append(
            {
                "step": state.global_step,
                "load": [_fractions(loads[layer]) for layer in self._layers],
                "counts": [loads[layer] for layer in self._layers],
                "load_imbalance": metrics["router/load_imbalance"],
                "max_imbalance": metrics["router/max_imbalance"],
                "min_expert_share": metrics["router/min_expert_share"],
                "entropy": metrics["router/entropy"],
            }
        )
        self._check_dead_experts(state)
        self._write(args)

    def _check_dead_experts(self, state) -> None:
        known = {(row["layer"], row["expert"]) for row in self.dead}
        for found in dead_experts(self.history, state.global_step, self.dead_expert_window, self.dead_expert_threshold):
            found["layer"] = self._layers[found["layer"]]  # the decoder layer's index, as in the metric names
            if (found["layer"], found["expert"]) in known:
                continue
            self.dead.append(found)
            if state.is_world_process_zero:
                advice = DEAD_EXPERT_ADVICE.format(aux=getattr(self._config, "router_aux_loss_coef", "?"),
                                                   rate=getattr(self._config, "router_bias_update_rate", "?"))
                logger.warning(
                    "Dead expert: layer %d, expert %d got %.3fx its uniform share of tokens over the last %d steps "
                    "(step %d; warned below %.2fx). %s", found["layer"], found["expert"], found["share"],
                    self.dead_expert_window, state.global_step, self.dead_expert_threshold, advice,
                )

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args)
        if self.telemetry is not None:
            self.telemetry.remove()
            self.telemetry = None

    def _path(self, args) -> Path | None:
        if self.json_file is None or not getattr(args, "output_dir", None):
            return None
        return Path(args.output_dir) / self.json_file

    def _read(self, args) -> dict:
        path = self._path(args)
        if path is None or not path.is_file():
            return {}
        try:
            saved = json.loads(path.read_text())
            return saved if isinstance(saved, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, args) -> None:
        path = self._path(args)
        if path is None or not getattr(args, "should_save", True) or not self._layers:
            return
        num_experts = len(self.history[0]["load"][0]) if self.history else None
        payload = {
            "layers": self._layers,
            "num_experts": num_experts,
            "history": self.history,
            "dead_expert_rule": {"window_steps": self.dead_expert_window, "threshold": self.dead_expert_threshold},
            "dead_experts": self.dead,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)


def _fractions(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def add_router_telemetry(trainer, **kwargs) -> RouterTelemetryCallback:
    """Attach a `RouterTelemetryCallback(**kwargs)` to `trainer` ahead of every other callback, so that the
    `report_to` integrations (TensorBoard, W&B, ...) receive every router metric too, and make the console print only
    the router summary (`summarize_router_console`). Returns the callback."""
    callback = RouterTelemetryCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    summarize_router_console(trainer)
    return callback


class TrainingTimeCallback(TrainerCallback):
    """Wall-clock seconds spent in training steps (forward, backward, optimizer; evaluation and checkpointing
    excluded), cumulative per step: `seconds[step]`. Used by the MoE-vs-dense study to compare time to a target."""

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self._total = 0.0
        self._begin = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._begin is not None:
            self._total += time.perf_counter() - self._begin
            self._begin = None
        self.seconds[state.global_step] = self._total


def atomic_save_pretrained(model, path: str | os.PathLike, **kwargs) -> str:
    """`model.save_pretrained(path, **kwargs)` that never leaves `path` half-written.

    The model is saved into a temporary folder next to `path` (same filesystem, so renames are atomic), flushed to
    disk, then renamed over `path`. If saving fails, `path` is untouched and the temporary folder is removed. An
    existing `path` is first renamed to `.NAME.old-*` and deleted once the new folder is in place; a crash between
    those two renames leaves the previous save there, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, **kwargs)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return str(path)


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a `Trainer` checkpoint folder was fully written: `trainer_state.json` (written last) parses and names
    the folder's step, and every safetensors weight file it holds has a readable, fully covered header."""
    folder = Path(folder)
    match = _CHECKPOINT_RE.match(folder.name)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if match is not None and state.get("global_step") != int(match.group(1)):
        return False
    weights = [folder / name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if (folder / _INDEX_FILE).is_file():
        try:
            shards = set(json.loads((folder / _INDEX_FILE).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        weights += [folder / shard for shard in sorted(shards)]
    if not weights:
        return False
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception:  # noqa: BLE001  (missing, truncated or corrupt: not complete, whatever the reason)
            return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-step complete `checkpoint-N` folder in `output_dir`, or None. Pass it as
    `trainer.train(resume_from_checkpoint=...)` instead of `True`, which would pick an incomplete one."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))),
        reverse=True,
    )
    for _, folder in steps:
        if is_complete_checkpoint(folder):
            return str(folder)
    return None


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory descriptors (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


__all__ = [
    "CONSOLE_ROUTER_KEYS",
    "RouterBiasUpdateCallback",
    "RouterSummaryPrinterCallback",
    "RouterSummaryProgressCallback",
    "RouterTelemetry",
    "RouterTelemetryCallback",
    "TrainingTimeCallback",
    "add_router_telemetry",
    "atomic_save_pretrained",
    "console_logs",
    "dead_experts",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "summarize_router_console",
]
