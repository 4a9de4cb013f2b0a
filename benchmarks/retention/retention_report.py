"""Turn the retention benchmark's run records into retention.json, retention.md and one plot per
experiment.

Every change is measured against the base model (seq: against the end of stage 1) on the same
items. Uncertainty comes from a paired bootstrap over items: one resample of the Spanish, English
and arithmetic test items is applied to every run and to the base model at once, so differences
between methods keep their pairing.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

import retention_tasks as tasks
from controlllm.compare import on_envelope, pareto_envelope  # noqa: F401  (one envelope for every report)

MC_LABELS = {"arc_easy": "ARC-E", "piqa": "PIQA", "hellaswag": "HellaSwag"}


def discussion_path(plan: str) -> str:
    """The hand-written reading of a plan's results, appended to its report: discussion.md for the
    fast plan (the one `make bench-retention` runs), discussion_<plan>.md for the others."""
    name = "discussion.md" if plan == "fast" else f"discussion_{plan}.md"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


BOOTSTRAP = 400
LN2 = math.log(2)
# Forgetting measures per experiment (the first is the headline one), with labels.
FORGETTING = {
    "cpt": (("kl", "KL(base || model) on held-out English, nats/token"),
            ("english", "English bits/char change (up = forgets)")),
    "seq": (("arith_loss", "stage-1 exact match lost since the end of stage 1"),
            ("kl", "KL(base || model) on held-out English, nats/token")),
}
GAIN_LABEL = {"cpt": "Spanish bits/char gain (base - run)", "seq": "stage-2 Spanish bits/char gain (stage 1 end - run)"}
CLAIM_GAIN, CLAIM_LOSS = 0.9, 0.25
# Two full-FT learning rates whose Spanish validation bits/char differ by less than this many SEs
# are not separated by validation: the claim is reported against each.
VAL_SEPARATION = 2.0


# --------------------------------------------------------------------------------- per item arrays
def _arrays(point: dict) -> dict:
    out = {"sp_nll": np.array(point["spanish"]["nll"]), "sp_chars": np.array(point["spanish"]["chars"], float),
           "en_nll": np.array(point["english"]["nll"]), "en_chars": np.array(point["english"]["chars"], float),
           "kl": np.array(point["english"]["kl"]), "tokens": np.array(point["english"]["tokens"], float)}
    if "arith" in point:
        out["arith"] = np.array(point["arith"]["correct"], float)
    return out


def _values(a: dict, base: dict, origin: dict, idx: dict) -> dict:
    """gain and forgetting measures of one point for item resamples idx (rows = replicates)."""
    sp, en = idx["sp"], idx["en"]
    chars = base["sp_chars"][sp].sum(-1)
    out = {"gain": (origin["sp_nll"][sp].sum(-1) - a["sp_nll"][sp].sum(-1)) / LN2 / chars,
           "kl": a["kl"][en].sum(-1) / a["tokens"][en].sum(-1),
           "english": (a["en_nll"][en].sum(-1) - base["en_nll"][en].sum(-1)) / LN2 / base["en_chars"][en].sum(-1)}
    if "arith" in a and "arith" in origin:
        out["arith_loss"] = (origin["arith"][idx["ar"]] - a["arith"][idx["ar"]]).mean(-1)
    return out


def _trajectory(run: dict, base_point: dict) -> tuple[list[dict], dict]:
    """The run's points in step order, starting at its origin (the base model; seq: end of stage 1),
    and the origin's arrays (the reference for gain and stage-1 loss)."""
    if run["experiment"] == "seq":
        origin_point = run["stage1"]["checkpoints"][-1]
        points = [dict(origin_point, step=0)] + run["checkpoints"]
    else:
        origin_point = base_point
        points = [dict(base_point, step=0)] + run["checkpoints"]
    return points, _arrays(origin_point)


def monotone_levels(gains) -> list[int]:
    """The equal-gain levels of a reference trajectory (origin first): the indices of the points where
    the running maximum of its gain rises above every earlier point and above 0. A checkpoint whose
    gain falls back adds no level; the level is the gain the reference had reached by that step."""
    out, top = [], float(gains[0])
    for i in range(1, len(gains)):
        if gains[i] > top:
            top = float(gains[i])
            if top > 0:
                out.append(i)
    return out


def _on_envelope_reps(c: dict, m: str, levels) -> np.ndarray:
    """`on_envelope` per bootstrap replicate of curve `c` (levels: one per replicate); NaN where the
    replicate's trajectory does not reach its level."""
    out = [on_envelope(g, v, float(lv)) for g, v, lv in zip(c["reps"]["gain"], c["reps"][m], levels)]
    return np.array([np.nan if x is None else x for x in out], float)


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float | None, int]:
    """SE of the replicate-wise difference a - b over the replicates where both are defined."""
    ok = ~(np.isnan(a) | np.isnan(b))
    return (_sd(list(a[ok] - b[ok])), int(ok.sum()))


def compare(diff: float | None, se: float | None) -> str | None:
    """The verdict on a paired difference `diff` (A - B) with bootstrap SE `se` of that direct
    difference: 'below' (A clearly less) when diff < -2 se, 'above' when diff > 2 se, else 'tied'."""
    if diff is None:
        return None
    se = se or 0.0
    return "below" if diff < -2 * se else "above" if diff > 2 * se else "tied"


def with_wise_ft(runs: dict) -> dict:
    """The runs plus, for each run with WiSE-FT points, a curve of its own ('<name> WiSE-FT'): from
    the base model through the interpolated models by increasing alpha to the run's last checkpoint
    (alpha 1). The curve is one training run read along the mixing coefficient instead of the steps."""
    out = {}
    for name, run in runs.items():
        out[name] = run
        if run.get("failed") or not run.get("wise_ft"):
            continue
        last = run["checkpoints"][-1]
        points = [dict(p, tokens=last.get("tokens")) for p in sorted(run["wise_ft"], key=lambda p: p["alpha"])]
        rest = {k: v for k, v in run.items() if k not in ("wise_ft", "merged")}
        out[f"{name} WiSE-FT"] = {**rest, "variant": f"{name} WiSE-FT", "config": {**run["config"], "method": "wise-ft"},
                                  "checkpoints": points + [dict(last, alpha=1.0)]}
    return out


