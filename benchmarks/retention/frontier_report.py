"""Analysis and report of the method + dial frontier benchmark (frontier.py).

Rules, stated once (they are repeated in the report):
- A run's points: the base model (s = 0), the half-way checkpoint, the end (s = 1) and the dial
  at the end (s in the plan's dial points). A method's frontier is the Pareto envelope of its
  points (retention_report.pareto_envelope), read at a gain by linear interpolation between the
  envelope points around it (retention_report.on_envelope).
- A method's learning rate is the grid rate with the best validation gain at s = 1 (cpt: the lowest
  Spanish validation bits/char; csft: the highest validation exact match, ties to the lower rate).
  Full fine-tuning (the reference) is not left at the edge of its grid: where validation chooses
  its lowest (highest) grid rate, one more run at 1e-5 (1e-3) is made and the choice is made again
  over the four rates (once; "beyond the grid" in the table). Every other family chosen at the edge
  of its grid gets one run beyond it too (a third of its lowest rate, or three times its highest),
  shown as a row of its own ("<family>-beyond"); its choice stays on its grid, and the table says
  where validation prefers the run beyond.
- The reference is full fine-tuning at its chosen rate; the equal-gain levels are 50%, 75% and 90%
  of its gain at s = 1.
- Uncertainty: 400 bootstrap resamples of the test items, shared by every run and the base model;
  the levels move with the reference in each resample. "Tied" with the best row at a level: the
  paired bootstrap difference is within 2 of its SEs; "uncertain": the two rows reach the level
  together in fewer than 80% of the resamples (no SE, no verdict).
- Seeds: the headline rows at 3 seeds (data order and initialisation); a verdict between two rows
  holds across seeds when the difference has the same sign at every seed.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from controlllm.compare import choose_rate, on_envelope, pareto_envelope, ratio_interval, verdict as compare
from retention_report import _atomic_text, _jsonable, _sd, save_figure

LN2 = math.log(2)
BOOTSTRAP = 400
LEVELS = (0.5, 0.75, 0.9)
MIN_REACHED = 0.8  # share of resamples in which a row must reach a level for an SE and a verdict
# The paper's claim, read on the frontier: 90% of full fine-tuning's gain at no more than 25% of its
# forgetting (KL at s = 1).
CLAIM_GAIN, CLAIM_LOSS = 0.9, 0.25
# Rows run at 3 seeds: full at its chosen rate, gentle full (its grid's lowest rate), LoRA, and the
# Control family with the least KL on its frontier (best_control, among the full-copy Control presets;
# chosen on the test frontier, which favours Control).
SEEDED = ("full", "full-gentle", "lora-r16", "control-best")
# A family chosen at the edge of its grid gets one run at the rate below (above) it, once. The reference
# (full fine-tuning) defines the equal-gain levels, so its choice is then made again over the grid and that
# rate (RECHOOSE); every other family keeps its grid's choice and shows the run beyond as a row of its own.
# {family: (below, above)}; families not listed: a third of the lowest rate, three times the highest.
BEYOND = {"full": (1e-5, 1e-3)}
RECHOOSE = ("full",)


def beyond_pair(family: str, rates) -> tuple[float, float]:
    """The rates one step below and above `family`'s grid (BEYOND, else / 3 and x 3, two significant digits)."""
    return BEYOND.get(family) or (float(f"{min(rates) / 3:.2g}"), float(f"{max(rates) * 3:.2g}"))
MEASURES = {"kl": "KL(base || model) on English, nats/token", "english": "English bits/char increase"}
GAIN_LABEL = {"cpt": "Spanish bits/char gain (base - run)", "csft": "arithmetic exact-match gain (run - base)"}
SETTING = {"cpt": "continued pre-training on Spanish", "csft": "continued SFT on arithmetic (gold answers)"}


# ----------------------------------------------------------------------------------- points
def _arrays(point: dict, experiment: str) -> dict:
    out = {"en_nll": np.array(point["english"]["nll"]), "en_chars": np.array(point["english"]["chars"], float),
           "kl": np.array(point["english"]["kl"]), "tokens": np.array(point["english"]["tokens"], float)}
    if experiment == "cpt":
        out["sp_nll"] = np.array(point["spanish"]["nll"])
        out["sp_chars"] = np.array(point["spanish"]["chars"], float)
    else:
        out["arith"] = np.array(point["arith"]["correct"], float)
    return out


def _values(a: dict, base: dict, idx: dict, experiment: str) -> dict:
    """Gain and forgetting of one point for item resamples idx (rows = replicates)."""
    sk, en = idx["skill"], idx["en"]
    if experiment == "cpt":
        gain = (base["sp_nll"][sk].sum(-1) - a["sp_nll"][sk].sum(-1)) / LN2 / base["sp_chars"][sk].sum(-1)
    else:
        gain = (a["arith"][sk] - base["arith"][sk]).mean(-1)
    return {"gain": gain, "kl": a["kl"][en].sum(-1) / a["tokens"][en].sum(-1),
            "english": (a["en_nll"][en].sum(-1) - base["en_nll"][en].sum(-1)) / LN2 / base["en_chars"][en].sum(-1)}


