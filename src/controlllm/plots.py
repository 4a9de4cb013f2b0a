"""A picture of a run: `plot_run(run_dir)` draws its metrics.jsonl as one PNG dashboard.

Panels: the LM loss (and evaluation loss) over steps, the alignment loss over steps, one
layer-by-step heatmap each of the interpolation weight, the drift and (when a drift budget was
used) the budget multiplier, and the other evaluation metrics when the run evaluated.
"""

from __future__ import annotations

import json
import math
import os

from .errors import CheckpointError
from .training.monitor import per_layer

METRICS = "metrics.jsonl"
DASHBOARD = "dashboard.png"
# Evaluation keys that describe the evaluation's speed, not the model.
_EVAL_BOOKKEEPING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_loss")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (or of that file itself), in file order."""
    path = os.fspath(run_dir)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist: plot needs a run folder written by `controlllm train`")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{path}:{number} is not a JSON record ({err.msg})") from None
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_step = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            by_step[int(r["step"])] = float(value)  # a step logged twice (a resumed run): the last one counts
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def layer_grid(records: list[dict], name: str):
    """(steps, layers, values[layer][step]) of a per-layer metric; NaN where a step lacks a layer."""
    by_step: dict[int, dict[int, float]] = {}
    for r in records:
        values = per_layer(r, name)
        if values:
            by_step.setdefault(int(r["step"]), {}).update(values)
    steps = sorted(by_step)
    layers = sorted({i for v in by_step.values() for i in v})
    grid = [[by_step[s].get(i, math.nan) for s in steps] for i in layers]
    return steps, layers, grid


def _heatmap(fig, ax, records, name, title, log=False, cmap="viridis"):
    import numpy as np
    from matplotlib.colors import LogNorm

    steps, layers, grid = layer_grid(records, name)
    values = np.array(grid, dtype=float)
    finite = values[np.isfinite(values)]
    norm = None
    if log and finite.size and (finite > 0).all() and finite.max() > finite.min():
        norm = LogNorm(vmin=finite.min(), vmax=finite.max())
    # Steps need not be evenly spaced (a resumed run, a change of logging_steps): pcolormesh places them.
    edges_x = _edges(steps)
    edges_y = np.arange(len(layers) + 1) - 0.5
    mesh = ax.pcolormesh(edges_x, edges_y, values, cmap=cmap, norm=norm, shading="flat")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(i) for i in layers] if len(layers) <= 32 else
                       [str(i) if k % max(1, len(layers) // 16) == 0 else "" for k, i in enumerate(layers)])
    ax.set_ylabel("expanded layer")
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.colorbar(mesh, ax=ax)


def _edges(steps: list[int]) -> list[float]:
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, title: str | None = None) -> str:
    """Write the dashboard PNG of the run in `run_dir` (default `run_dir/dashboard.png`); returns its path.

    Panels without data (no evaluation, no per-layer values, no budget) are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = read_metrics(run_dir)
    if not any("loss" in r for r in records):
        raise CheckpointError(f"the metrics of {os.fspath(run_dir)!r} hold no training record with a loss; nothing to plot")
    run_dir = os.fspath(run_dir)
    output = os.fspath(output) if output is not None else os.path.join(
        run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir) or ".", DASHBOARD)

    eval_keys = sorted({k for r in records for k, v in r.items()
                        if k.startswith("eval_") and k not in _EVAL_BOOKKEEPING and isinstance(v, (int, float))})
    panels = ["loss"]
    if _series(records, "alignment_loss")[0]:
        panels.append("alignment")
    heatmaps = [(name, label) for name, label in (
        ("w", "interpolation weight w"), ("w_std", "spread of w over tokens"), ("drift", "drift |h_e - h_p|^2 / |h_p|^2"),
        ("multiplier", "drift-budget multiplier")) if layer_grid(records, name)[0]]
    # The spread of w is all zeros for per-layer gates (lerp): no picture to show.
    if not any(v > 0 for row in layer_grid(records, "w_std")[2] for v in row):
        heatmaps = [(n, label) for n, label in heatmaps if n != "w_std"]
    panels += [f"heat:{name}" for name, _ in heatmaps]
    panels += [f"eval:{key}" for key in eval_keys]

    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 3.6 * rows), squeeze=False)
    labels = dict(heatmaps)
    for ax, panel in zip(axes.flat, panels):
        if panel == "loss":
            key = "lm_loss" if _series(records, "lm_loss")[0] else "loss"
            ax.plot(*_series(records, key), label="train LM loss" if key == "lm_loss" else "train loss")
            steps, values = _series(records, "eval_loss")
            if steps:
                ax.plot(steps, values, "o-", label="eval loss")
            ax.set_title("LM loss")
            ax.set_xlabel("step")
            ax.legend()
        elif panel == "alignment":
            steps, values = _series(records, "alignment_loss")
            ax.plot(steps, values, color="tab:red")
            if values and min(values) > 0:
                ax.set_yscale("log")
            ax.set_title("alignment loss (unweighted)")
            ax.set_xlabel("step")
        elif panel.startswith("heat:"):
            name = panel[5:]
            _heatmap(fig, ax, records, name, labels[name], log=name == "drift",
                     cmap="magma" if name == "drift" else "viridis")
        else:
            key = panel[5:]
            ax.plot(*_series(records, key), "o-", color="tab:green")
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("step")
        if not panel.startswith("heat:"):
            ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title or os.path.basename(os.path.abspath(run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir))))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


__all__ = ["plot_run", "read_metrics", "layer_grid"]


def plot_dial_curve(points: list[dict], chosen: float | None, output: str | os.PathLike, title: str | None = None,
                    budget: dict | None = None) -> str:
    """Draw a dial's gain-vs-forgetting curve (one point per dial value, labelled with it; the chosen
    value circled, the budget as a dashed line) to `output` (PNG); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    budget = budget or {}
    measures = [("kl", "KL to base on the keep data (nats/token)", budget.get("max_kl"))]
    if budget.get("max_keep_increase") is not None or budget.get("max_kl") is None:
        measures.append(("keep_increase", "keep data: bits/char increase", budget.get("max_keep_increase")))
    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4.2), squeeze=False)
    for ax, (key, label, limit) in zip(axes[0], measures):
        xs = [p[key] for p in points]
        ys = [p["gain"] for p in points]
        ax.plot(xs, ys, "-o", color="tab:blue", ms=4)
        for p in points:
            ax.annotate(f"{p['value']:g}", (p[key], p["gain"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if chosen is not None:
            pick = next(p for p in points if p["value"] == chosen)
            ax.plot([pick[key]], [pick["gain"]], "o", ms=13, mfc="none", mec="tab:red", mew=2,
                    label=f"chosen s = {chosen:g}")
            ax.legend(loc="lower right", fontsize=8)
        if limit is not None:
            ax.axvline(limit, color="tab:red", ls="--", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("gain: new data's bits/char drop")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "retention dial: gain against forgetting, one point per dial value s")
    fig.tight_layout()
    output = os.fspath(output)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