def _label(point: dict) -> str:
    return f"alpha {point['alpha']:g}" if point.get("alpha") is not None else f"step {point['step']}"


# ------------------------------------------------------------------------------------ analysis
def reference_full(experiment: str, runs: dict) -> str | None:
    """Full fine-tuning's reference run: among the full-FT learning rates (without replay), the one
    with the lowest Spanish validation bits/char at its last checkpoint (validation only)."""
    full = _full_rates(runs)
    if not full:
        return None
    return min(full, key=lambda n: runs[n]["checkpoints"][-1]["spanish_val"]["bpc"])


def _full_rates(runs: dict) -> list[str]:
    return [n for n, r in runs.items() if not r.get("failed") and r.get("config", {}).get("method") == "full"
            and not r.get("replay") and r.get("checkpoints")]


def reference_candidates(runs: dict, chosen: str, boot_sp: np.ndarray, val_texts: int | None,
                         seed: int = 0) -> list[dict]:
    """Every full fine-tuning rate (without replay) with its Spanish validation bits/char at the last
    checkpoint, its gap to the validation-chosen reference `chosen` and the SE of that gap; a rate is
    `separated` from the chosen one when the gap exceeds VAL_SEPARATION SEs. The SE is the paired
    bootstrap SE over validation texts where the records keep per-text validation scores; otherwise
    (the records keep only the validation total) it is estimated from the same two runs' paired
    difference in test bits/char at their last checkpoints, scaled by sqrt(test texts / validation
    texts). The claim is reported against every rate validation cannot separate."""
    out = []
    a = runs[chosen]["checkpoints"][-1]
    for name in _full_rates(runs):
        b = runs[name]["checkpoints"][-1]
        gap = float(b["spanish_val"]["bpc"] - a["spanish_val"]["bpc"])
        se, how = None, None
        if name == chosen:
            se, how = 0.0, "chosen"
        elif "nll" in a["spanish_val"] and "nll" in b["spanish_val"]:
            na, nb = np.array(a["spanish_val"]["nll"]), np.array(b["spanish_val"]["nll"])
            chars = np.array(a["spanish_val"]["chars"], float)
            idx = np.random.default_rng(seed + 1).integers(0, len(na), (BOOTSTRAP, len(na)))
            se = _sd(list((nb[idx].sum(-1) - na[idx].sum(-1)) / LN2 / chars[idx].sum(-1)))
            how = "validation texts"
        else:
            na, nb = np.array(a["spanish"]["nll"]), np.array(b["spanish"]["nll"])
            chars = np.array(a["spanish"]["chars"], float)
            test = _sd(list((nb[boot_sp].sum(-1) - na[boot_sp].sum(-1)) / LN2 / chars[boot_sp].sum(-1)))
            se = None if test is None else test * math.sqrt(len(na) / (val_texts or len(na)))
            how = "test texts, scaled"
        out.append({"name": name, "lr": runs[name].get("lr"), "val_bpc": float(b["spanish_val"]["bpc"]),
                    "gap": gap, "gap_se": se, "se_from": how, "chosen": name == chosen,
                    "separated": name != chosen and se is not None and gap > VAL_SEPARATION * se})
    return sorted(out, key=lambda r: r["val_bpc"])