def run_points(run: dict, base_point: dict) -> list[dict]:
    """The run's points: the base (s = 0), its checkpoints and its dial points, labelled."""
    last = run["checkpoints"][-1]["step"]
    out = [dict(base_point, label="base", kind="base")]
    for c in run["checkpoints"]:
        out.append(dict(c, label="end" if c["step"] == last else f"step {c['step']}", kind="trajectory"))
    for d in run.get("dial", []):
        out.append(dict(d, label=f"s {d['value']:g}", kind="dial"))
    return out


def validation_gain(experiment: str, run: dict) -> float:
    """The new skill on validation at s = 1 (higher is better)."""
    end = run["checkpoints"][-1]
    return -end["spanish_val"]["bpc"] if experiment == "cpt" else end["arith_val"]["exact_match"]


def grid_names(family: str, runs: dict) -> dict:
    """The family's grid runs at the first seed, without mixed data (the run beyond the grid too): {lr: name}."""
    return {r["lr"]: n for n, r in runs.items() if r.get("family") == family and n.startswith(f"{family}@")
            and "-seed" not in n and not r.get("mix") and not r.get("failed")
            and (n.split("@")[1][0].isdigit() or n.split("@")[1] == "beyond")}


def grid_runs(family: str, runs: dict) -> dict:
    """grid_names' runs: {lr: run}."""
    return {lr: runs[n] for lr, n in grid_names(family, runs).items()}


def _best_on_validation(experiment: str, rates, grid: dict) -> float:
    return choose_rate({lr: validation_gain(experiment, grid[lr]) for lr in rates})[0]


def validation_ties(experiment: str, family: str, rates, runs: dict) -> list[float]:
    """The rates whose validation gain equals the chosen rate's (the choice between them was the
    tie rule: the lower rate)."""
    grid, tried = grid_runs(family, runs), rates_of(experiment, family, rates, runs)
    if any(lr not in grid for lr in tried):
        return []
    return choose_rate({lr: validation_gain(experiment, grid[lr]) for lr in tried})[1]


def beyond_rate(experiment: str, family: str, rates, runs: dict) -> float | None | bool:
    """The rate beyond the edge of `family`'s grid that validation chose (beyond_pair), False when no
    such run is needed (an inner rate chosen, or a grid of one rate), None until the grid has finished."""
    if len(rates) < 2:
        return False
    grid = grid_runs(family, runs)
    if any(lr not in grid for lr in rates):
        return None
    first = _best_on_validation(experiment, rates, grid)
    below, above = beyond_pair(family, rates)
    return below if first == min(rates) else above if first == max(rates) else False


def chosen_rate(experiment: str, family: str, rates, runs: dict) -> float | None:
    """The grid rate with the best validation gain at s = 1 (ties: the lower rate), for the reference
    over its grid and the rate beyond the edge validation chose; None until those runs have finished."""
    grid, tried = grid_runs(family, runs), rates_of(experiment, family, rates, runs)
    if any(lr not in grid for lr in tried):
        return None
    return _best_on_validation(experiment, tried, grid)


def rates_of(experiment: str, family: str, rates, runs: dict) -> tuple:
    """The rates the family's choice is made over: its grid, plus (for the reference, RECHOOSE) the rate
    beyond its edge where one is needed."""
    if family not in RECHOOSE:
        return tuple(sorted(rates))
    extra = beyond_rate(experiment, family, rates, runs)
    return tuple(sorted(tuple(rates) + ((extra,) if extra not in (False, None) else ())))


