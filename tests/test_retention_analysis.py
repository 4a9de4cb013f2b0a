"""The retention benchmark's equal-gain analysis: levels from the reference's monotone envelope, each
method read on its own Pareto envelope, ties from the paired difference of the two methods, the claim
for every method against every full-FT rate validation cannot separate; and `run.py --report-only`
regenerating the committed results from the committed files alone."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "retention"))
report = pytest.importorskip("retention_report")

N = 12  # items per probe
TOKENS = 20  # tokens per English text
CHARS = 100  # characters per Spanish text


def _point(sp_nll, kl, en_nll=None, val=0.0):
    en_nll = en_nll if en_nll is not None else [80.0] * len(kl)
    return {"spanish": {"nll": list(sp_nll), "chars": [CHARS] * len(sp_nll), "bpc": 0.0},
            "english": {"nll": list(en_nll), "chars": [100] * len(en_nll), "kl": list(kl), "tokens": [TOKENS] * len(kl),
                        "bpc": 0.0},
            "spanish_val": {"bpc": val}}


def _base():
    rng = random.Random(0)
    sp = [100 + rng.random() for _ in range(N)]
    return sp, {"cpt": _point(sp, [0.0] * N)}


def _run(name, method, base_sp, points, val=2.0, kl_items=None, jitter=0.0):
    """points: (step, gain in nats per text, KL per token); kl_items: per-item KL per token per step;
    jitter: nats added to the Spanish texts alternately up and down (the total, so the gain, unchanged)."""
    checkpoints = []
    for k, (step, g, kl) in enumerate(points):
        per_item = kl_items[k] if kl_items is not None else [kl] * N
        sp = [x - g + jitter * (-1) ** i for i, x in enumerate(base_sp)]
        checkpoints.append({"step": step, **_point(sp, [v * TOKENS for v in per_item], val=val)})
    return {"experiment": "cpt", "variant": name, "lr": 1e-4, "config": {"method": method}, "checkpoints": checkpoints}


def _bpc(nats_per_text):
    return nats_per_text / math.log(2) / CHARS


# ------------------------------------------------------------------------------ the rules
def test_pareto_envelope_keeps_the_least_forgetting_at_each_gain_reached():
    gains, kl = [0.0, 0.2, 0.1, 0.2, 0.3], [0.0, 0.168, 0.114, 0.068, 0.2]
    assert report.pareto_envelope(gains, kl) == [(0.0, 0.0), (0.2, 0.068), (0.3, 0.2)]
    # A gain reached three times counts at the least forgetting, not at the first crossing (0.168).
    assert report.on_envelope(gains, kl, 0.2) == pytest.approx(0.068)
    # Linear between the two envelope points around the level.
    assert report.on_envelope(gains, kl, 0.25) == pytest.approx(0.068 + 0.5 * (0.2 - 0.068))
    assert report.on_envelope(gains, kl, 0.1) == pytest.approx(0.034)  # origin to (0.2, 0.068)
    assert report.on_envelope(gains, kl, 0.31) is None  # never reached
    # At or below the lowest envelope point (the origin dominated): that point's forgetting.
    assert report.on_envelope([0.0, 0.1, 0.2], [0.01, -0.02, -0.01], 0.05) == pytest.approx(-0.02)
    assert report.on_envelope([0.0, 0.1, 0.2], [0.01, -0.02, -0.01], 0.15) == pytest.approx(-0.015)


def test_levels_are_where_the_running_maximum_of_the_reference_gain_rises():
    assert report.monotone_levels([0.0, 0.105, 0.103, 0.126, 0.209]) == [1, 3, 4]
    assert report.monotone_levels([0.0, -0.1, 0.05, 0.05, 0.02]) == [2]
    assert report.monotone_levels([0.0, -0.1]) == []


def test_paired_difference_verdicts():
    assert report.compare(-0.3, 0.1) == "below"
    assert report.compare(0.3, 0.1) == "above"
    assert report.compare(0.15, 0.1) == "tied"
    assert report.compare(0.01, 0.0) == "above"  # a constant difference is no tie
    assert report.compare(None, 0.1) is None


# ------------------------------------------------------------------------------ through analyse
def test_equal_gain_levels_come_from_the_reference_envelope_and_methods_from_theirs():
    base_sp, base = _base()
    # The reference's gain falls back at step 2: that checkpoint adds no level.
    full = _run("full", "full", base_sp, [(1, 10.0, 0.2), (2, 8.0, 0.3), (4, 20.0, 0.5)])
    # Crosses gain 10 three times, at KL 0.143 (first crossing), then on the envelope 10/11 x 0.07.
    drift = _run("control-drift", "control", base_sp,
                 [(1, 14.0, 0.2), (2, 6.0, 0.15), (3, 13.0, 0.12), (4, 5.0, 0.1), (5, 11.0, 0.07)])
    an = report.analyse("cpt", base, {"full": full, "control-drift": drift})
    assert [row["level_step"] for row in an["equal_gain"]] == [1, 4]
    assert an["equal_gain"][0]["gain"] == pytest.approx(_bpc(10.0))
    row = an["equal_gain"][0]["methods"]["control-drift"]["kl"]
    assert row["value"] == pytest.approx(10 / 11 * 0.07)
    assert row["minus_full"] == pytest.approx(10 / 11 * 0.07 - 0.2)
    assert an["equal_gain"][1]["methods"]["control-drift"]["kl"]["value"] is None  # 14 < 20
    # The reference is read on its own envelope too: at its best gain, its last point.
    assert an["equal_gain"][1]["methods"]["full"]["kl"]["value"] == pytest.approx(0.5)


def test_ties_are_judged_on_the_two_methods_direct_difference():
    base_sp, base = _base()
    rng = np.random.default_rng(1)
    steps = [(1, 5.0), (2, 10.0), (4, 20.0)]
    # Full fine-tuning's KL is noisy from item to item, so each method's difference from it is uncertain.
    full = _run("full", "full", base_sp, [(s, g, 0.4) for s, g in steps],
                kl_items=[list(0.02 * g * (1 + 2 * rng.random(N))) for _, g in steps])
    # A and B forget alike item by item, B always 0.01 nats/token more: clearly above A, not tied.
    noise = [list(0.003 * g * (1 + 2 * rng.random(N))) for _, g in steps]
    a = _run("method-a", "lora", base_sp, [(s, g, 0.0) for s, g in steps], kl_items=noise)
    b = _run("method-b", "lora", base_sp, [(s, g, 0.0) for s, g in steps],
             kl_items=[[x + 0.01 for x in row] for row in noise])
    an = report.analyse("cpt", base, {"full": full, "method-a": a, "method-b": b})
    for top in an["best_at_level"]:
        assert top["best"] == "method-a"
        assert "method-b" not in top["within_2se"] and "method-b" in top["clearly_above"]
        assert top["minus_best"]["method-b"]["minus"] == pytest.approx(0.01)
    # Combined SEs against full fine-tuning would have called them tied.
    last = an["equal_gain"][-1]["methods"]
    assert 0.01 <= 2 * math.hypot(last["method-a"]["kl"]["minus_full_se"], last["method-b"]["kl"]["minus_full_se"])
    assert an["equal_gain"][-1]["pairwise"]["kl"]["method-b"]["method-a"]["se"] < 1e-9


def test_the_claim_covers_every_method_and_every_full_rate_validation_cannot_separate():
    base_sp, base = _base()
    steps = [(1, 5.0), (2, 10.0), (4, 20.0)]
    runs = {"full": _run("full", "full", base_sp, [(s, g, 0.02 * g) for s, g in steps], val=2.00),
            # Validation 0.001 worse, within two SEs (from the noisy test items): a second claim table.
            "full-1e-4": _run("full-1e-4", "full", base_sp, [(s, 0.9 * g, 0.01 * g) for s, g in steps], val=2.001,
                              jitter=1.0),
            "full-gentler": _run("full-gentler", "full", base_sp, [(s, 0.95 * g, 0.001 * g) for s, g in steps],
                                 val=2.0005, jitter=1.0),
            # Far worse on validation, and the test difference has no spread: separated.
            "full-gentle": _run("full-gentle", "full", base_sp, [(s, 0.2 * g, 0.001 * g) for s, g in steps], val=9.0),
            "lora-r16": _run("lora-r16", "lora", base_sp, [(s, g, 0.015 * g) for s, g in steps])}
    an = report.analyse("cpt", base, runs, val_texts=N)
    refs = {r["name"]: r for r in an["references"]}
    assert refs["full"]["chosen"] and not refs["full-1e-4"]["separated"] and refs["full-gentle"]["separated"]
    assert set(an["claims_by_reference"]) == {"full", "full-1e-4", "full-gentler"}
    claims = {c["variant"]: c for c in an["claims"]}
    assert set(claims) == set(runs)  # every method, the reference and gentle full fine-tuning included
    # full-gentler: KL 0.001 x 18 / 0.95 at 90% of full's gain (18), over full's 0.02 x 20 at its 20.
    assert claims["full-gentler"]["kl"]["ratio"] == pytest.approx(0.001 * 18 / 0.95 / 0.4)
    assert claims["full-gentler"]["kl"]["holds"] and claims["full-gentler"]["kl"]["holds_clearly"]
    assert claims["lora-r16"]["kl"]["ratio"] == pytest.approx(0.015 * 18 / 0.4) and not claims["lora-r16"]["kl"]["holds"]
    assert claims["full"]["kl"]["ratio"] == pytest.approx(0.9)
    assert claims["full-gentle"]["kl"]["value"] is None and not claims["full-gentle"]["kl"]["holds"]
    # Against full-1e-4 (best gain 18 at KL 0.01 x 20): 90% is 16.2, lora-r16's KL there 0.015 x 16.2.
    other = {c["variant"]: c for c in an["claims_by_reference"]["full-1e-4"]}
    assert other["lora-r16"]["kl"]["ratio"] == pytest.approx(0.015 * 16.2 / (0.01 * 20))
    assert other["full-1e-4"]["full_gain"] == pytest.approx(_bpc(18.0))


# ------------------------------------------------------------------------------ regeneration
PLANS = {"fast": os.path.join("benchmarks", "results"), "full": os.path.join("benchmarks", "results", "retention_full")}


@pytest.mark.slow
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_report_only_regenerates_the_committed_results_from_committed_files(tmp_path, plan):
    """A new checkout holds the per-run records and the base model's per-item scores; `--report-only`
    on them (no run folder) writes retention.md and retention.json byte for byte as committed."""
    committed = os.path.join(ROOT, PLANS[plan])
    results = tmp_path / "results"
    results.mkdir()
    shutil.copytree(os.path.join(committed, "retention_runs"), results / "retention_runs")
    shutil.copy(os.path.join(committed, "retention.json"), results / "retention.json")  # wall time, machine
    assert os.path.isfile(results / "retention_runs" / plan / "base.json")
    script = os.path.join(ROOT, "benchmarks", "retention", "run.py")
    out = subprocess.run([sys.executable, script, "--plan", plan, "--report-only", "--runs", str(tmp_path / "runs"),
                          "--results", str(results)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "base model:" not in out.stdout  # nothing scored: the base model's scores are committed
    for name in ("retention.md", "retention.json"):
        with open(os.path.join(committed, name), "rb") as f, open(results / name, "rb") as g:
            assert f.read() == g.read(), f"{plan}: {name} differs from the committed file"
    for path in sorted((results / "retention_runs").rglob("*.json")):
        rel = path.relative_to(results)
        with open(os.path.join(committed, rel), "rb") as f:
            assert json.loads(f.read()) == json.loads(path.read_bytes()), f"{plan}: {rel} changed"
