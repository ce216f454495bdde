"""Routing and loss pictures (matplotlib, PNG; `pip install "sparse-moe[demo]"`).

  1. `plot_load_heatmap`: expert load per layer x expert over training steps, from `router_telemetry.json`.
  2. `route_tokens` + `plot_token_routing`: which experts each token of a text went to, per layer (colour = first
     choice, intensity = its routing weight; every choice written in the cell).
  3. `expert_top_tokens` + `specialisation_table` + `plot_expert_specialisation`: per expert of one layer, the tokens
     most often routed to it.
  4. `plot_loss_curves`: train / validation loss over steps, one colour per model (MoE vs dense in the study).
  5. The study's pictures: `plot_seed_bands` (validation curves, mean over seeds with a min-max band),
     `plot_loss_vs_experts` (final loss against the number of experts) and `plot_language_experts` (each language's
     share of every expert's tokens, per layer: do experts specialise by language?).

Every function takes data (or a model) and a path, writes one PNG and returns its path.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # NOTE: headless by default: scripts and tests run without a display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from ..modeling_sparse_moe import SparseMoERouter  # noqa: E402

DPI = 100


def _expert_colours(num_experts: int) -> list[tuple[float, float, float]]:
    base = plt.get_cmap("tab20" if num_experts > 10 else "tab10").colors
    if num_experts <= len(base):
        return [to_rgb(c) for c in base[:num_experts]]
    return [to_rgb(plt.get_cmap("hsv")(i / num_experts)) for i in range(num_experts)]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _finish_loss_plot(fig, ax, path, title: str, xlabel: str, ylabel: str, target: float | None) -> Path:
    """Labels, grid, legend and an optional dotted target line shared by the loss-curve pictures; saves the figure."""
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- 1. load heatmap
def load_telemetry(source) -> dict:
    """The dict of `router_telemetry.json` (a path, or the dict itself)."""
    if isinstance(source, dict):
        return source
    return json.loads(Path(source).read_text())


def plot_load_heatmap(telemetry, path, title: str = "Expert load over training") -> Path:
    """One panel per MoE layer: experts (rows) x logging steps (columns), colour = fraction of the layer's top-k
    assignments that went to the expert in that logging window (uniform = 1/E)."""
    data = load_telemetry(telemetry)
    history = data["history"]
    if not history:
        raise ValueError("no telemetry rows to plot (was anything logged?)")
    layers = data["layers"]
    steps = [row["step"] for row in history]
    load_SLE = np.asarray([row["load"] for row in history], dtype=float)  # steps x layers x experts
    num_experts = load_SLE.shape[2]
    vmax = max(float(load_SLE.max()), 2.0 / num_experts)
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(10, 1.2 + 0.28 * num_experts * len(layers) + 0.6), squeeze=False, sharex=True
    )
    image = None
    for row, layer in enumerate(layers):
        ax = axes[row, 0]
        image = ax.imshow(
            load_SLE[:, row, :].T, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax,
            interpolation="nearest",
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(range(0, num_experts, max(1, num_experts // 8)))
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
    axes[-1, 0].set_xticks(ticks)
    axes[-1, 0].set_xticklabels([str(steps[i]) for i in ticks])
    axes[-1, 0].set_xlabel("training step")
    axes[0, 0].set_title(f"{title} (uniform = 1/{num_experts} = {1 / num_experts:.3f})")
    fig.tight_layout()
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="fraction of assignments", shrink=0.9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- 2. token routing
@torch.no_grad()
def route_tokens(model, tokenizer, text: str) -> dict:
    """Run `model` on `text` (eval mode) and return, per MoE layer, each token's chosen experts and routing weights:
    `{"tokens": [str], "layers": [int], "experts": [L][T][K], "weights": [L][T][K]}` (weights as the block combines
    them, choices in the router's top-k order, heaviest first)."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    routers = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoERouter)]
    if not routers:
        raise ValueError("the model has no MoE layer to show (num_experts == 0?)")
    for index, (name, router) in enumerate(routers):
        layer = _layer_of(name, index)

        def hook(module, args, output, layer=layer):
            captured[layer] = (output[1].detach().float().cpu(), output[2].detach().cpu())

        handles.append(router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    layers = sorted(captured)
    experts, weights = [], []
    for layer in layers:
        weight_TK, index_TK = captured[layer]
        order_TK = weight_TK.argsort(dim=-1, descending=True)
        experts.append(index_TK.gather(1, order_TK).tolist())
        weights.append(weight_TK.gather(1, order_TK).tolist())
    return {"tokens": tokens, "layers": layers, "experts": experts, "weights": weights,
            "num_experts": routers[0][1].num_experts}


def _layer_of(name: str, fallback: int) -> int:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return fallback


def plot_token_routing(routing: dict, path, title: str | None = None) -> Path:
    """Token x layer grid: each cell coloured by the token's first-choice expert in that layer, brighter for a larger
    routing weight (white = weight 0, full colour = 1); the cell lists every chosen expert."""
    tokens, layers = routing["tokens"], routing["layers"]
    experts = np.asarray(routing["experts"])  # L x T x K
    weights = np.asarray(routing["weights"])
    num_experts = int(routing.get("num_experts") or experts.max() + 1)
    colours = np.asarray(_expert_colours(num_experts))
    num_layers, num_tokens, top_k = experts.shape
    strength = np.clip(weights[:, :, 0], 0.0, 1.0)[..., None]
    image = 1.0 - strength * (1.0 - colours[experts[:, :, 0]])  # blend white -> expert colour by routing weight
    width = max(6.0, 0.55 * num_tokens + 2.5)
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.55 * num_layers))
    ax.imshow(image, aspect="auto", origin="upper", interpolation="nearest")
    for layer in range(num_layers):
        for token in range(num_tokens):
            label = "\n".join(str(e) for e in experts[layer, token]) if top_k <= 3 else str(experts[layer, token, 0])
            ax.text(token, layer, label, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(num_tokens))
    ax.set_xticklabels([t.replace("\n", "\\n") or "␣" for t in tokens], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(num_layers))
    ax.set_yticklabels([f"layer {layer}" for layer in layers])
    ax.set_xlabel("token")
    ax.set_title(title or f"Experts chosen per token (colour: first choice; intensity: its weight; top-{top_k} listed)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[e]) for e in range(num_experts)]
    ax.legend(handles, [f"expert {e}" for e in range(num_experts)], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=7, ncol=1 if num_experts <= 16 else 2, title="first choice")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------- 3. expert specialisation
@torch.no_grad()
def expert_top_tokens(model, tokenizer, texts: list[str], layer: int | None = None, top_n: int = 8,
                      max_length: int = 256) -> dict:
    """For each expert of one MoE layer (default: the first), the `top_n` tokens most often routed to it over
    `texts` (all top-k assignments count). Returns `{"layer", "experts": {e: [(token, count, share)]}, "assignments":
    [per expert]}`, `share` = the fraction of that token's occurrences that went to this expert."""
    routers = {_layer_of(n, i): m for i, (n, m) in enumerate(
        (n, m) for n, m in model.named_modules() if isinstance(m, SparseMoERouter))}
    if not routers:
        raise ValueError("the model has no MoE layer (num_experts == 0?)")
    layer = min(routers) if layer is None else layer
    if layer not in routers:
        raise ValueError(f"layer {layer} is not an MoE layer; MoE layers: {sorted(routers)}")
    router = routers[layer]
    pair_counts: Counter = Counter()
    token_counts: Counter = Counter()
    captured = {}
    handle = router.register_forward_hook(lambda m, a, out: captured.__setitem__("index", out[2].detach().cpu()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            model(input_ids=ids.to(device))
            index_TK = captured["index"]
            flat = ids[0].tolist()
            token_counts.update(flat)
            for token, chosen in zip(flat, index_TK.tolist()):
                pair_counts.update((e, token) for e in chosen)
    finally:
        handle.remove()
        model.train(was_training)
    result: dict[int, list] = {}
    assignments = [0] * router.num_experts
    for (expert, _), count in pair_counts.items():
        assignments[expert] += count
    for expert in range(router.num_experts):
        ranked = sorted(((c, t) for (e, t), c in pair_counts.items() if e == expert), reverse=True)[:top_n]
        result[expert] = [(tokenizer.decode([t]), c, c / token_counts[t]) for c, t in ranked]
    return {"layer": layer, "experts": result, "assignments": assignments}


def specialisation_table(spec: dict) -> str:
    """The `expert_top_tokens` result as a Markdown table: expert, its share of assignments, top tokens."""
    total = max(1, sum(spec["assignments"]))
    lines = [f"Layer {spec['layer']}: tokens most often routed to each expert (share of that token's occurrences)", "",
             "| expert | load | top tokens |", "|---|---|---|"]
    for expert, tops in spec["experts"].items():
        cells = ", ".join(f"`{_show(tok)}` {count} ({share:.0%})" for tok, count, share in tops)
        lines.append(f"| {expert} | {spec['assignments'][expert] / total:.1%} | {cells} |")
    return "\n".join(lines) + "\n"


def _show(token: str) -> str:
    return token.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") or "␣"


def plot_expert_specialisation(spec: dict, path, title: str | None = None) -> Path:
    """A table figure: one row per expert, its load and its top tokens with counts."""
    experts = list(spec["experts"])
    top_n = max((len(v) for v in spec["experts"].values()), default=0)
    total = max(1, sum(spec["assignments"]))
    cells = []
    for expert in experts:
        row = [f"{spec['assignments'][expert] / total:.1%}"]
        row += [f"{_show(tok).strip() or '␣'} ({count})" for tok, count, _ in spec["experts"][expert]]
        row += [""] * (top_n - len(spec["experts"][expert]))
        cells.append(row)
    fig, ax = plt.subplots(figsize=(2.0 + 1.35 * (top_n + 1), 1.0 + 0.32 * len(experts)))
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        rowLabels=[f"expert {e}" for e in experts],
        colLabels=["load"] + [f"#{i + 1}" for i in range(top_n)],
        loc="center",
        cellLoc="left",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    colours = _expert_colours(len(experts))
    for row, expert in enumerate(experts):
        table[(row + 1, -1)].set_facecolor((*colours[row], 0.35))
    ax.set_title(title or f"Layer {spec['layer']}: tokens most often routed to each expert (count)")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------- 4. loss curves
def loss_curves_from_log_history(log_history: list[dict]) -> dict:
    """`{"train": [(step, loss)], "eval": [(step, eval_loss)]}` from `trainer.state.log_history`."""
    train = [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]
    evals = [(row["step"], row["eval_loss"]) for row in log_history if "eval_loss" in row and "step" in row]
    return {"train": train, "eval": evals}


def plot_loss_curves(curves: dict, path, title: str = "Training and validation loss", target: float | None = None,
                     xlabel: str = "training step") -> Path:
    """`curves = {model name: {"train": [(step, loss)], "eval": [(step, loss)]}}`: train dashed, validation solid
    with markers, one colour per model; `target` draws a horizontal reference line (e.g. the dense final loss)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10").colors
    for i, (name, curve) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        if curve.get("train"):
            steps, losses = zip(*curve["train"])
            ax.plot(steps, losses, "--", color=colour, alpha=0.6, label=f"{name} train")
        if curve.get("eval"):
            steps, losses = zip(*curve["eval"])
            ax.plot(steps, losses, "-o", color=colour, markersize=3, label=f"{name} validation")
    return _finish_loss_plot(fig, ax, path, title, xlabel, "loss (cross-entropy, nats/token)", target)


# ------------------------------------------------------------------------------------------- 5. study pictures
def plot_seed_bands(curves: dict, path, title: str = "Validation loss over seeds", target: float | None = None,
                    xlabel: str = "training step") -> Path:
    """`curves = {arm: [[(step, loss), ...] per seed]}`: the mean over seeds as a line, the min-max range over seeds
    as a band, one colour per arm (seeds must share their evaluation steps)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10").colors
    for i, (name, runs) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        steps = [step for step, _ in runs[0]]
        if any([step for step, _ in run] != steps for run in runs):
            raise ValueError(f"plot_seed_bands: the seeds of {name!r} were evaluated at different steps")
        losses = np.array([[loss for _, loss in run] for run in runs])  # seeds x evaluations
        ax.plot(steps, losses.mean(0), "-o", color=colour, markersize=3, label=f"{name} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(steps, losses.min(0), losses.max(0), color=colour, alpha=0.25, linewidth=0)
    return _finish_loss_plot(fig, ax, path, title, xlabel, "validation loss (nats/token)", target)


def plot_loss_vs_experts(points: dict, path, references: dict | None = None,
                         title: str = "Final validation loss against number of experts") -> Path:
    """`points = {number of experts: [final loss per seed]}`: mean with a std error bar, x on a log2 axis;
    `references = {name: [final loss per seed]}` (dense arms) as horizontal lines at their means."""
    if not points:
        raise ValueError("plot_loss_vs_experts needs at least one expert count")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    counts = sorted(points)
    means = [float(np.mean(points[e])) for e in counts]
    stds = [float(np.std(points[e], ddof=1)) if len(points[e]) > 1 else 0.0 for e in counts]
    ax.errorbar(counts, means, yerr=stds, fmt="-o", color="tab:blue", capsize=3, label="MoE (top-2, same active width)")
    for i, (name, finals) in enumerate((references or {}).items()):
        ax.axhline(float(np.mean(finals)), linestyle=":", color=plt.get_cmap("tab10").colors[(i + 1) % 10], label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts)
    ax.set_xticklabels([str(e) for e in counts])
    ax.set_xlabel("experts per MoE layer")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_language_experts(shares, languages: list[str], path,
                          title: str = "Each language's share of every expert's tokens") -> Path:
    """`shares[layer][expert][language]` (rows sum to 1, as `study.language_shares` gives): one panel per MoE layer,
    experts as rows, languages as columns, each cell written; 1 / languages everywhere means no specialisation."""
    data = np.asarray(shares, dtype=float)  # layers x experts x languages
    if data.ndim != 3 or data.shape[2] != len(languages):
        raise ValueError(f"plot_language_experts: shares of shape {data.shape} do not match {len(languages)} languages")
    layers, experts, _ = data.shape
    fig, axes = plt.subplots(1, layers, figsize=(1.2 + 0.45 * len(languages) * layers + 0.6 * layers,
                                                 1.4 + 0.3 * experts), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        image = ax.imshow(data[layer], cmap="viridis", vmin=0.0, vmax=max(0.5, float(data.max())), aspect="auto")
        for e in range(experts):
            for j in range(len(languages)):
                ax.text(j, e, f"{data[layer, e, j] * 100:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if data[layer, e, j] < 0.6 * float(data.max()) else "black")
        ax.set_xticks(range(len(languages)))
        ax.set_xticklabels(languages, fontsize=8)
        ax.set_yticks(range(experts))
        ax.set_yticklabels([str(e) for e in range(experts)], fontsize=7)
        ax.set_title(f"layer {layer}", fontsize=9)
        if layer == 0:
            ax.set_ylabel("expert")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"share (uniform {1 / len(languages):.2f})")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


__all__ = [
    "expert_top_tokens",
    "load_telemetry",
    "loss_curves_from_log_history",
    "plot_expert_specialisation",
    "plot_language_experts",
    "plot_load_heatmap",
    "plot_loss_curves",
    "plot_loss_vs_experts",
    "plot_seed_bands",
    "plot_token_routing",
    "route_tokens",
    "specialisation_table",
]