# --------------------------------------------------------------------------------- analysis
class Curves:
    """Every run's points as estimates and bootstrap replicates, sharing one item resampling."""

    def __init__(self, experiment: str, base: dict, runs: dict, seed: int = 0):
        self.experiment = experiment
        base_point = base[experiment]
        self.base = _arrays(base_point, experiment)
        n_sk = len(self.base["sp_nll"] if experiment == "cpt" else self.base["arith"])
        n_en = len(self.base["en_nll"])
        rng = np.random.default_rng(seed)
        identity = {"skill": np.arange(n_sk)[None], "en": np.arange(n_en)[None]}
        boot = {"skill": rng.integers(0, n_sk, (BOOTSTRAP, n_sk)), "en": rng.integers(0, n_en, (BOOTSTRAP, n_en))}
        self.points, self.est, self.reps = {}, {}, {}
        for name, run in runs.items():
            if run.get("failed"):
                continue
            pts = run_points(run, base_point)
            est = {k: [] for k in ("gain", *MEASURES)}
            reps = {k: [] for k in est}
            for p in pts:
                arr = _arrays(p, experiment)
                v, b = _values(arr, self.base, identity, experiment), _values(arr, self.base, boot, experiment)
                for k in est:
                    est[k].append(float(v[k][0]))
                    reps[k].append(b[k])
            self.est[name] = {k: np.array(v) for k, v in est.items()}
            self.reps[name] = {k: np.stack(v, 1) for k, v in reps.items()}  # (B, points)
            self.points[name] = [{"label": p["label"], "kind": p["kind"], **{k: self.est[name][k][i] for k in est},
                                  **{f"{k}_se": float(self.reps[name][k][:, i].std(ddof=1)) for k in est}}
                                 for i, p in enumerate(pts)]

    def end(self, name: str, key: str, reps: bool = False):
        """The value at s = 1 (the run's end point)."""
        i = [p["label"] for p in self.points[name]].index("end")
        return self.reps[name][key][:, i] if reps else float(self.est[name][key][i])

    def read(self, name: str, measure: str, level: float, levels_b: np.ndarray) -> tuple[float | None, np.ndarray]:
        """Forgetting on the run's frontier at gain `level` (and per replicate at `levels_b`)."""
        est = on_envelope(self.est[name]["gain"], self.est[name][measure], level)
        b = [on_envelope(g, v, float(lv)) for g, v, lv in zip(self.reps[name]["gain"], self.reps[name][measure], levels_b)]
        return est, np.array([np.nan if x is None else x for x in b], float)


def _se(x: np.ndarray) -> float | None:
    """SE over the resamples that reach the level; None when fewer than MIN_REACHED of them do."""
    ok = x[~np.isnan(x)]
    return _sd(list(ok)) if len(ok) > 1 and len(ok) >= MIN_REACHED * len(x) else None


def rows_of(experiment: str, runs: dict, families) -> dict:
    """The frontier rows: each family at its chosen rate (seed 42), gentle full fine-tuning (its
    lowest rate) and the mixed-data rows; {row: run name}."""
    out = {}
    for family, (_, rates) in families.items():
        lr = chosen_rate(experiment, family, rates, runs)
        if lr is None:
            continue
        out[family] = grid_names(family, runs)[lr]
        if family == "full" and min(rates) != lr:
            out["full-gentle"] = f"full@{min(rates):g}"
        beyond = grid_names(family, runs).get(beyond_rate(experiment, family, rates, runs) or None)
        if beyond is not None and beyond != out[family]:
            out[f"{family}-beyond"] = beyond  # the run beyond the grid, not chosen: a row like the others
        if f"{family}@chosen-mix" in runs and not runs[f"{family}@chosen-mix"].get("failed"):
            out[f"{family} + mix"] = f"{family}@chosen-mix"
    return out


