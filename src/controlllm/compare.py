"""Compare fine-tuning methods on your own data before you choose one: forgetting at equal gain.

`compare` trains each method (default: full fine-tuning, LoRA, Control LLM's recommended preset,
and for chats self-distillation fine-tuning, SDFT, through TRL: `controlllm.integrations.sdft`) over
a small learning-rate grid on the new skill's training data, picks each method's rate on the
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

from .errors import UsageError, UserError  # noqa: F401  (UserError: for callers)

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
    # Low-rank Control (`--copy-rank 16`): each copy its frozen layer plus rank-16 factors; LoRA's grid.
    "control-lowrank": (dict(method="control", preset="recommended", copy_rank=16, copy_alpha=32), (3e-4, 1e-3, 3e-3)),
    # Self-distillation fine-tuning (TRL's SDFTTrainer): every weight trained, like full; chats only.
    "sdft": (dict(method="sdft"), (1e-5, 3e-5, 1e-4)),
}
SFT_ONLY = ("sdft",)  # methods that learn from demonstrations (chats), not from plain text
DEFAULT_METHODS = {"sft": ("full", "lora", "control", "sdft"), "cpt": ("full", "lora", "control")}
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


# ------------------------------------------------------------------------------------ the plan
@dataclass
class CompareConfig:
    """What `compare` trains and scores. Files: text (.txt paragraphs or .jsonl "text") for cpt,
    chats (.jsonl "messages" or "prompt"/"response") for sft; `keep` is data of what to keep (text
    or chats), scored as KL to the base."""

    train: str
    validation: str
    test: str
    keep: str
    task: str = "sft"
    output: str = "runs/compare"
    model: str | None = None  # a model folder or .gguf; default SmolLM2-135M-Instruct
    methods: tuple | None = None  # default: DEFAULT_METHODS of the task
    rates: dict = field(default_factory=dict)  # {method: (lr, ...)}: overrides METHODS' grids
    seeds: tuple = (42,)
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    dial_values: tuple = DIAL_VALUES
    max_items: int | None = None  # cap on validation / test / keep items (None: all)
    units: int = 64  # test and keep items are scored in at most this many groups: the bootstrap's units
    bootstrap: int = BOOTSTRAP
    num_expanded_layers: int | None = None  # control / stack / freeze (default: the model's N // 4)
    bf16: bool = False
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.methods is None:
            self.methods = DEFAULT_METHODS.get(self.task, DEFAULT_METHODS["cpt"])
        self.methods = tuple(self.methods)

    def grid(self, method: str) -> tuple:
        return tuple(sorted(float(x) for x in self.rates.get(method, METHODS[method][1])))


def check_config(cfg: CompareConfig) -> None:
    """Raise CompareError on anything that would fail later: unknown task or method, a missing file,
    an empty grid, no seed, a dial value outside (0, 1]."""
    if cfg.task not in TASKS:
        raise CompareError(f"task {cfg.task!r} is not supported; allowed: {', '.join(TASKS)}")
    for name in ("train", "validation", "test", "keep"):
        path = getattr(cfg, name)
        if not path or not os.path.isfile(path):
            raise CompareError(f"--{name} {path!r} does not exist or is not a file")
    unknown = [m for m in (*cfg.methods, *cfg.rates) if m not in METHODS]
    if unknown or not cfg.methods:
        raise CompareError(f"method(s) {', '.join(map(repr, unknown)) or '(none)'} not supported; "
                           f"allowed: {', '.join(METHODS)}")
    text_only = [m for m in cfg.methods if m in SFT_ONLY and cfg.task != "sft"]
    if text_only:
        raise CompareError(f"method(s) {', '.join(map(repr, text_only))} learn from chats (--task sft) only; with "
                           f"--task {cfg.task} choose from: {', '.join(m for m in METHODS if m not in SFT_ONLY)}")
    for m in cfg.methods:
        grid = cfg.grid(m)
        if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid):
            raise CompareError(f"the learning-rate grid of {m} is {grid!r}; give one or more rates > 0")
    if not cfg.seeds:
        raise CompareError("give at least one seed")
    if any(not (0 < float(v) <= 1) for v in cfg.dial_values):
        raise CompareError(f"dial values {cfg.dial_values!r}: each must be in (0, 1]")
    for name in ("steps", "batch_size", "seq_len", "units", "bootstrap"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise CompareError(f"{name}={getattr(cfg, name)!r}: must be an integer >= 1")


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}@{lr:g}-seed{seed}"


def plan(cfg: CompareConfig) -> list[tuple[str, float, int]]:
    """Every run (method, lr, seed): each method's grid at every seed, the reference first."""
    methods = sorted(cfg.methods, key=lambda m: m != REFERENCE)
    return [(m, lr, seed) for seed in cfg.seeds for m in methods for lr in cfg.grid(m)]