def analyse(experiment: str, base: dict, runs: dict, seed: int = 0, val_texts: int | None = None) -> dict:
    """Per run and checkpoint: gain and forgetting with bootstrap SEs; every method's forgetting at
    the reference's gain levels (the reference's monotone envelope), each method read on its own
    Pareto envelope, with paired SEs of its difference from the reference and from every other
    method; the least-forgetting method per level and the methods tied with it on their direct
    difference; the paper's claim for every method against every full-FT rate validation cannot
    separate; the frontier.

    Bootstrap: each replicate resamples the test items once for every run and the base model; in it
    the levels are the reference's running maximum of gain at the level's checkpoint, and every
    curve's envelope is rebuilt from that replicate's points."""
    base_point = base[experiment]
    base_arr = _arrays(base_point)
    ok = {n: r for n, r in runs.items() if not r.get("failed")}
    rng = np.random.default_rng(seed)
    n_sp, n_en = len(base_arr["sp_nll"]), len(base_arr["en_nll"])
    n_ar = len(base_point["arith"]["correct"]) if "arith" in base_point else 1
    identity = {"sp": np.arange(n_sp)[None], "en": np.arange(n_en)[None], "ar": np.arange(n_ar)[None]}
    boot = {"sp": rng.integers(0, n_sp, (BOOTSTRAP, n_sp)), "en": rng.integers(0, n_en, (BOOTSTRAP, n_en)),
            "ar": rng.integers(0, n_ar, (BOOTSTRAP, n_ar))}
    measures = [m for m, _ in FORGETTING[experiment]]
    curves, point_rows = {}, {}
    for name, run in ok.items():
        points, origin = _trajectory(run, base_point)
        est, reps = {k: [] for k in ["gain"] + measures}, {k: [] for k in ["gain"] + measures}
        for p in points:
            arr = _arrays(p)
            v, b = _values(arr, base_arr, origin, identity), _values(arr, base_arr, origin, boot)
            for k in est:
                est[k].append(float(v[k][0]))
                reps[k].append(b[k])
        curves[name] = {"steps": [p["step"] for p in points], "est": {k: np.array(v) for k, v in est.items()},
                        "reps": {k: np.stack(v, 1) for k, v in reps.items()}}  # reps: (B, points)
        alphas = [p.get("alpha") for p in points]
        point_rows[name] = [{"step": s, **({"alpha": alphas[i]} if alphas[i] is not None else {}),
                             **{k: curves[name]["est"][k][i] for k in est},
                             **{f"{k}_se": float(curves[name]["reps"][k][:, i].std(ddof=1)) for k in est}}
                            for i, s in enumerate(curves[name]["steps"])]
    ref = reference_full(experiment, ok)
    equal_gain, best, references, claims_by_ref = [], [], [], {}
    if ref is not None:
        rc = curves[ref]
        top_b = np.maximum.accumulate(rc["reps"]["gain"], axis=1)  # the running maximum, per replicate
        for i in monotone_levels(rc["est"]["gain"]):
            level = float(rc["est"]["gain"][i])
            reads = {(n, m): (on_envelope(c["est"]["gain"], c["est"][m], level), _on_envelope_reps(c, m, top_b[:, i]))
                     for n, c in curves.items() for m in measures}
            row = {"level_step": rc["steps"][i], "gain": level, "methods": {}, "pairwise": {}}
            for name in curves:
                entry = {}
                for m in measures:
                    (value, r), (ref_value, ref_r) = reads[(name, m)], reads[(ref, m)]
                    diff = None if value is None else value - ref_value
                    diff_se = _paired(r, ref_r)[0] if value is not None else None
                    entry[m] = {"value": value, "se": _sd(list(r[~np.isnan(r)])) if value is not None else None,
                                "minus_full": diff, "minus_full_se": diff_se,
                                "vs_full": None if name == ref else compare(diff, diff_se),
                                "ratio": None if value is None or ref_value <= 0 else value / ref_value,
                                "reached_in": float(np.mean(~np.isnan(r)))}
                row["methods"][name] = entry
            for m in measures:
                have = [n for n in curves if reads[(n, m)][0] is not None]
                row["pairwise"][m] = {a: {b: {"minus": reads[(a, m)][0] - reads[(b, m)][0],
                                              "se": _paired(reads[(a, m)][1], reads[(b, m)][1])[0]}
                                          for b in have if b != a} for a in have}
            equal_gain.append(row)
            if (top := best_at_level(row, measures[0])) is not None:
                best.append(top)
        references = reference_candidates(ok, ref, boot["sp"], val_texts, seed)
        for cand in references:
            if not cand["separated"]:
                claims_by_ref[cand["name"]] = claims_against(cand["name"], curves, measures)
    # The merged models (what a user deploys): one point each, at the run's last checkpoint.
    merged_rows, at_merged = {}, {}
    for name, run in ok.items():
        if "merged" not in run:
            continue
        _, origin = _trajectory(run, base_point)
        arr = _arrays(run["merged"])
        v, b = _values(arr, base_arr, origin, identity), _values(arr, base_arr, origin, boot)
        merged_rows[f"{name} merged"] = [{"step": run["merged"]["step"], **{k: float(v[k][0]) for k in v},
                                          **{f"{k}_se": float(np.std(b[k], ddof=1)) for k in v}}]
        at_merged[f"{name} merged"] = at_gain_of(v, b, curves, measures[0])
        for r, claims in claims_by_ref.items():
            claims.append(_point_claim(f"{name} merged", v, b, curves[r], r, measures))
    return {"reference": ref, "references": references, "points": point_rows, "merged_points": merged_rows,
            "equal_gain": equal_gain, "claims": claims_by_ref.get(ref, []), "claims_by_reference": claims_by_ref,
            "frontier": frontier({**point_rows, **merged_rows}, measures[0]), "best_at_level": best,
            "at_merged_gain": at_merged}


def _reference_top(rc: dict) -> tuple[float, np.ndarray] | None:
    """A reference's best gain (the top of its monotone envelope) and, per replicate, its running
    maximum at that checkpoint; None when it never gains."""
    levels = monotone_levels(rc["est"]["gain"])
    if not levels:
        return None
    return float(rc["est"]["gain"][levels[-1]]), np.maximum.accumulate(rc["reps"]["gain"], axis=1)[:, levels[-1]]


def claims_against(reference: str, curves: dict, measures: list[str]) -> list[dict]:
    """The paper's claim for every curve against `reference`: the curve's forgetting at 90% of the
    reference's best gain, both read on their own Pareto envelopes, over the reference's forgetting
    at its best gain; it holds when the ratio is <= 0.25 (`holds_clearly`: the whole 95% bootstrap
    interval is). The reference itself is listed too (its own forgetting at 90% of its gain)."""
    top = _reference_top(curves[reference])
    if top is None:
        return []
    g, g_b = top
    rc, out = curves[reference], []
    ref = {m: (on_envelope(rc["est"]["gain"], rc["est"][m], g), _on_envelope_reps(rc, m, g_b)) for m in measures}
    for name, c in curves.items():
        claim = {"variant": name, "reference": reference, "full_gain": g,
                 "max_gain_ratio": float(c["est"]["gain"].max() / g)}
        for m in measures:
            ref_value, ref_r = ref[m]
            value = on_envelope(c["est"]["gain"], c["est"][m], CLAIM_GAIN * g)
            r = _on_envelope_reps(c, m, CLAIM_GAIN * g_b)
            keep = ~np.isnan(r) & (np.nan_to_num(ref_r, nan=0.0) > 0)
            ratio = None if value is None or ref_value <= 0 else value / ref_value
            interval = _interval(list(r[keep] / ref_r[keep])) if ratio is not None else None
            reached_in = float(np.mean(~np.isnan(r)))
            # A resample in which the method does not reach the gain is one in which the claim fails.
            claim[m] = {"ratio": ratio, "interval": interval, "value": value, "reference_value": ref_value,
                        "holds": ratio is not None and ratio <= CLAIM_LOSS,
                        "holds_clearly": interval is not None and interval[1] <= CLAIM_LOSS and reached_in >= 0.975,
                        "reached_in": reached_in}
        out.append(claim)
    return out