def analyse(experiment: str, base: dict, runs: dict, families, seeds) -> dict | None:
    """The grid table, the frontier rows at equal gain, the seed table and the verdict of one setting."""
    ok = {n: r for n, r in runs.items() if not r.get("failed")}
    curves = Curves(experiment, base, ok)
    grid = []
    for family, (_, rates) in families.items():
        chosen = chosen_rate(experiment, family, rates, ok)
        tried = rates_of(experiment, family, rates, ok)
        for lr, name in sorted(grid_names(family, ok).items()):
            run = ok[name]
            prefers = (lr not in rates and chosen is not None and lr != chosen and family not in RECHOOSE
                       and choose_rate({lr: validation_gain(experiment, run),
                                        chosen: validation_gain(experiment, ok[grid_names(family, ok)[chosen]])})[0] == lr)
            grid.append({"family": family, "lr": lr, "run": name, "chosen": lr == chosen, "beyond": lr not in rates,
                         "validation_prefers": prefers,
                         "val_tied_with": validation_ties(experiment, family, rates, ok) if lr == chosen else [],
                         "edge": ("top" if lr == max(tried) else "bottom" if lr == min(tried) else None)
                         if lr == chosen and len(tried) > 1 else None,
                         "val_gain": validation_gain(experiment, run), **end_summary(experiment, base, curves, run, name)})
    rows = rows_of(experiment, ok, families)
    reference_rates = {name: lr for lr, name in grid_names("full", ok).items()}
    out = {"grid": grid, "reference_rates": reference_rates, "rows": rows, "points": curves.points, "levels": [], "equal_gain": {}, "seeds": {},
           "failed": sorted(n for n, r in runs.items() if r.get("failed"))}
    if "full" not in rows:
        return out
    ref = rows["full"]
    ref_gain, ref_gain_b = curves.end(ref, "gain"), curves.end(ref, "gain", reps=True)
    if ref_gain <= 0:  # nothing learned: no gain levels to compare at
        out["reference"] = {"run": ref, "gain": ref_gain, "kl": curves.end(ref, "kl")}
        return out
    ref_kl, ref_kl_b = curves.end(ref, "kl"), curves.end(ref, "kl", reps=True)
    out["reference"] = {"run": ref, "gain": ref_gain, "kl": ref_kl}
    for frac in LEVELS:
        level, levels_b = frac * ref_gain, frac * ref_gain_b
        out["levels"].append(level)
        reads = {(row, m): curves.read(name, m, level, levels_b) for row, name in rows.items() for m in MEASURES}
        table = {}
        for m in MEASURES:
            reached = {row: reads[(row, m)] for row in rows if reads[(row, m)][0] is not None}
            best = min(reached, key=lambda r: reached[r][0]) if reached else None
            for row in rows:
                est, b = reads[(row, m)]
                cell = table.setdefault(row, {})
                cell[m] = est
                cell[f"{m}_se"] = _se(b) if est is not None else None
                if est is None or best is None:
                    continue
                if row == best:
                    cell[f"{m}_vs_best"] = "best"
                    continue
                diff = b - reached[best][1]
                ok_b = ~np.isnan(diff)
                se = _sd(list(diff[ok_b])) if ok_b.mean() >= MIN_REACHED else None
                cell[f"{m}_diff_best"] = est - reached[best][0]
                cell[f"{m}_diff_best_se"] = se
                # no verdict where the two rows reach the level together in too few resamples
                cell[f"{m}_vs_best"] = compare(est - reached[best][0], se) if se is not None else "uncertain"
            if best is not None:
                table.setdefault("_best", {})[m] = best
        kl_ratio = {row: (table[row]["kl"] / ref_kl if table[row]["kl"] is not None and ref_kl > 0 else None)
                    for row in rows}
        for row in rows:
            table[row]["kl_ratio"] = kl_ratio[row]
        out["equal_gain"][f"{frac:g}"] = table
    out["claim"] = {row: {"kl_ratio_at_90": out["equal_gain"]["0.9"][row]["kl_ratio"],
                          "meets": (out["equal_gain"]["0.9"][row]["kl_ratio"] is not None
                                    and out["equal_gain"]["0.9"][row]["kl_ratio"] <= CLAIM_LOSS)}
                    for row in rows}
    out["ratios"] = control_ratios(curves, rows, out["levels"], ref_gain_b)
    out["claim_by_reference"] = claim_by_reference(experiment, curves, ok, rows, families)
    out["any_rate"] = any_rate(curves, ok, families, out["levels"])
    out["seeds"] = seed_table(experiment, curves, ok, rows, families, seeds, out["levels"])
    return out


def control_ratios(curves: Curves, rows: dict, levels, ref_gain_b: np.ndarray) -> dict:
    """Each Control row's KL over each full-fine-tuning row's and each SDFT row's (low-rank Control rows:
    and each LoRA row's) at every level, with the 95% paired bootstrap interval:
    {"<control> / <full>": [per level]}."""
    out = {}
    fulls = [r for r in rows if (r in ("full", "sdft") or r.startswith(("full-", "sdft-"))) and " + " not in r]
    loras = [r for r in rows if r.startswith("lora-") and " + " not in r]
    for c in (r for r in rows if r.startswith(("control-", "lowrank-control")) and " + " not in r):
        # low-rank copies are also read against LoRA, the method of their cost
        for f in fulls + (loras if c.startswith("lowrank-control") else []):
            cells = []
            for frac, level in zip(LEVELS, levels):
                a, b = curves.read(rows[c], "kl", level, frac * ref_gain_b), curves.read(rows[f], "kl", level, frac * ref_gain_b)
                cells.append(ratio_interval(a[1], b[1], a[0], b[0]))
            out[f"{c} / {f}"] = cells
    return out


def claim_by_reference(experiment: str, curves: Curves, runs: dict, rows: dict, families) -> dict:
    """The paper's claim read against every rate of full fine-tuning as the reference (the grid and
    the run beyond it): {lr: {"run", "gain", "meets": [rows with KL at 90% of that run's gain <= 0.25x
    its KL at s = 1]}}."""
    out = {}
    for lr, name in sorted(grid_names("full", runs).items()):
        gain, kl = curves.end(name, "gain"), curves.end(name, "kl")
        if gain <= 0 or kl <= 0:
            out[f"{lr:g}"] = {"run": name, "gain": gain, "meets": None}
            continue
        level = CLAIM_GAIN * gain
        meets = []
        for row, run in rows.items():
            if run == name:
                continue
            v = on_envelope(curves.est[run]["gain"], curves.est[run]["kl"], level)
            if v is not None and v / kl <= CLAIM_LOSS:
                meets.append(row)
        out[f"{lr:g}"] = {"run": name, "gain": gain, "meets": meets}
    return out


