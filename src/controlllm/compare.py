"""Compare fine-tuning methods on your own data before you choose one: forgetting at equal gain.

`compare` trains each method (default: full fine-tuning, LoRA, Control LLM's recommended preset)
over a small learning-rate grid on the new skill's training data, picks each method's rate on the
validation data only, scores every run along its dial (`controlllm.dial`: s = 0 is the base, s = 1
the trained model) on the test data (the gain: bits/char drop) and on the data to keep (the
forgetting: KL to the base, nats/token), and reads each method's Pareto frontier at 50 / 75 / 90% of
full fine-tuning's gain. Uncertainty comes from a bootstrap over test and keep items in which every
choice is made again (each method's rate on its validation resample, the reference's gain and so the
levels, the method with the least forgetting); a method is recommended only where that interval
excludes a tie. Each method's training time and peak memory stand beside its frontier: a user who
cannot afford full fine-tuning sees which affordable method keeps most.

Every finished run is a JSON record in the output folder (`runs/<method>@<lr>-seed<k>.json`), so a
comparison resumes where it stopped; the report is `compare.md`, `compare.json` and `compare.png`.

    from controlllm.compare import compare
    result = compare(train="train.jsonl", validation="val.jsonl", test="test.jsonl",
                     keep="general.txt", task="sft", output="runs/compare")

The analysis functions here (`pareto_envelope`, `on_envelope`, `verdict`, `choose_rate`,
`ratio_interval`) are shared with the retention benchmarks (benchmarks/retention/frontier_report.py).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import UsageError

LN2 = math.log(2.0)
LEVELS = (0.5, 0.75, 0.9)
BOOTSTRAP = 400
MIN_REACHED = 0.8  # share of resamples in which both rows must reach a level for a verdict
TASKS = ("cpt", "sft")
# Methods a comparison can train: TrainConfig overrides, and the default learning-rate grid.
METHODS = {
    "full": (dict(method="full"), (1e-5, 3e-5, 1e-4)),
    "lora": (dict(method="lora", lora_r=16, lora_alpha=32), (3e-4, 1e-3, 3e-3)),
    "control": (dict(method="control", preset="recommended"), (5e-5, 3e-4, 1e-3)),
    "freeze": (dict(method="freeze"), (3e-5, 1e-4, 3e-4)),
    "stack": (dict(method="stack"), (1e-4, 3e-4, 1e-3)),
    "control-paper-csft": (dict(method="control", preset="paper-csft"), (5e-5, 3e-4, 1e-3)),
    "control-paper-cpt": (dict(method="control", preset="paper-cpt"), (5e-5, 3e-4, 1e-3)),
}
DEFAULT_METHODS = ("full", "lora", "control")
REFERENCE = "full"  # its gain at s = 1, at its chosen rate, sets the equal-gain levels
DIAL_VALUES = (0.25, 0.5, 0.75, 1.0)


class CompareError(UsageError):
    """A comparison asked for something that cannot run (unknown method, missing file, bad grid)."""


# ---------------------------------------------------------------------------- frontier analysis
def pareto_envelope(gains, values) -> list[tuple[float, float]]:
    """Points (gain, forgetting) that no other point beats on both gain (higher or equal) and
    forgetting (lower or equal), by increasing gain; along it forgetting increases strictly too.
    Order plays no part: a method is credited with the least forgetting at which it reached a gain."""
    out, least = [], math.inf
    for g, v in sorted(zip(map(float, gains), map(float, values)), key=lambda p: (-p[0], p[1])):
        if v < least:
            out.append((g, v))
            least = v
    return out[::-1]


def on_envelope(gains, values, level: float) -> float | None:
    """Forgetting at gain `level` on the points' Pareto envelope, linear between the two envelope
    points around it; at or below the lowest-gain envelope point, that point's forgetting; None when
    no point reaches `level`."""
    env = pareto_envelope(gains, values)
    if not env or level > env[-1][0]:
        return None
    if level <= env[0][0]:
        return env[0][1]
    for (g0, v0), (g1, v1) in zip(env, env[1:]):
        if level <= g1:
            return v0 + (level - g0) / (g1 - g0) * (v1 - v0)
    return None


def verdict(diff: float | None, se: float | None) -> str | None:
    """A paired difference A - B with bootstrap SE `se`: 'below' when diff < -2 se, 'above' when
    diff > 2 se, else 'tied' (None without a difference)."""
    if diff is None:
        return None
    se = se or 0.0
    return "below" if diff < -2 * se else "above" if diff > 2 * se else "tied"


def choose_rate(scores: dict) -> tuple[float, list[float]]:
    """The learning rate with the best validation score (higher is better; ties go to the lower
    rate) and the other rates tied with it exactly: (rate, tied rates)."""
    best = max(sorted(scores), key=lambda lr: (scores[lr], -lr))
    return best, [lr for lr in sorted(scores) if lr != best and scores[lr] == scores[best]]


def ratio_interval(a: np.ndarray, b: np.ndarray, est_a: float | None, est_b: float | None) -> dict | None:
    """A / B on the estimate and its 95% percentile interval over paired resamples (where both
    are defined and B > 0) with `reached`, the share of resamples that have both; below MIN_REACHED
    the interval is there but no verdict rests on it."""
    if est_a is None or est_b is None or est_b <= 0:
        return None
    ok = ~(np.isnan(a) | np.isnan(b)) & (b > 0)
    out = {"ratio": est_a / est_b, "interval": None, "reached": float(ok.mean()) if len(ok) else 0.0}
    if ok.sum() > 1:
        r = a[ok] / b[ok]
        out["interval"] = [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]
    return out