def at_gain_of(v: dict, b: dict, curves: dict, measure: str) -> dict:
    """A single model (a merged one) against every curve at its own gain: each curve's `measure`
    read on its Pareto envelope at that gain, and the single model's value minus it with a paired
    bootstrap SE (the same item resample moves the gain level and both values)."""
    level, value = float(v["gain"][0]), float(v[measure][0])
    out = {"gain": level, "value": value, "methods": {}}
    for name, c in curves.items():
        point = on_envelope(c["est"]["gain"], c["est"][measure], level)
        r = _on_envelope_reps(c, measure, b["gain"])
        keep = ~np.isnan(r)
        diff = None if point is None else value - point
        diff_se = _sd(list(b[measure][keep] - r[keep])) if point is not None else None
        out["methods"][name] = {"value": point, "minus": diff, "minus_se": diff_se,
                                "vs": compare(diff, diff_se), "reached_in": float(keep.mean())}
    return out


def _point_claim(variant: str, v: dict, b: dict, rc: dict, reference: str, measures: list[str]) -> dict:
    """The paper's claim for a single model (a merged one): its gain must reach 90% of the
    reference's best gain, and then its own forgetting over the reference's forgetting at its best
    gain (on the reference's envelope) is the ratio (no interpolation)."""
    g, g_b = _reference_top(rc)
    gain = float(v["gain"][0])
    claim = {"variant": variant, "reference": reference, "full_gain": g, "max_gain_ratio": gain / g}
    reached = gain >= CLAIM_GAIN * g
    for m in measures:
        ref_value = on_envelope(rc["est"]["gain"], rc["est"][m], g)
        ref_r = _on_envelope_reps(rc, m, g_b)
        keep = np.nan_to_num(ref_r, nan=0.0) > 0
        # The ratio is reported even when the gain falls short (then the claim does not hold).
        ratio = float(v[m][0]) / ref_value if ref_value > 0 else None
        interval = _interval(list(b[m][keep] / ref_r[keep])) if ratio is not None else None
        reached_in = float(np.mean(b["gain"] >= CLAIM_GAIN * g_b))
        claim[m] = {"ratio": ratio, "interval": interval, "value": float(v[m][0]), "reference_value": ref_value,
                    "holds": reached and ratio is not None and ratio <= CLAIM_LOSS,
                    "holds_clearly": reached and interval is not None and interval[1] <= CLAIM_LOSS
                    and reached_in >= 0.975, "gain_reached": reached, "gain_reached_in": reached_in}
    return claim


def _sd(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _interval(values: list[float]) -> list[float] | None:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) > 1 else None


def frontier(point_rows: dict, measure: str) -> dict:
    """Checkpoints no other checkpoint beats on both gain (higher) and `measure` (lower), per method."""
    pts = [(name, p) for name, rows in point_rows.items() for p in rows if p["step"] > 0]
    out = {}
    for name, p in pts:
        dominated = any(q["gain"] >= p["gain"] and q[measure] <= p[measure]
                        and (q["gain"] > p["gain"] or q[measure] < p[measure]) for _, q in pts)
        if not dominated:
            out.setdefault(name, []).append(p)
    return out


def best_at_level(row: dict, measure: str) -> dict | None:
    """At one of the reference's gain levels: the method that forgets least, those tied with it
    (their direct paired difference from it within two bootstrap SEs of that difference) and those
    clearly above it (more than two SEs)."""
    have = {n: e[measure]["value"] for n, e in row["methods"].items() if e[measure]["value"] is not None}
    if not have:
        return None
    best = min(have, key=have.get)
    diffs = {n: row["pairwise"][measure][n][best] for n in have if n != best}
    return {"gain": row["gain"], "level_step": row["level_step"], "best": best, "value": have[best],
            "minus_best": diffs,
            "within_2se": [n for n, d in diffs.items() if compare(d["minus"], d["se"]) == "tied"],
            "clearly_above": [n for n, d in diffs.items() if compare(d["minus"], d["se"]) == "above"],
            "not_reached": [n for n, e in row["methods"].items() if e[measure]["value"] is None]}


def mc_summary(base_mc: dict, mc: dict) -> dict:
    """Per task: accuracy and probability-of-gold changes with paired SEs; their means and z."""
    out, acc, pg = {}, [], []
    for task in MC_LABELS:
        b, a = base_mc[task], mc[task]
        ca, sa = tasks.paired_change(b["correct"], a["correct"])
        cp, sp = tasks.paired_change(b["p_gold"], a["p_gold"])
        out[task] = {"acc": a["acc"], "acc_change": ca, "acc_change_se": sa, "p_gold": float(np.mean(a["p_gold"])),
                     "p_gold_change": cp, "p_gold_change_se": sp}
        acc.append((ca, sa))
        pg.append((cp, sp))
    for key, vals in (("acc", acc), ("p_gold", pg)):
        mean = sum(v for v, _ in vals) / len(vals)
        se = math.sqrt(sum(s * s for _, s in vals)) / len(vals)
        out[f"avg_{key}_change"], out[f"avg_{key}_change_se"] = mean, se
        out[f"avg_{key}_z"] = mean / se if se > 0 else None
    return out


def point_summary(experiment: str, base: dict, origin: dict | None, point: dict) -> dict:
    """Point estimates with paired SEs of one model (a checkpoint or a merged model)."""
    b = base[experiment]
    org = origin or b
    g, gse = tasks.paired_change(point["spanish"]["nll"], org["spanish"]["nll"], b["spanish"]["chars"])
    e, ese = tasks.paired_change(b["english"]["nll"], point["english"]["nll"], b["english"]["chars"])
    k, kse = tasks.paired_change([0.0] * len(point["english"]["kl"]), point["english"]["kl"], point["english"]["tokens"])
    out = {"spanish_bpc": point["spanish"]["bpc"], "gain": g / LN2, "gain_se": gse / LN2,
           "english_bpc": point["english"]["bpc"], "english": e / LN2, "english_se": ese / LN2, "kl": k, "kl_se": kse}
    if "arith" in point:
        out["arith_em"] = point["arith"]["exact_match"]
        if origin is not None and "arith" in origin:
            lost, lse = tasks.paired_change(point["arith"]["correct"], origin["arith"]["correct"])
            out["arith_loss"], out["arith_loss_se"] = lost, lse
    if "spanish_val" in point:
        out["spanish_val_bpc"] = point["spanish_val"]["bpc"]
    if "mc" in point and "mc" in base:
        out["mc"] = mc_summary(base["mc"]["mc"], point["mc"])
    return out