def end_summary(experiment: str, base: dict, curves: Curves, run: dict, name: str) -> dict:
    """A run at s = 1: gain, KL, English and the MC change, with SEs."""
    out = {k: curves.end(name, k) for k in ("gain", *MEASURES)}
    out.update({f"{k}_se": float(curves.end(name, k, reps=True).std(ddof=1)) for k in ("gain", *MEASURES)})
    mc = run["checkpoints"][-1].get("mc")
    if mc and base.get("mc"):
        b = base["mc"]["mc"] if "mc" in base["mc"] else base["mc"]
        changes = [np.mean(mc[t]["correct"]) - np.mean(b[t]["correct"]) for t in mc if t in b]
        out["mc_change"] = float(np.mean(changes)) if changes else None
    out["train_seconds"] = run.get("train_seconds")
    return out


def any_rate(curves: Curves, runs: dict, families, levels) -> dict:
    """KL at each level on the envelope of all of a family's grid points (an oracle learning rate)."""
    out = {}
    for family in families:
        names = list(grid_names(family, runs).values())
        if not names:
            continue
        g = np.concatenate([curves.est[n]["gain"] for n in names])
        v = np.concatenate([curves.est[n]["kl"] for n in names])
        out[family] = {"runs": len(names), "kl": [on_envelope(g, v, lv) for lv in levels]}
    return out


def seed_table(experiment: str, curves: Curves, runs: dict, rows: dict, families, seeds, levels) -> dict:
    """KL at each level per seed for the rows run at several seeds; mean and spread across seeds; for
    each pair of seeded rows whether the sign of their difference is the same at every seed."""
    seeded = {}
    for row in SEEDED:
        family = best_control(experiment, None, runs, None, curves=curves, rows=rows, families=families) \
            if row == "control-best" else ("full" if row == "full-gentle" else row)
        if family is None or row not in rows and row != "control-best":
            continue
        first = rows.get(row) if row != "control-best" else rows.get(family)
        tag = "lowest" if row == "full-gentle" else "chosen"
        job_family = "control-best" if row == "control-best" else family
        names = [first] + [f"{job_family}@{tag}-seed{s}" for s in seeds[1:]]
        label = f"{row} ({family})" if row == "control-best" else row
        per = {}
        for seed, name in zip(seeds, names):
            if name in curves.est:
                per[seed] = [on_envelope(curves.est[name]["gain"], curves.est[name]["kl"], lv) for lv in levels]
        seeded[label] = per
    out = {"rows": {}, "pairs": []}
    for label, per in seeded.items():
        vals = np.array([[np.nan if x is None else x for x in v] for v in per.values()], float)
        out["rows"][label] = {"seeds": sorted(per), "kl": {str(s): v for s, v in per.items()},
                              "reached": [int((~np.isnan(c)).sum()) for c in vals.T] if len(vals) else [],
                              "mean": [None if np.isnan(c).all() else float(np.nanmean(c)) for c in vals.T] if len(vals) else [],
                              "sd": [None if (~np.isnan(c)).sum() < 2 else float(np.nanstd(c, ddof=1)) for c in vals.T]
                              if len(vals) else []}
    labels = list(seeded)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            common = sorted(set(seeded[a]) & set(seeded[b]))
            if len(common) < 2:
                continue
            for k, lv in enumerate(levels):
                d = [seeded[a][s][k] - seeded[b][s][k] for s in common
                     if seeded[a][s][k] is not None and seeded[b][s][k] is not None]
                if len(d) == len(common):
                    out["pairs"].append({"a": a, "b": b, "level": lv, "seeds": len(common), "diffs": d,
                                         "holds": "a below" if all(x < 0 for x in d) else
                                         "a above" if all(x > 0 for x in d) else "mixed"})
    return out


def best_control(experiment: str, base: dict | None, runs: dict, settings, curves: Curves | None = None,
                 rows: dict | None = None, families=None) -> str | None:
    """The full-copy Control family (low-rank copies are a method of their own) whose chosen-rate run has
    the least KL at 75% of full fine-tuning's gain on its frontier (chosen on the test frontier: the choice favours Control); None until full
    fine-tuning's and every Control family's grids are finished."""
    families = families if families is not None else settings.families
    ok = {n: r for n, r in runs.items() if not r.get("failed")}
    rows = rows if rows is not None else rows_of(experiment, ok, families)
    controls = [f for f in families if families[f][0].get("method") == "control" and not families[f][0].get("copy_rank")]
    if "full" not in rows or any(f not in rows for f in controls) or not controls:
        return None
    curves = curves or Curves(experiment, base, {n: ok[n] for n in set(rows.values())})
    level_b = 0.75 * curves.end(rows["full"], "gain", reps=True)
    level = 0.75 * curves.end(rows["full"], "gain")
    reads = {f: curves.read(rows[f], "kl", level, level_b)[0] for f in controls}
    return min(controls, key=lambda f: (reads[f] is None, reads[f] if reads[f] is not None else 0.0, controls.index(f)))