def _file_key(path: str) -> dict:
    import hashlib

    with open(path, "rb") as f:
        return {"sha256": hashlib.sha256(f.read()).hexdigest()[:16], "bytes": os.path.getsize(path)}


def fingerprint(cfg: CompareConfig) -> dict:
    """What makes a run record reusable: the data, the model, the training budget, the scoring."""
    return {"data": {k: _file_key(getattr(cfg, k)) for k in ("train", "validation", "test", "keep")},
            "task": cfg.task, "model": cfg.model if isinstance(cfg.model, (str, type(None))) else "callable",
            "steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            "dial_values": [float(v) for v in cfg.dial_values], "max_items": cfg.max_items, "units": cfg.units,
            "num_expanded_layers": cfg.num_expanded_layers, "bf16": cfg.bf16}


# ------------------------------------------------------------------------------------ scoring
def _groups(items: list, n: int) -> list[list]:
    """`items` in n contiguous groups of near-equal size (no empty group)."""
    n = max(1, min(n, len(items)))
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def score_dial(dial, tokenizer, learn_groups: list[list[str]], keep_groups: list[list[str]], values,
               seq_len: int) -> list[dict]:
    """Per scoring unit (a group of learn texts paired with a group of keep texts; a keep group may
    be empty), for s = 0 and every dial value: the learn data's bits (summed) and characters, the
    keep data's KL summed over its tokens, its bits and characters. Every text is scored in one
    pass (`controlllm.dial.dial_text_scores`: the dial is set once per value and keep batch, not once
    per unit: with WiSE-FT every set rewrites all the weights), then summed per unit."""
    from .dial import dial_text_scores

    learn = [t for g in learn_groups for t in g]
    keep = [t for g in keep_groups for t in g]
    scores = dial_text_scores(dial, tokenizer, learn, keep, values=values, seq_len=seq_len)
    out, a, b = [], 0, 0
    for lg, kg in zip(learn_groups, keep_groups):
        li, ki = slice(a, a + len(lg)), slice(b, b + len(kg))
        a, b = a + len(lg), b + len(kg)
        # What the means divide by, as the scorer counted it (chats: answer tokens and characters).
        unit = {"learn_chars": int(sum(scores.learn_characters[li])), "keep_chars": int(sum(scores.keep_characters[ki])),
                "points": []}
        keep_tokens = int(scores.keep_tokens[ki].sum())
        for j, value in enumerate(scores.values):
            unit["points"].append({"value": value, "learn_bits": float(scores.learn_nll[j, li].sum()) / LN2,
                                   "keep_bits": float(scores.keep_nll[j, ki].sum()) / LN2,
                                   "kl_sum": float(scores.kl[j, ki].sum()), "keep_tokens": keep_tokens})
        out.append(unit)
    return out