def summarise(experiment: str, base: dict, runs: dict) -> dict:
    out = {}
    for name, run in runs.items():
        if run.get("failed"):
            out[name] = {"failed": run["failed"]}
            continue
        origin = run["stage1"]["checkpoints"][-1] if experiment == "seq" else None
        block = {"lr": run["lr"], "train_seconds": run["train_seconds"],
                 "trainable_parameters": run["trainable_parameters"],
                 "checkpoints": [{"step": c["step"], "tokens": c.get("tokens"),
                                  **({"alpha": c["alpha"]} if "alpha" in c else {}),
                                  **point_summary(experiment, base, origin, c)} for c in run["checkpoints"]]}
        if experiment == "seq":
            s1 = run["stage1"]["checkpoints"][-1]
            block["stage1"] = {"lr": run["stage1_lr"], "val_em": run["stage1"]["val"]["exact_match"],
                               **point_summary(experiment, base, None, s1)}
            block["stage1"]["arith_gain"] = s1["arith"]["exact_match"] - base["seq"]["arith"]["exact_match"]
            block["stage2_start"] = run.get("stage2_start")
        if run.get("merged"):
            block["merged"] = {"step": run["merged"]["step"], **point_summary(experiment, base, origin, run["merged"])}
        out[name] = block
    return out


# ------------------------------------------------------------------------------------ writing
def headline(experiment: str, point: dict) -> str:
    text = f"Spanish bpc {point['spanish']['bpc']:.4f}; English bpc {point['english']['bpc']:.4f}"
    if point["english"].get("kl_mean") is not None:
        text += f", KL {point['english']['kl_mean']:.4f}"
    if "arith" in point:
        text += f"; arithmetic EM {point['arith']['exact_match']:.3f}"
    if "mc" in point:
        text += "; " + " ".join(f"{MC_LABELS[k]} {point['mc'][k]['acc']:.3f}" for k in MC_LABELS)
    return text


def _pm(value, se, fmt="{:+.3f}"):
    if value is None:
        return "n/a"
    return fmt.format(value) + (f" ± {fmt.format(se).lstrip('+')}" if se is not None else "")


def _f(value, fmt="{:.2f}"):
    return "n/a" if value is None else fmt.format(value)


def markdown(info: dict, base: dict, summary: dict, analysis: dict, elapsed: float, complete: bool) -> str:
    env = info["environment"]
    s = env["settings"]
    lines = ["# Retention benchmark: forgetting against gain along training, SmolLM2-135M-Instruct", ""]
    if not complete:
        lines += ["**Partial results: the benchmark had not finished when this file was written.**", ""]
    lines += [
        "How much each way of fine-tuning forgets for what it learns, read along each run's trajectory "
        "(log-spaced checkpoints of one cosine schedule) and compared at equal gain, in two experiments: "
        "continued pre-training on Spanish (cpt) and sequential skills (seq: arithmetic SFT, then Spanish).",
        "",
        f"Protocol. Same data, order and seed ({env['seed']}) for every method; learning rates come from "
        "validation of the new skill only (see the plan below); Control budgets were fixed before any run. "
        "± is a paired standard error over items (the same items before and after). Equal-gain tables compare "
        "methods at the gains full fine-tuning reached on its monotone envelope (the running maximum of its gain), "
        "each method read on its own Pareto envelope (the least forgetting at which it reached a gain, linear "
        f"between envelope points); their ± comes from a paired bootstrap ({BOOTSTRAP} resamples of the test items, "
        "shared by every method), and ties are judged on the bootstrap SE of the two methods' direct difference. "
        "KL and English bits/char are on "
        f"{s['english_texts']} held-out English fortunes, Spanish on {s['spanish_test']} held-out texts "
        "(Bible chapters never trained on and Spanish fortunes).",
        "",
    ]
    for experiment in ("cpt", "seq"):
        if experiment not in summary or experiment not in analysis:
            continue
        lines += _experiment_md(experiment, info, base, summary[experiment], analysis[experiment])
    discussion = discussion_path(s.get("plan", "fast"))
    if os.path.isfile(discussion):
        with open(discussion, encoding="utf-8") as f:
            lines += [f.read().strip(), ""]
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in base.get("seconds", {}).items())
    plan = env["plan"]
    lines += ["## How this was run", "",
              f"- Command: `{env['command']}` (resumable: finished runs are read back, not rerun; runs live under "
              "`runs/retention/`). Runs are split over worker processes side by side, one thread each.",
              f"- Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}, transformers "
              f"{env['transformers']}, peft {env['peft']}. Wall time: {elapsed / 60:.1f} min (summed over the invocations that ran the plan). Base-model scoring "
              f"(cached): {seconds}.",
              "- Precision: training in " + ("bfloat16 autocast (float32 weights and optimizer state)"
                                             if s.get("bf16") else "float32") + "; every score in float32.",
              f"- Checkpoints scored: cpt steps {env['checkpoints']['cpt']}, seq stage 2 steps {env['checkpoints']['seq']}.",
              f"- Data: {json.dumps(info['data']['spanish'])}; arithmetic "
              f"{json.dumps({k: v for k, v in info['data']['arithmetic'].items() if k != 'example'})}.",
              "- Plan (learning rates, TrainConfig overrides): `" + json.dumps(plan) + "`.",
              "- Settings: `" + json.dumps(s) + "`.", ""]
    return "\n".join(lines)