# ----------------------------------------------------------------------------------- output
def headline(experiment: str, base: dict, run: dict) -> str:
    end = run["checkpoints"][-1]
    if experiment == "cpt":
        skill = f"Spanish bpc {base['cpt']['spanish']['bpc']:.3f} -> {end['spanish']['bpc']:.3f}" if "cpt" in base \
            else f"Spanish bpc {end['spanish']['bpc']:.3f}"
    else:
        skill = f"exact match {end['arith']['exact_match']:.3f}"
    return f"{skill}, KL {end['english']['kl_mean']:.4f}"


def rules() -> str:
    """The rules of this module's docstring, as a markdown list."""
    text = __doc__.split("(they are repeated in the report):\n", 1)[1]
    return "\n".join(line[2:] if line.startswith("  ") else line for line in text.strip().splitlines())


def _f(x, fmt="{:.4f}"):
    return "-" if x is None else fmt.format(x)


def _pm(x, se, fmt="{:.4f}"):
    return "-" if x is None else fmt.format(x) + ("" if se is None else f" ± {fmt.format(se)}")


def reading(an: dict) -> str:
    """One setting's frontier table in words: the row with the least KL at each level and the rows tied
    with it, the rows meeting the paper's claim, and where the Control rows stand."""
    parts = []
    for f in LEVELS:
        table = an["equal_gain"][f"{f:g}"]
        best = table.get("_best", {}).get("kl")
        if best is None:
            parts.append(f"at {int(f * 100)}% no row reaches the level")
            continue
        tied = [r for r in an["rows"] if table[r].get("kl_vs_best") == "tied"]
        parts.append(f"at {int(f * 100)}% {best} ({table[best]['kl']:.4f})" + (f", tied: {', '.join(tied)}" if tied else ""))
    meets = [f"{r} ({c['kl_ratio_at_90']:.2f})" for r, c in an["claim"].items() if c["meets"]]
    controls = [r for r in an["rows"] if r.startswith(("control-", "lowrank-control"))]
    on = [r for r in controls if any(an["equal_gain"][f"{f:g}"][r].get("kl_vs_best") in ("best", "tied") for f in LEVELS)]
    return ("Reading: least KL on the frontier " + "; ".join(parts) + ". Meets the paper's claim (<= "
            f"{CLAIM_LOSS:g}x at {int(CLAIM_GAIN * 100)}% of the gain): " + (", ".join(meets) if meets else "no row")
            + ". Control rows best or tied at some level: " + (", ".join(on) if on else "none") + ".")