class _PeakMemory:
    """Peak memory while the block runs: CUDA's peak allocation when training on a GPU, else the
    process's resident memory above where it started (sampled every 20 ms)."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.mib, self.kind = torch.cuda.max_memory_allocated() / 2**20, "cuda peak allocated"
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self.mib, self.kind = (self.peak - self.start) / 2**20, "CPU resident increase"
        return False


def _load(cfg: CompareConfig, loader: Callable | None):
    if loader is not None:
        return loader()
    from .assets import load_pretrained

    return load_pretrained(cfg.model)


def _texts(cfg: CompareConfig, tokenizer) -> dict:
    from .dial import read_eval_texts

    out = {k: read_eval_texts(getattr(cfg, k), tokenizer, limit=cfg.max_items) for k in ("validation", "test", "keep")}
    for k, v in out.items():
        if not [t for t in v if t]:
            raise CompareError(f"--{k} {getattr(cfg, k)!r} holds no text to score")
    return out


def train_and_score(cfg: CompareConfig, method: str, lr: float, seed: int, texts: dict,
                    loader: Callable | None = None) -> dict:
    """Train one run, then score it along its dial on test + keep data and at s = 1 on validation.
    SDFT trains through `controlllm.integrations.sdft` and is dialled like full fine-tuning."""
    import shutil

    import torch

    from .dial import Dial
    from .training.train import TrainConfig, train

    name = run_name(method, lr, seed)
    folder = os.path.join(cfg.output, "runs", name)
    shutil.rmtree(folder, ignore_errors=True)
    overrides = dict(METHODS[method][0])
    if overrides["method"] in ("control", "stack", "freeze") and cfg.num_expanded_layers is not None:
        overrides["num_expanded_layers"] = cfg.num_expanded_layers
    model, tokenizer = _load(cfg, loader)
    if overrides["method"] == "sdft":
        from .integrations.sdft import train_sdft
        from .training.data import read_chat_records

        conversations = read_chat_records(cfg.train)
        with _PeakMemory() as memory:  # the teacher (a second copy of the model) is part of its cost
            result = train_sdft(model, tokenizer, conversations, folder, lr=lr, steps=cfg.steps,
                                batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=seed, bf16=cfg.bf16,
                                threads=cfg.threads, progress=cfg.progress,
                                base=cfg.model if isinstance(cfg.model, str) else None, data=os.path.abspath(cfg.train))
    else:
        tcfg = TrainConfig(data=cfg.train, output=folder, task=cfg.task, lr=lr, seed=seed, max_steps=cfg.steps,
                           batch_size=cfg.batch_size, seq_len=cfg.seq_len, save_steps=cfg.steps, save_total_limit=1,
                           logging_steps=max(1, cfg.steps // 10), bf16=cfg.bf16, threads=cfg.threads,
                           progress=cfg.progress, **overrides)
        with _PeakMemory() as memory:
            result = train(tcfg, model=model, tokenizer=tokenizer)
    trained = result.model
    trained.eval()
    base = None
    if overrides["method"] in ("full", "freeze", "sdft"):
        base, _ = _load(cfg, loader)
        base.to(next(trained.parameters()).device).eval()
    dial = Dial(trained, base=base)
    start = time.time()
    units = min(cfg.units, len(texts["test"]), len(texts["keep"]))  # as many test groups as keep groups: none dropped
    test = score_dial(dial, tokenizer, _groups(texts["test"], units), _groups(texts["keep"], units),
                      cfg.dial_values, cfg.seq_len)
    val_groups = _groups(texts["validation"], cfg.units)  # the gain at s = 1 only (one keep text: the scorer needs one)
    val = score_dial(dial, tokenizer, val_groups, [texts["keep"][:1]] + [[]] * (len(val_groups) - 1), (1.0,),
                     cfg.seq_len)
    record = {"name": name, "method": method, "lr": lr, "seed": seed, "fingerprint": fingerprint(cfg),
              "dial_kind": dial.kind, "train_seconds": round(result.seconds, 2),
              "score_seconds": round(time.time() - start, 2), "peak_memory_mib": round(memory.mib, 1),
              "memory_kind": memory.kind, "trainable_parameters": result.trainable_parameters,
              "test": test, "validation": [{"learn_chars": u["learn_chars"], "points": [
                  {k: p[k] for k in ("value", "learn_bits")} for p in u["points"]]} for u in val]}
    shutil.rmtree(folder, ignore_errors=True)
    del result, trained, dial, base, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


# ----------------------------------------------------------------------------------- analysis
class _Run:
    """One record's scores as arrays over scoring units (rows) and dial points (columns)."""

    def __init__(self, record: dict):
        test, val = record["test"], record["validation"]
        self.values = [p["value"] for p in test[0]["points"]]
        self.learn_bits = np.array([[p["learn_bits"] for p in u["points"]] for u in test])
        self.learn_chars = np.array([u["learn_chars"] for u in test], float)
        self.kl_sum = np.array([[p["kl_sum"] for p in u["points"]] for u in test])
        self.keep_tokens = np.array([u["points"][0]["keep_tokens"] for u in test], float)
        self.keep_bits = np.array([[p["keep_bits"] for p in u["points"]] for u in test])
        self.keep_chars = np.array([u["keep_chars"] for u in test], float)
        self.val_bits = np.array([[p["learn_bits"] for p in u["points"]] for u in val])  # (V, [s=0, s=1])
        self.val_chars = np.array([u["learn_chars"] for u in val], float)

    def curve(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gain (bits/char), KL (nats/token) and keep bits/char increase at every dial point for the
        units `idx`."""
        lb, kl = self.learn_bits[idx].sum(0), self.kl_sum[idx].sum(0)
        kb = self.keep_bits[idx].sum(0)
        gain = (lb[0] - lb) / self.learn_chars[idx].sum()
        return gain, kl / max(self.keep_tokens[idx].sum(), 1e-9), (kb - kb[0]) / self.keep_chars[idx].sum()

    def validation(self, idx: np.ndarray) -> float:
        vb = self.val_bits[idx].sum(0)
        return float((vb[0] - vb[-1]) / self.val_chars[idx].sum())


def _evaluate(runs: dict, methods, seeds, reference: str, idx_t, idx_v) -> dict:
    """Every choice for one resample (or the estimate): each method's rate on validation (mean over
    seeds; ties to the lower rate), the reference's gain at s = 1 and the levels, each method's KL on
    its frontier at each level (mean over seeds; None unless every seed reaches it)."""
    out = {"rates": {}, "ties": {}, "kl": {}, "curves": {}}
    for m in methods:
        scores = {lr: float(np.mean([runs[(m, lr, s)].validation(idx_v) for s in seeds]))
                  for lr in sorted({k[1] for k in runs if k[0] == m})}
        out["rates"][m], out["ties"][m] = choose_rate(scores)
        out["curves"][m] = [runs[(m, out["rates"][m], s)].curve(idx_t) for s in seeds]
    ref_gain = float(np.mean([c[0][-1] for c in out["curves"][reference]]))
    out["reference_gain"] = ref_gain
    out["levels"] = [f * ref_gain for f in LEVELS] if ref_gain > 0 else []
    for m in methods:
        cells = []
        for level in out["levels"]:
            reads = [on_envelope(g, kl, level) for g, kl, _ in out["curves"][m]]
            cells.append(None if any(r is None for r in reads) else float(np.mean(reads)))
        out["kl"][m] = cells
    return out


def analyse(records: dict, cfg: CompareConfig, seed: int = 0) -> dict:
    """The comparison from the run records ({name: record}): per method its chosen rate, its end
    point, cost and frontier; at each equal-gain level every method's KL with its 95% bootstrap
    interval (rates, the reference's gain and the best method re-chosen in each resample), how often
    each method is best, and a recommendation only where the best method's margin over the runner-up
    excludes 0."""
    methods = [m for m in cfg.methods if all((run_name(m, lr, s) in records) for lr in cfg.grid(m) for s in cfg.seeds)]
    reference = REFERENCE if REFERENCE in methods else (methods[0] if methods else None)
    out = {"methods": methods, "reference": reference, "levels": [], "table": {}, "equal_gain": [],
           "missing": [run_name(*k) for k in plan(cfg) if run_name(*k) not in records]}
    if not methods:
        return out
    runs = {(m, lr, s): _Run(records[run_name(m, lr, s)]) for m in methods for lr in cfg.grid(m) for s in cfg.seeds}
    first = next(iter(runs.values()))
    n_t, n_v = len(first.learn_chars), len(first.val_chars)
    est = _evaluate(runs, methods, cfg.seeds, reference, np.arange(n_t), np.arange(n_v))
    rng = np.random.default_rng(seed)
    reps = [_evaluate(runs, methods, cfg.seeds, reference, rng.integers(0, n_t, n_t), rng.integers(0, n_v, n_v))
            for _ in range(cfg.bootstrap)]
    out["levels"], out["reference_gain"] = est["levels"], est["reference_gain"]
    for m in methods:
        lr = est["rates"][m]
        recs = [records[run_name(m, lr, s)] for s in cfg.seeds]
        gains, kls, keeps = zip(*est["curves"][m])
        out["table"][m] = {
            "lr": lr, "validation_ties": est["ties"][m], "grid": list(cfg.grid(m)),
            "edge": ("bottom" if lr == min(cfg.grid(m)) else "top" if lr == max(cfg.grid(m)) else None)
            if len(cfg.grid(m)) > 1 else None,
            "rate_chosen_share": float(np.mean([r["rates"][m] == lr for r in reps])),
            "gain_end": float(np.mean([g[-1] for g in gains])), "kl_end": float(np.mean([k[-1] for k in kls])),
            "keep_bpc_end": float(np.mean([k[-1] for k in keeps])),
            "train_seconds": float(np.mean([r["train_seconds"] for r in recs])),
            "peak_memory_mib": float(max(r["peak_memory_mib"] for r in recs)), "memory_kind": recs[0]["memory_kind"],
            "trainable_parameters": recs[0]["trainable_parameters"], "dial_kind": recs[0]["dial_kind"],
            "points": [{"seed": s, "value": runs[(m, lr, s)].values, "gain": [float(x) for x in g],
                        "kl": [float(x) for x in k]}
                       for s, g, k in zip(cfg.seeds, gains, kls)]}
    for i, frac in enumerate(LEVELS[:len(out["levels"])]):
        level = {"share": frac, "gain": out["levels"][i], "methods": {}}
        kl_est = {m: est["kl"][m][i] for m in methods}
        reached = {m: v for m, v in kl_est.items() if v is not None}
        kl_b = {m: np.array([np.nan if r["kl"][m][i] is None else r["kl"][m][i] for r in reps], float) for m in methods}
        winners = [min((m for m in methods if not np.isnan(kl_b[m][b])), key=lambda m: kl_b[m][b], default=None)
                   for b in range(len(reps))]
        for m in methods:
            ok = kl_b[m][~np.isnan(kl_b[m])]
            level["methods"][m] = {"kl": kl_est[m], "reached": float(len(ok) / len(reps)),
                                   "interval": [float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))]
                                   if len(ok) > 1 else None,
                                   "best_share": float(np.mean([w == m for w in winners]))}
        best = min(reached, key=reached.get) if reached else None
        level["best"] = best
        if best is not None and len(methods) > 1:
            others = [m for m in methods if m != best]
            margin = np.array([np.nanmin([kl_b[o][b] for o in others]) - kl_b[best][b]
                               if not np.isnan(kl_b[best][b]) and not all(np.isnan(kl_b[o][b]) for o in others)
                               else np.nan for b in range(len(reps))])
            ok = margin[~np.isnan(margin)]
            level["margin_interval"] = ([float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))]
                                        if len(ok) > 1 else None)
            level["margin_reached"] = float(len(ok) / len(reps))
            sure = (level["margin_interval"] is not None and level["margin_interval"][0] > 0
                    and level["margin_reached"] >= MIN_REACHED)
            level["recommend"] = best if sure else None
            level["tied"] = [] if sure else [m for m in others if kl_est[m] is not None]
        out["equal_gain"].append(level)
    return out


# ------------------------------------------------------------------------------------- output
def _fmt(x, f="{:.4f}"):
    return "-" if x is None else f.format(x)


def markdown(an: dict, cfg: CompareConfig) -> str:
    """compare.md: the plan, each method's chosen rate, end point and cost, the equal-gain table
    with intervals and the recommendation (or the tie)."""
    lines = ["# Forgetting at equal gain: " + ", ".join(cfg.methods), "",
             f"Task {cfg.task}; train `{cfg.train}`, validation `{cfg.validation}`, test `{cfg.test}`, keep "
             f"`{cfg.keep}`; model {cfg.model or 'default'}; {cfg.steps} steps x {cfg.batch_size}; seeds "
             f"{', '.join(map(str, cfg.seeds))}; dial values {', '.join(f'{v:g}' for v in cfg.dial_values)}.", "",
             "Gain: the test data's bits/char drop from the base; forgetting: KL(base || model) on the keep data "
             "(nats/token). Each method's rate is chosen on validation (gain at s = 1, ties to the lower rate); its "
             "frontier is the Pareto envelope of its dial points (s = 0 is the base). Intervals: 95% over "
             f"{cfg.bootstrap} bootstrap resamples of the test/keep and validation items in which every choice is "
             "made again (each rate, the reference's gain, the best method).", ""]
    if an["missing"]:
        lines += [f"Unfinished runs: {len(an['missing'])} ({', '.join(an['missing'][:6])}"
                  + (", ..." if len(an["missing"]) > 6 else "") + ").", ""]
    if not an["methods"]:
        return "\n".join(lines) + "\n"
    lines += ["| method | chosen lr | gain @ s=1 | KL @ s=1 | keep bpc Δ @ s=1 | train s | peak memory MiB | trainable |",
              "|---|---|---|---|---|---|---|---|"]
    for m, t in an["table"].items():
        notes = ([f"{t['edge']} of the grid"] if t["edge"] else []) + (
            [f"tied on validation with {', '.join(f'{x:g}' for x in t['validation_ties'])}"] if t["validation_ties"] else []
        ) + [f"chosen in {t['rate_chosen_share']:.0%} of resamples"]
        lines.append(f"| {m} | {t['lr']:g} ({'; '.join(notes)}) | {t['gain_end']:.4f} | {t['kl_end']:.4f} | "
                     f"{t['keep_bpc_end']:+.4f} | {t['train_seconds']:.0f} | {t['peak_memory_mib']:.0f} | "
                     f"{t['trainable_parameters']:,} |")
    memory_kind = next(iter(an["table"].values()))["memory_kind"]
    lines += ["", f"Peak memory: {memory_kind} during training.", ""]
    if not an["levels"]:
        lines += [f"No equal-gain comparison: the reference ({an['reference']}) gained nothing at s = 1.", ""]
        return "\n".join(lines) + "\n"
    lines += [f"## At equal gain (reference: {an['reference']}, gain {an['reference_gain']:.4f} at s = 1)", "",
              "| method | " + " | ".join(f"KL @ {int(lv['share'] * 100)}% ({lv['gain']:.4f})" for lv in an["equal_gain"])
              + " |", "|---|" + "---|" * len(an["equal_gain"])]
    for m in an["methods"]:
        cells = []
        for lv in an["equal_gain"]:
            c = lv["methods"][m]
            cells.append("not reached" if c["kl"] is None else f"{c['kl']:.4f}"
                         + (f" [{c['interval'][0]:.4f}, {c['interval'][1]:.4f}]" if c["interval"] else "")
                         + f", best in {c['best_share']:.0%}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [""]
    for lv in an["equal_gain"]:
        head = f"- At {int(lv['share'] * 100)}% of the gain: "
        if lv.get("best") is None:
            lines.append(head + "no method reaches it.")
        elif lv.get("recommend"):
            lo, hi = lv["margin_interval"]
            lines.append(head + f"**{lv['recommend']}** forgets least; its margin over the runner-up is "
                         f"{lo:.4f} to {hi:.4f} nats/token (95%), excluding a tie.")
        elif len(an["methods"]) == 1:
            lines.append(head + f"{lv['best']} (one method: nothing to compare).")
        else:
            mi = lv.get("margin_interval")
            lines.append(head + f"tie: {lv['best']} has the least KL on the estimate, but its margin over the "
                         "runner-up " + (f"is {mi[0]:.4f} to {mi[1]:.4f} (95%), which includes 0"
                                         if mi else "cannot be estimated") + f"; tied: {', '.join(lv['tied']) or '-'}."
                         " No recommendation.")
    lines += ["", "![frontiers](compare.png)", ""]
    return "\n".join(lines) + "\n"


def plot(path: str, an: dict) -> None:
    """compare.png: each method's dial points and frontier at its chosen rate (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for m, t in an["table"].items():
        p = t["points"][0]
        env = pareto_envelope(p["gain"], p["kl"])
        line, = ax.plot([g for g, _ in env], [v for _, v in env], "-", lw=1.4,
                        label=f"{m} @ {t['lr']:g} ({t['train_seconds']:.0f} s, {t['peak_memory_mib']:.0f} MiB)")
        ax.plot(p["gain"], p["kl"], "o", color=line.get_color(), ms=4)
    for lv in an["levels"]:
        ax.axvline(lv, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("gain: test bits/char drop")
    ax.set_ylabel("forgetting: KL to the base on keep data (nats/token)")
    ax.legend(fontsize=7)
    ax.set_title("Frontiers along each method's dial; dotted: 50/75/90% of the reference's gain", fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def report(records: dict, cfg: CompareConfig) -> dict:
    """Write compare.md / compare.json / compare.png in cfg.output from the records; returns the analysis."""
    an = analyse(records, cfg)
    _write(os.path.join(cfg.output, "compare.json"), json.dumps(
        {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model" or isinstance(v, (str, type(None)))},
         "analysis": an}, indent=1, default=float))
    _write(os.path.join(cfg.output, "compare.md"), markdown(an, cfg))
    if an["table"]:
        plot(os.path.join(cfg.output, "compare.png"), an)
    return an


# --------------------------------------------------------------------------------------- entry
def _read_record(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def compare(train: str | None = None, validation: str | None = None, test: str | None = None,
            keep: str | None = None, config: CompareConfig | None = None, loader: Callable | None = None,
            **options) -> dict:
    """Train every method of the plan over its learning-rate grid (at every seed), score each run
    along its dial, and write the comparison (compare.md / .json / .png) to `output`.

    Give the four data files and any CompareConfig field as keywords, or a CompareConfig. Finished
    runs are read back from `output/runs/<method>@<lr>-seed<k>.json` when their data, model and
    budget match, so an interrupted comparison resumes. `loader` (tests, notebooks): a callable
    returning a fresh (model, tokenizer) for each run, instead of loading `model`. Returns the
    analysis (see `analyse`). Raises CompareError on a bad plan before anything trains.
    """
    cfg = config or CompareConfig(train=train, validation=validation, test=test, keep=keep, **options)
    check_config(cfg)
    os.makedirs(os.path.join(cfg.output, "runs"), exist_ok=True)
    key = fingerprint(cfg)
    _, tokenizer = _load(cfg, loader)
    texts = _texts(cfg, tokenizer)
    records, todo = {}, plan(cfg)
    for k, (method, lr, seed) in enumerate(todo, 1):
        name = run_name(method, lr, seed)
        path = os.path.join(cfg.output, "runs", f"{name}.json")
        done = _read_record(path)
        if done and done.get("fingerprint") == key:
            records[name] = done
            print(f"[{k}/{len(todo)}] {name}: finished earlier", flush=True)
            continue
        print(f"[{k}/{len(todo)}] {name}: training {cfg.steps} steps, then scoring its dial", flush=True)
        record = train_and_score(cfg, method, lr, seed, texts, loader)
        _write(path, json.dumps(record))
        records[name] = record
        print(f"[{k}/{len(todo)}] {name}: trained in {record['train_seconds']:.0f} s, "
              f"peak memory {record['peak_memory_mib']:.0f} MiB, scored in {record['score_seconds']:.0f} s", flush=True)
        report(records, cfg)
    an = report(records, cfg)
    print(f"comparison written to {os.path.join(cfg.output, 'compare.md')}", flush=True)
    return an


def add_arguments(parser) -> None:
    """The `controlllm compare` flags, added to an argparse parser."""
    parser.add_argument("--train", required=True, help="the new skill's training data (text for cpt, chats for sft)")
    parser.add_argument("--validation", required=True, help="its validation data: chooses each method's rate")
    parser.add_argument("--test", required=True, help="its test data: the gain")
    parser.add_argument("--keep", required=True, help="data of what to keep (general text or chats): the forgetting")
    parser.add_argument("--task", choices=TASKS, default="sft", help="cpt (text) or sft (chats); default sft")
    parser.add_argument("--output", default="runs/compare", help="folder for the run records and the report")
    parser.add_argument("--model", default=None, help="model folder or .gguf (default SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, of: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS['sft'])} "
                             f"for sft, {','.join(DEFAULT_METHODS['cpt'])} for cpt; {', '.join(SFT_ONLY)}: sft only)")
    parser.add_argument("--rates", action="append", default=[], metavar="METHOD=LR,LR",
                        help="a method's learning-rate grid (repeatable), e.g. full=1e-5,3e-5")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds (each multiplies the grid)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dial-values", default=",".join(f"{v:g}" for v in DIAL_VALUES),
                        help="dial values scored per run, in (0, 1]")
    parser.add_argument("--max-items", type=int, default=None, help="cap on validation / test / keep items")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="bootstrap resamples")
    parser.add_argument("--num-expanded-layers", type=int, default=None, help="control / stack / freeze layers")
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _floats(text: str, flag: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CompareError(f"{flag} {text!r}: give comma-separated numbers") from None


def config_from_args(args) -> CompareConfig:
    """A CompareConfig from `add_arguments`' flags."""
    rates = {}
    for item in args.rates:
        method, sep, grid = item.partition("=")
        if not sep:
            raise CompareError(f"--rates {item!r}: write METHOD=LR,LR (e.g. full=1e-5,3e-5)")
        rates[method.strip()] = _floats(grid, "--rates")
    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        raise CompareError(f"--seeds {args.seeds!r}: give comma-separated integers") from None
    return CompareConfig(train=args.train, validation=args.validation, test=args.test, keep=args.keep,
                         task=args.task, output=args.output, model=args.model,
                         methods=None if args.methods is None else tuple(m.strip() for m in args.methods.split(",")
                                                                         if m.strip()), rates=rates,
                         seeds=seeds, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         dial_values=_floats(args.dial_values, "--dial-values"), max_items=args.max_items,
                         bootstrap=args.bootstrap, num_expanded_layers=args.num_expanded_layers, bf16=args.bf16,
                         threads=args.threads, progress=not args.no_progress)


def run_from_args(args) -> int:
    """Run `controlllm compare` from parsed flags; 0 on success."""
    compare(config=config_from_args(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m controlllm.compare ...` (the same flags as `controlllm compare`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="controlllm compare", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