def _trajectory_row(experiment: str, name: str, lr: float, c: dict, tokens, seconds: str) -> str:
    """One row of the every-checkpoint table (a checkpoint, or the merged model at the last one)."""
    row = (f"| {name} | {lr:g} | {c['step'] if c.get('alpha') is None else _label(c)} | {tokens} | {_pm(c['gain'], c['gain_se'])} | "
           f"{_pm(c['kl'], c['kl_se'], '{:.4f}')} | {_pm(c['english'], c['english_se'], '{:+.4f}')} |")
    if experiment == "seq":
        row += f" {c['arith_em']:.3f} ({_pm(c.get('arith_loss'), c.get('arith_loss_se'))}) |"
    return row + f" {_f(c.get('spanish_val_bpc'), '{:.4f}')} | {seconds} |"


def _experiment_md(experiment: str, info: dict, base: dict, summary: dict, an: dict) -> list[str]:
    s = info["environment"]["settings"]
    measures = [m for m, _ in FORGETTING[experiment]]
    b = base[experiment]
    lines = []
    if experiment == "cpt":
        tokens = s["cpt_steps"] * s["cpt_batch"] * s["cpt_seq"]
        lines += ["## CPT: Spanish, forgetting over training", "",
                  f"Budget: {s['cpt_steps']} steps x {s['cpt_batch']} x {s['cpt_seq']} tokens = {tokens:,} tokens per "
                  f"run. Base: Spanish {b['spanish']['bpc']:.3f} bits/char, English {b['english']['bpc']:.3f}. "
                  f"Replay mixes {s['replay_share']:.0%} general English (other English fortunes) into the "
                  "training text.", ""]
    else:
        lines += ["## SEQ: arithmetic, then Spanish (sequential skills)", "",
                  f"Stage 1: {s['sft_steps']} steps x {s['sft_batch']} arithmetic chats. Stage 2: {s['stage2_steps']} "
                  f"steps x {s['cpt_batch']} x {s['cpt_seq']} Spanish tokens, from stage 1's result. Base: "
                  f"arithmetic exact match {b['arith']['exact_match']:.3f}, Spanish {b['spanish']['bpc']:.3f}. "
                  "Forgetting = exact match lost on held-out problems since the end of stage 1 (backward "
                  "transfer, sign flipped); gain = Spanish bits/char gained in stage 2.", ""]
        head = ("| method | stage-1 lr | stage-1 EM (val) | stage-1 EM (test, gain) | KL after stage 1 | "
                "after stage 2: EM (lost) | Spanish gain | KL | English bpc change | stage 2 started from |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for name, blk in summary.items():
            if blk.get("failed"):
                continue
            s1, last = blk["stage1"], blk["checkpoints"][-1]
            lines.append(f"| {name} | {s1['lr']:g} | {s1['val_em']:.3f} | {s1['arith_em']:.3f} "
                         f"({s1['arith_gain']:+.3f}) | {_pm(s1['kl'], s1['kl_se'], '{:.4f}')} | "
                         f"{last['arith_em']:.3f} ({_pm(last.get('arith_loss'), last.get('arith_loss_se'))}) | "
                         f"{_pm(last['gain'], last['gain_se'])} | {_pm(last['kl'], last['kl_se'], '{:.4f}')} | "
                         f"{_pm(last['english'], last['english_se'], '{:+.4f}')} | {blk.get('stage2_start')} |")
        lines.append("")
    # every checkpoint of every run
    cols = "| method | lr | step | tokens | Spanish gain | KL to base | English bpc change |"
    if experiment == "seq":
        cols += " stage-1 EM (lost) |"
    cols += " Spanish val bpc | train s |"
    lines += ["Every run, every scored checkpoint:", "", cols, "|" + "---|" * (cols.count("|") - 1)]
    for name, blk in summary.items():
        if blk.get("failed"):
            lines.append(f"| {name} | failed: {blk['failed']} |")
            continue
        for c in blk["checkpoints"]:
            lines.append(_trajectory_row(experiment, name, blk["lr"], c, c["tokens"] or "-",
                                         f"{blk['train_seconds']:.0f}"))
        if blk.get("merged"):
            lines.append(_trajectory_row(experiment, f"{name} **merged**", blk["lr"], blk["merged"], "-", "-"))
    lines.append("")
    if experiment == "cpt":
        head = ("| model (last checkpoint) | " + " | ".join(f"{v} acc (change)" for v in MC_LABELS.values())
                + " | avg acc change (z) | " + " | ".join(f"{v} P(gold) change" for v in MC_LABELS.values())
                + " | avg P(gold) change (z) |")
        r = base["mc"]["mc"] if "mc" in base else None
        lines += [f"Multiple choice at the last checkpoint ({s['mc_items']} items per benchmark, zero-shot; "
                  "P(gold) = probability of the gold answer among the choices; z = change / paired SE):", "",
                  head, "|" + "---|" * (head.count("|") - 1)]
        if r:
            lines.append("| base model | " + " | ".join(f"{r[t]['acc']:.3f}" for t in MC_LABELS) + " | - | "
                         + " | ".join(f"{np.mean(r[t]['p_gold']):.3f}" for t in MC_LABELS) + " | - |")
        for name, blk in summary.items():
            scored = [] if blk.get("failed") else [
                (name if c.get("alpha") is None else f"{name} {_label(c)}", c) for c in blk["checkpoints"]]
            for label, point in (*scored, (f"{name} merged", blk.get("merged"))):
                if not point or "mc" not in point:
                    continue
                mc = point["mc"]
                lines.append(
                    f"| {label} | " + " | ".join(f"{mc[t]['acc']:.3f} ({_pm(mc[t]['acc_change'], mc[t]['acc_change_se'])})"
                                                 for t in MC_LABELS)
                    + f" | {_pm(mc['avg_acc_change'], mc['avg_acc_change_se'])} (z {_f(mc['avg_acc_z'], '{:+.1f}')}) | "
                    + " | ".join(_pm(mc[t]["p_gold_change"], mc[t]["p_gold_change_se"]) for t in MC_LABELS)
                    + f" | {_pm(mc['avg_p_gold_change'], mc['avg_p_gold_change_se'])} (z {_f(mc['avg_p_gold_z'], '{:+.1f}')}) |")
        lines.append("")
    lines += [f"![forgetting against gain, {experiment}](retention_{experiment}.png)", ""]
    ref = an["reference"]
    if ref is None:
        return lines + ["(No full fine-tuning run has finished: no equal-gain comparison yet.)", ""]
    lines += [f"**At equal gain.** Levels: the gains full fine-tuning (`{ref}`, the full-FT learning rate with the "
              "best Spanish validation score) had reached as it trained, on its monotone envelope (the running maximum "
              "of its gain over its checkpoints: a checkpoint whose gain does not exceed every earlier one adds no "
              f"level). {ENVELOPE_RULE} Value ± bootstrap SE, then the paired difference from `{ref}` ± the bootstrap SE "
              "of that direct difference, marked *below* or *above* when it exceeds two SEs. "
              f"{BOOTSTRAP_RULE}", ""]
    for m, label in FORGETTING[experiment]:
        head = "| method | " + " | ".join(f"gain {row['gain']:.3f} (full FT step {row['level_step']})"
                                          for row in an["equal_gain"]) + " |"
        lines += [f"{label}:", "", head, "|" + "---|" * (head.count("|") - 1)]
        names = list(an["equal_gain"][0]["methods"]) if an["equal_gain"] else []
        for name in names:
            cells = []
            for row in an["equal_gain"]:
                e = row["methods"][name][m]
                mark = f", *{e['vs_full']}*" if e.get("vs_full") in ("below", "above") else ""
                cells.append("-" if e["value"] is None else
                             f"{e['value']:.4f} ± {_f(e['se'], '{:.4f}')} "
                             f"({_pm(e['minus_full'], e['minus_full_se'], '{:+.4f}')}{mark})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    fr = an["frontier"]
    lines += [f"**Frontier** (checkpoints that no other checkpoint beats on both gain and {measures[0]}): "
              + "; ".join(f"{n} (" + ", ".join(f"{_label(p)}: gain {p['gain']:.3f} ± {p['gain_se']:.3f}, "
                                                 f"{measures[0]} {p[measures[0]]:.4f} ± {p[measures[0] + '_se']:.4f}"
                                                 for p in pts) + ")" for n, pts in fr.items()) + ".", ""]
    lines += [f"**Least {measures[0]} at each level**, and which methods are tied with it: a method is tied when its "
              "direct paired difference from the least-forgetting method is within two bootstrap SEs of that "
              "difference, clearly above when it exceeds them (difference ± SE in brackets).", ""]
    for row in an["best_at_level"]:
        def listed(names, row=row):
            return ", ".join(f"{n} ({_pm(row['minus_best'][n]['minus'], row['minus_best'][n]['se'], '{:+.4f}')})"
                             for n in sorted(names, key=lambda n: row["minus_best"][n]["minus"])) or "none"
        lines.append(f"- At gain {row['gain']:.3f}: least {measures[0]} {row['best']} ({row['value']:.4f}); tied: "
                     f"{listed(row['within_2se'])}; clearly above: {listed(row['clearly_above'])}; never reached: "
                     f"{', '.join(row['not_reached']) or 'none'}.")
    lines.append("")
    if an.get("at_merged_gain"):
        lines += [f"**Merged models against every curve at the merged model's own gain** ({measures[0]}; each curve "
                  "read on its Pareto envelope at that gain; in brackets the merged model's value minus the curve's ± "
                  "paired bootstrap SE, *below*/*above* beyond two SEs; curves that never reach the gain are left "
                  "out):", ""]
        for label, row in an["at_merged_gain"].items():
            have = sorted(((n, e) for n, e in row["methods"].items() if e["value"] is not None),
                          key=lambda x: x[1]["value"])
            lines.append(f"- {label} (gain {row['gain']:.3f}, {measures[0]} {row['value']:.4f}): "
                         + ", ".join(f"{n} {e['value']:.4f} ({_pm(e['minus'], e['minus_se'], '{:+.4f}')}"
                                     + (f", *{e['vs']}*" if e.get("vs") in ("below", "above") else "") + ")"
                                     for n, e in have) + ".")
        lines.append("")
    lines += _claims_md(an, measures)
    return lines


ENVELOPE_RULE = ("Each method is read on its own Pareto envelope: of its points (origin included), those no other "
                 "of its points beats on both gain and forgetting; its forgetting at a gain is the least forgetting "
                 "at which it reached that gain, interpolated linearly between the two envelope points around it (at "
                 "or below its lowest-gain envelope point, that point's forgetting); `-` = its best gain is below the "
                 "level.")
BOOTSTRAP_RULE = (f"Bootstrap: {BOOTSTRAP} resamples of the test items, each shared by every method and the base "
                  "model; in each, the levels are the reference's running maximum of gain and every envelope is "
                  "rebuilt from that resample's points.")


def _claim_cell(c: dict, m: str) -> str:
    e = c[m]
    if e["value"] is None:
        return f"never reaches {CLAIM_GAIN:.0%} of the gain"
    if e["ratio"] is None:
        return f"n/a (the reference's {m} is {e['reference_value']:+.4f}, not a loss)"
    text = f"{e['ratio']:.2f}" + (f" [{e['interval'][0]:.2f}, {e['interval'][1]:.2f}]" if e["interval"] else "")
    if not e.get("gain_reached", True):
        text += f" (gain short of {CLAIM_GAIN:.0%}; reaches it in {e['gain_reached_in']:.0%} of resamples)"
    elif e.get("reached_in", 1.0) < 1.0:
        text += f" (reached in {e['reached_in']:.1%} of resamples)"
    return text


def _claims_md(an: dict, measures: list[str]) -> list[str]:
    """The claim tables: one per full fine-tuning rate that validation cannot separate."""
    refs = an.get("references") or []
    if not an.get("claims_by_reference"):
        return []
    lines = [f"**The paper's claim at equal gain, for every method**: a method's forgetting at {CLAIM_GAIN:.0%} of "
             "the reference's best gain (the top of its monotone envelope), read on the method's Pareto envelope, "
             "over the reference's forgetting at its best gain; it holds when <= "
             f"{CLAIM_LOSS} (*clearly* when the whole 95% bootstrap interval is and the method reaches the gain in at "
             "least 97.5% of resamples). A merged model is one point: its "
             f"own forgetting, if its gain reaches {CLAIM_GAIN:.0%}. [95% bootstrap interval]", "",
             "The claim is computed against every full fine-tuning rate (without replay) that Spanish validation "
             f"cannot separate from the chosen one (validation bits/char gap within {VAL_SEPARATION:g} SEs; the records "
             "keep the validation total only, so the SE is the two runs' paired test bits/char difference scaled by "
             "sqrt(test texts / validation texts) unless per-text validation scores are recorded):", ""]
    for r in refs:
        state = ("chosen by validation" if r["chosen"] else
                 f"{r['gap']:+.4f} bits/char (SE {_f(r['gap_se'], '{:.4f}')}): "
                 + ("separated, no claim table" if r["separated"] else "not separated"))
        lines.append(f"- `{r['name']}` (lr {r['lr']:g}): validation {r['val_bpc']:.4f} bits/char, {state}.")
    lines.append("")
    for ref, claims in an["claims_by_reference"].items():
        if not claims:
            continue
        lines += [f"Against `{ref}` (best gain {claims[0]['full_gain']:.3f}):", "",
                  "| method | best gain / reference's | " + " | ".join(f"{m} ratio" for m in measures) + " | holds |",
                  "|---|---|" + "---|" * len(measures) + "---|"]
        for c in claims:
            h = c[measures[0]]
            holds = ("yes, clearly" if h.get("holds_clearly") else "yes" if h["holds"] else "no")
            lines.append(f"| {c['variant']} | {_f(c['max_gain_ratio'])} | "
                         + " | ".join(_claim_cell(c, m) for m in measures) + f" | {holds} |")
        lines.append("")
    return lines


def plot(path: str, experiment: str, summary: dict, analysis: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = FORGETTING[experiment]
    fig, axes = plt.subplots(1, len(measures), figsize=(6.5 * len(measures), 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (m, label) in zip(axes, measures):
        trained = [n for n in analysis["points"] if not n.endswith("WiSE-FT")]
        for name, rows in analysis["points"].items():
            if name.endswith("WiSE-FT"):  # not a training run: black diamonds, whatever the colour cycle
                colour, style, marker = "black", "-", "D"
            else:
                k = trained.index(name)
                colour, style, marker = colours[k % len(colours)], styles[(k // len(colours)) % len(styles)], "o"
            x = [r["gain"] for r in rows]
            y = [r[m] for r in rows]
            ax.errorbar(x, y, xerr=[r["gain_se"] for r in rows], yerr=[r[f"{m}_se"] for r in rows], fmt=marker,
                        ls=style, color=colour, ms=4, capsize=2, lw=1.3, label=name)
            merged = summary.get(name, {}).get("merged")
            if merged and merged.get(m) is not None:
                ax.plot([merged["gain"]], [merged[m]], marker="s", mfc="none", color=colour, ms=8)
        ax.axhline(0, color="grey", lw=0.6)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_xlabel(GAIN_LABEL[experiment], fontsize=9)
        ax.set_ylabel(label, fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{experiment.upper()}: forgetting against gain along training (points: checkpoints from the "
                 "origin, or a WiSE-FT model by mixing coefficient; hollow squares: merged Control models; bars: bootstrap SEs)", fontsize=9)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Lay out `fig`, write it to `path` atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write(results_dir: str, info: dict, base: dict | None, collected: dict, settings, elapsed: float) -> None:
    """Write retention.json, retention.md and retention_<experiment>.png from the runs finished so far.
    Nothing is written before a run has finished (older results stay in place until then)."""
    if not base or not any(collected.values()):
        return
    summary, analysis = {}, {}
    for exp, runs in collected.items():
        if exp not in base or (exp == "cpt" and "mc" not in base):
            continue
        curves = with_wise_ft(runs)
        summary[exp] = summarise(exp, base, curves)
        if any(not r.get("failed") for r in runs.values()):
            analysis[exp] = analyse(exp, base, curves, val_texts=info.get("data", {}).get("spanish", {}).get("val_texts"))
    if not summary:
        return
    expected = {(e, n) for e in ("cpt", "seq") for n, v in settings.variants(e).items() if not v.missing_fields()}
    have = {(e, n) for e, runs in collected.items() for n in runs}
    complete = expected <= have
    payload = {"complete": complete, "elapsed_seconds": round(elapsed, 1), **info, "summary": summary,
               "analysis": _jsonable(analysis),
               "skipped": sorted(f"{e}:{n} (TrainConfig lacks {', '.join(v.missing_fields())})"
                                 for e in ("cpt", "seq") for n, v in settings.variants(e).items() if v.missing_fields())}
    _atomic_text(os.path.join(results_dir, "retention.json"), json.dumps(payload, indent=1))
    _atomic_text(os.path.join(results_dir, "retention.md"),
                 markdown(info, base, summary, analysis, elapsed, complete))
    for exp, an in analysis.items():
        plot(os.path.join(results_dir, f"retention_{exp}.png"), exp, summary[exp], an)
    runs_dir = os.path.join(results_dir, "retention_runs", settings.plan)
    if os.path.isdir(os.path.join(runs_dir, "csft")):  # the previous round's records, superseded now
        import shutil

        shutil.rmtree(runs_dir)
    # The base model's per-item scores go with the per-run records: the report regenerates from them.
    os.makedirs(runs_dir, exist_ok=True)
    _atomic_text(os.path.join(runs_dir, "base.json"), json.dumps(base))
    for exp, runs in collected.items():
        for name, run in runs.items():
            os.makedirs(os.path.join(runs_dir, exp), exist_ok=True)
            _atomic_text(os.path.join(runs_dir, exp, f"{name}.json"), json.dumps(run))


def _jsonable(data):
    def convert(x):
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, (np.floating, np.integer)):
            return x.item()
        raise TypeError(type(x).__name__)
    return json.loads(json.dumps(data, default=convert))


def _atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