def markdown(an_all: dict, settings, base: dict, command: str, done: int, total: int) -> str:
    lines = ["# Method + dial frontiers (SmolLM2-135M-Instruct)", "",
             f"Command: `{command}` ({done} of {total} planned runs finished"
             f"{'' if done < total else ', the plan is complete'}). Per-run records: "
             "`benchmarks/results/retention_runs/frontier/`; this file, the JSON and the plots are regenerated "
             "from them by `--report-only`.", "",
             f"Training: cpt {settings.cpt_steps} steps x {settings.cpt_batch} x {settings.cpt_seq} tokens of Spanish; "
             f"csft {settings.sft_steps} steps x {settings.sft_batch} arithmetic word problems; float32, one thread "
             f"per run. Test: {settings.spanish_test} Spanish texts, {settings.arith_test} arithmetic items (exact "
             f"match), {settings.english_texts} English texts (KL, bits/char), {settings.mc_items} items each of "
             "ARC-Easy, PIQA, HellaSwag at s = 1. Dial points: s = " + ", ".join(f"{s:g}" for s in settings.dial_points)
             + ".", "",
             "Rules:", "", rules(), ""]
    for experiment, an in an_all.items():
        lines += [f"## {experiment}: {SETTING[experiment]}", ""]
        b = base[experiment]
        skill = (f"Spanish test {b['spanish']['bpc']:.3f} bits/char" if experiment == "cpt"
                 else f"arithmetic exact match {b['arith']['exact_match']:.3f}")
        lines += [f"Base model: {skill}.", "", "### Learning-rate grids (s = 1; chosen on validation)", "",
                  "| family | lr | validation | gain | KL | English bpc Δ | MC acc Δ | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in an["grid"]:
            val = f"{-g['val_gain']:.4f} bpc" if experiment == "cpt" else f"{g['val_gain']:.3f} EM"
            notes = ([f"{g['edge']} of the grid"] if g.get("edge") else []) + (
                [f"tied on validation with {', '.join(f'{x:g}' for x in g['val_tied_with'])}: ties go to the lower rate"]
                if g.get("val_tied_with") else [])
            mark = (" **chosen**" + (f" ({'; '.join(notes)})" if notes else "")) if g["chosen"] else ""
            mark = (" (beyond the grid" + ("; validation prefers it to the chosen rate" if g.get("validation_prefers")
                                            else "") + ")" if g.get("beyond") else "") + mark
            lines.append(f"| {g['family']} | {g['lr']:g}{mark} | {val} | "
                         f"{_pm(g['gain'], g['gain_se'], '{:.3f}')} | {_pm(g['kl'], g['kl_se'])} | "
                         f"{_pm(g['english'], g['english_se'])} | {_f(g.get('mc_change'), '{:+.3f}')} | "
                         f"{_f(g.get('train_seconds'), '{:.0f}')} |")
        for edge, more in (("top", "higher"), ("bottom", "lower")):
            edges = [g["family"] for g in an["grid"] if g.get("edge") == edge]
            if edges:
                said = []
                for fam in edges:
                    past = [g for g in an["grid"] if g["family"] == fam and g.get("beyond")]
                    said.append(f"{fam} (" + (f"the {more} rate {past[0]['lr']:g}: validation "
                                              + ("prefers it" if past[0].get("validation_prefers") else "does not prefer it")
                                              if past else f"the run at a {more} rate is not finished") + ")")
                lines += ["", f"Chosen at the {edge} of its grid: {', '.join(said)}."]
        if not an.get("levels"):
            why = (f"full fine-tuning at its chosen rate ({an['reference']['run']}) gained nothing"
                   if an.get("reference") else "full fine-tuning's grid is not finished")
            lines += ["", f"No equal-gain comparison: {why}.", ""]
            continue
        ref = an["reference"]
        lines += ["", f"### Frontiers at equal gain (reference: {ref['run']}, gain {ref['gain']:.3f}, KL {ref['kl']:.4f} "
                  "at s = 1)", "",
                  "KL on each row's frontier (trajectory + dial) at a share of the reference's gain; ± bootstrap SE; "
                  "'tied' / 'above': against the row with the least KL at that level (paired bootstrap, 2 SEs); "
                  "ratio: KL / the reference's KL at s = 1 (the paper's claim: <= 0.25 at 90% of the gain).", "",
                  "| row | run | " + " | ".join(f"KL @ {int(f * 100)}% ({lv:.3f})" for f, lv in zip(LEVELS, an["levels"]))
                  + " | ratio @ 90% | English Δ @ 75% |", "|---|---|" + "---|" * len(LEVELS) + "---|---|"]
        for row, name in an["rows"].items():
            cells = []
            for f in LEVELS:
                c = an["equal_gain"][f"{f:g}"][row]
                tag = c.get("kl_vs_best")
                cells.append("not reached" if c["kl"] is None else
                             f"{_pm(c['kl'], c['kl_se'])}{' **best**' if tag == 'best' else f' ({tag})' if tag else ''}")
            c90, c75 = an["equal_gain"]["0.9"][row], an["equal_gain"]["0.75"][row]
            lr_of = {g["run"]: g["lr"] for g in an["grid"]}
            shown = f"{name.split('@')[0]}@{lr_of[name]:g} (beyond the grid)" if name.endswith("@beyond") else name
            lines.append(f"| {row} | {shown} | " + " | ".join(cells) + f" | {_f(c90['kl_ratio'], '{:.2f}')} | "
                         f"{_pm(c75['english'], c75['english_se'])} |")
        lines += ["", reading(an)]
        if an.get("ratios"):
            lines += ["", "Paired KL ratios, each Control row over each full-fine-tuning and SDFT row (-beyond: the run beyond its grid; low-rank Control also over LoRA), at "
                      + " / ".join(f"{int(f * 100)}%" for f in LEVELS)
                      + " (95% bootstrap interval; an interval containing 1 is a tie):", ""]
            for pair, cells in an["ratios"].items():
                if all(c is None for c in cells):
                    continue  # a row that reaches no level (e.g. SDFT in csft): nothing to read
                lines.append(f"- {pair}: " + " / ".join(
                    "-" if c is None else f"{c['ratio']:.2f}"
                    + (f" [{c['interval'][0]:.2f}, {c['interval'][1]:.2f}]" if c["interval"] else "")
                    + (f" (both reach it in {c['reached']:.0%} of resamples)" if c["reached"] < MIN_REACHED else "")
                    for c in cells))
        if an.get("claim_by_reference"):
            lines += ["", f"The paper's claim (<= {CLAIM_LOSS:g}x the reference's KL at {int(CLAIM_GAIN * 100)}% of its "
                      "gain) against each rate of full fine-tuning as the reference: " + "; ".join(
                          f"{lr}{' (chosen)' if c['run'] == an['reference']['run'] else ''}: "
                          + ("no gain" if c["meets"] is None else ", ".join(c["meets"]) or "no row")
                          for lr, c in an["claim_by_reference"].items()) + "."]
        if an.get("any_rate"):
            lines += ["", "Any rate (the envelope of every grid rate's points, an oracle choice of rate): KL at "
                      + ", ".join(f"{int(f * 100)}%" for f in LEVELS) + ": "
                      + "; ".join(f"{fam} " + " / ".join(_f(x) for x in v["kl"]) for fam, v in an["any_rate"].items())
                      + "."]
        seeds = an.get("seeds", {})
        if seeds.get("rows"):
            lines += ["", "### Seeds (KL on the frontier per seed; mean ± sd across the seeds that reach the level)", "",
                      "(k of n): only k of the n seeds reach that level; the mean is over those k. control-best is the "
                      "Control family with the least test KL at 75% at seed 42: picked on the test frontier, which "
                      "favours Control.", "",
                      "| row | seeds | " + " | ".join(f"KL @ {int(f * 100)}%" for f in LEVELS)
                      + " | item SE @ 75% (seed 42) |", "|---|---|" + "---|" * len(LEVELS) + "---|"]
            for label, r in seeds["rows"].items():
                n = len(r["seeds"])
                cells = [((_f(m) + ("" if sd is None else f" ± {sd:.4f}")) if m is not None else "not reached")
                         + ("" if k == n else f" ({k} of {n})")
                         for m, sd, k in zip(r["mean"] or [None] * len(LEVELS), r["sd"] or [None] * len(LEVELS),
                                             r.get("reached") or [n] * len(LEVELS))]
                row = label.split(" (")[1][:-1] if label.startswith("control-best (") else label
                item_se = an["equal_gain"]["0.75"].get(row, {}).get("kl_se")
                lines.append(f"| {label} | {', '.join(map(str, r['seeds']))} | " + " | ".join(cells)
                             + f" | {_f(item_se)} |")
            if seeds["pairs"]:
                lines += ["", "Across seeds, the sign of each pair's KL difference at the three levels "
                          "(below / above: the same at every seed; mixed: not):"]
                pairs = {}
                for p in seeds["pairs"]:
                    pairs.setdefault((p["a"], p["b"]), []).append(p["holds"].replace("a ", ""))
                lines += [f"- {a} vs {b}: {' / '.join(h)}" for (a, b), h in pairs.items()]
        lines += ["", f"![{experiment}](retention_frontier_{experiment}.png)", ""]
        if an["failed"]:
            lines += [f"Failed runs: {', '.join(an['failed'])}.", ""]
    return "\n".join(lines) + "\n"


def plot(path: str, experiment: str, an: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = an["rows"] or {g["family"]: g["run"] for g in an["grid"]}
    for ax, (m, label) in zip(axes, MEASURES.items()):
        for k, (row, name) in enumerate(rows.items()):
            pts = an["points"].get(name)
            if not pts:
                continue
            colour = colours[k % len(colours)]
            env = pareto_envelope([p["gain"] for p in pts], [p[m] for p in pts])
            ax.plot([g for g, _ in env], [v for _, v in env], "-", color=colour, lw=1.4, label=f"{row} ({name.split('@')[1]})")
            for kind, marker in (("trajectory", "o"), ("dial", "x")):
                sel = [p for p in pts if p["kind"] == kind]
                ax.plot([p["gain"] for p in sel], [p[m] for p in sel], marker, color=colour, ms=5, ls="none")
        for lv in an.get("levels", []):
            ax.axvline(lv, color="grey", lw=0.5, ls=":")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(GAIN_LABEL[experiment], fontsize=9)
        # forgetting spans orders of magnitude between methods: a log scale keeps the low rows apart
        ax.set_yscale("symlog", linthresh=1e-3)
        if m == "kl":
            ax.set_ylim(bottom=0)  # KL is never negative
        ax.set_ylabel(label + " (log scale above 0.001)", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{experiment}: {SETTING[experiment]}. Lines: each method's frontier at its validation-chosen rate "
                 "(o: checkpoints, x: dial points); dotted: 50/75/90% of full fine-tuning's gain", fontsize=9)
    save_figure(fig, path)


def write(results_dir: str, settings, base: dict, collected: dict, command: str, records: str,
          progress: tuple[int, int]) -> None:
    """retention_frontier.{md,json} and one PNG per setting from the finished runs, and the base
    model's scores next to the per-run records (so `--report-only` needs the records only)."""
    if not base or "mc" not in base:
        return
    os.makedirs(records, exist_ok=True)
    _atomic_text(os.path.join(records, "base.json"), json.dumps(base))
    analyses = {e: analyse(e, base, runs, settings.families, settings.seeds)
                for e, runs in collected.items() if e in base and runs}
    if not analyses:
        return
    done, planned = progress
    payload = {"command": command, "finished_runs": done, "planned_runs": planned, "levels": list(LEVELS),
               "analysis": _jsonable(analyses)}
    _atomic_text(os.path.join(results_dir, "retention_frontier.json"), json.dumps(payload, indent=1))
    _atomic_text(os.path.join(results_dir, "retention_frontier.md"),
                 markdown(analyses, settings, base, command, done, planned))
    for experiment, an in analyses.items():
        plot(os.path.join(results_dir, f"retention_frontier_{experiment}.png"), experiment, an)

