"""The frontier benchmark's analysis (benchmarks/retention/frontier_report.py): the learning rate
chosen on validation only, each row read on the Pareto envelope of its trajectory and dial points,
the equal-gain levels from the reference, the Control family picked for the seed rows, the verdict
across seeds; and `frontier.py --report-only` regenerating the committed results byte for byte."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "retention"))
report = pytest.importorskip("frontier_report")

N = 10  # items per probe
TOKENS = 20  # tokens per English text
CHARS = 100  # characters per Spanish text
FAMILIES = {"full": ({"method": "full"}, (1e-4, 3e-4, 1e-3)),
            "control-a": ({"method": "control"}, (1e-4, 1e-3)),
            "control-b": ({"method": "control"}, (1e-3,))}


def _point(gain_nats, kl, val_bpc=2.0, en=80.0):
    """A scored model: Spanish texts gaining `gain_nats` nats each over the base, KL per token `kl`."""
    return {"spanish": {"nll": [100.0 - gain_nats] * N, "chars": [CHARS] * N, "bpc": (100.0 - gain_nats) / math.log(2) / CHARS},
            "spanish_val": {"bpc": val_bpc},
            "english": {"nll": [en] * N, "chars": [100] * N, "kl": [kl * TOKENS] * N, "tokens": [TOKENS] * N,
                        "kl_mean": kl, "bpc": 0.0}}


BASE = {"cpt": _point(0.0, 0.0)}


def _run(family, lr, end, half=None, dial=(), val_bpc=2.0, seed=42, name=None):
    """end/half: (gain nats, KL); dial: (s, gain nats, KL)."""
    half = half or (end[0] / 2, end[1] / 4)
    return {"experiment": "cpt", "variant": name or f"{family}@{lr:g}", "family": family, "lr": lr, "seed": seed,
            "mix": False, "checkpoints": [{"step": 5, **_point(*half)}, {"step": 10, **_point(*end, val_bpc=val_bpc)}],
            "dial": [{"value": s, "step": 10, **_point(g, kl)} for s, g, kl in dial]}


def _gain(nats):
    return nats / math.log(2) / CHARS


def _runs(**extra):
    runs = {
        "full@0.0001": _run("full", 1e-4, (10.0, 0.10), val_bpc=2.1),
        "full@0.0003": _run("full", 3e-4, (20.0, 0.40), dial=[(0.5, 12.0, 0.05)], val_bpc=2.0),
        "full@0.001": _run("full", 1e-3, (22.0, 0.90), val_bpc=2.05),
        "control-a@0.0001": _run("control-a", 1e-4, (8.0, 0.02), val_bpc=2.3),
        "control-a@0.001": _run("control-a", 1e-3, (16.0, 0.30), dial=[(0.5, 10.0, 0.04)], val_bpc=2.2),
        "control-b@0.001": _run("control-b", 1e-3, (18.0, 0.35), dial=[(0.5, 15.0, 0.20)], val_bpc=2.1),
    }
    runs.update(extra)
    for name, run in runs.items():
        run["variant"] = name
    return runs


def test_the_rate_is_chosen_on_validation_only_and_waits_for_the_whole_grid():
    runs = _runs()
    assert report.chosen_rate("cpt", "control-a", (1e-4, 1e-3), runs) == 1e-3  # lower validation bpc, whatever its KL
    assert report.chosen_rate("cpt", "control-a", (1e-4, 1e-3, 3e-3), runs) is None  # 3e-3 not run yet
    runs["control-a@0.0001"]["checkpoints"][-1]["spanish_val"]["bpc"] = 2.2  # a tie goes to the lower rate
    assert report.chosen_rate("cpt", "control-a", (1e-4, 1e-3), runs) == 1e-4
    assert report.chosen_rate("cpt", "full", (1e-4, 3e-4, 1e-3), runs) == 3e-4


def test_the_reference_chosen_at_the_edge_of_its_grid_waits_for_one_rate_beyond_it():
    rates = (1e-4, 3e-4, 1e-3)
    runs = _runs()
    assert report.beyond_rate("cpt", "full", rates, runs) is False  # an inner rate: no run beyond
    assert report.beyond_rate("cpt", "control-a", (1e-4, 1e-3), runs) == 3e-3  # its top rate: one run beyond
    runs["full@0.0001"]["checkpoints"][-1]["spanish_val"]["bpc"] = 1.9  # validation now picks the lowest rate
    below = report.BEYOND["full"][0]
    assert report.beyond_rate("cpt", "full", rates, runs) == below
    assert report.chosen_rate("cpt", "full", rates, runs) is None  # waits for the run beyond the grid
    assert report.analyse("cpt", BASE, runs, FAMILIES, (42,))["levels"] == []
    runs["full@beyond"] = _run("full", below, (6.0, 0.02), val_bpc=1.95, name="full@beyond")
    assert report.chosen_rate("cpt", "full", rates, runs) == 1e-4  # now an inner rate of the four
    an = report.analyse("cpt", BASE, runs, FAMILIES, (42,))
    assert an["rows"]["full"] == "full@0.0001" and an["levels"]
    assert [(g["lr"], g["beyond"], g["edge"]) for g in an["grid"] if g["family"] == "full" and g["chosen"]] == \
        [(1e-4, False, None)]
    runs["full@beyond"]["checkpoints"][-1]["spanish_val"]["bpc"] = 1.8
    an = report.analyse("cpt", BASE, runs, FAMILIES, (42,))
    assert report.chosen_rate("cpt", "full", rates, runs) == below and an["rows"]["full"] == "full@beyond"
    assert [(g["beyond"], g["edge"]) for g in an["grid"] if g["chosen"] and g["family"] == "full"] == [(True, "bottom")]
    assert an["rows"]["full-gentle"] == "full@0.0001"  # gentle stays the grid's lowest rate


def test_a_family_other_than_the_reference_at_its_edge_gets_a_row_beyond_and_keeps_its_choice():
    runs = _runs()  # control-a chose 1e-3, the top of (1e-4, 1e-3)
    assert report.beyond_pair("control-a", (1e-4, 1e-3)) == (3.3e-05, 3e-3)
    assert report.chosen_rate("cpt", "control-a", (1e-4, 1e-3), runs) == 1e-3  # no waiting for the run beyond
    an = report.analyse("cpt", BASE, runs, FAMILIES, (42,))
    assert "control-a-beyond" not in an["rows"]
    runs["control-a@beyond"] = _run("control-a", 3e-3, (19.0, 0.5), val_bpc=2.0, name="control-a@beyond")
    an = report.analyse("cpt", BASE, runs, FAMILIES, (42,))
    assert report.chosen_rate("cpt", "control-a", (1e-4, 1e-3), runs) == 1e-3  # the choice stays on the grid
    assert an["rows"]["control-a"] == "control-a@0.001" and an["rows"]["control-a-beyond"] == "control-a@beyond"
    beyond = [g for g in an["grid"] if g["family"] == "control-a" and g["beyond"]]
    assert [(g["lr"], g["validation_prefers"]) for g in beyond] == [(3e-3, True)]  # 2.0 bpc against 2.2
    md = report.markdown({"cpt": an}, _Settings(), BASE, "cmd", 1, 1)
    assert "control-a@0.003 (beyond the grid)" in md
    assert "control-a (the higher rate 0.003: validation prefers it)" in md
    runs["control-a@beyond"]["checkpoints"][-1]["spanish_val"]["bpc"] = 2.4
    an = report.analyse("cpt", BASE, runs, FAMILIES, (42,))
    assert [g["validation_prefers"] for g in an["grid"] if g["beyond"]] == [False]


def test_seed_and_mixed_runs_are_not_grid_points():
    runs = _runs(**{"full@chosen-seed1": _run("full", 3e-4, (1.0, 0.0), val_bpc=0.1, seed=1)})
    runs["full@chosen-mix"] = dict(_run("full", 3e-4, (1.0, 0.0), val_bpc=0.1), mix=True)
    assert sorted(report.grid_runs("full", runs)) == [1e-4, 3e-4, 1e-3]


def test_rows_are_read_on_the_envelope_of_their_trajectory_and_dial_at_shares_of_the_reference_gain():
    an = report.analyse("cpt", BASE, _runs(), FAMILIES, (42,))
    assert an["rows"] == {"full": "full@0.0003", "full-gentle": "full@0.0001", "control-a": "control-a@0.001",
                          "control-b": "control-b@0.001"}
    ref = _gain(20.0)
    assert an["levels"] == pytest.approx([0.5 * ref, 0.75 * ref, 0.9 * ref])
    at50 = an["equal_gain"]["0.5"]
    # full@3e-4's envelope: (0, 0), half (10 nats, 0.1), dial (12, 0.05), end (20, 0.4): the half-way
    # point is dominated by the dial point, so 10 nats is read between (0, 0) and (12, 0.05)
    assert at50["full"]["kl"] == pytest.approx(0.05 * 10 / 12)
    # control-a@1e-3: half (8, 0.075), dial (10, 0.04), end (16, 0.3): 10 nats is the dial point
    assert at50["control-a"]["kl"] == pytest.approx(0.04)
    assert at50["control-a"]["kl_vs_best"] == "best"
    assert at50["full"]["kl_vs_best"] == "above"  # every item moves alike: the SEs are 0
    # 90% = 18 nats: control-a's best gain is 16 nats, not reached
    assert an["equal_gain"]["0.9"]["control-a"]["kl"] is None
    assert an["equal_gain"]["0.9"]["control-b"]["kl"] == pytest.approx(0.35)
    assert an["claim"]["control-b"]["kl_ratio_at_90"] == pytest.approx(0.35 / 0.40)
    assert not an["claim"]["control-b"]["meets"]
    words = report.reading(an)
    assert "at 50% control-a (0.0400)" in words and "at 75% full (0.1813)" in words  # 0.05 + 3/8 * 0.35
    assert "gain): no row." in words and words.endswith("best or tied at some level: control-a.")


def test_no_levels_before_full_fine_tuning_has_its_grid_or_when_it_gained_nothing():
    runs = _runs()
    del runs["full@0.0001"]
    assert report.analyse("cpt", BASE, runs, FAMILIES, (42,))["levels"] == []
    flat = _runs()
    for name in ("full@0.0001", "full@0.0003", "full@0.001"):
        flat[name] = _run("full", flat[name]["lr"], (0.0, 0.1), val_bpc=flat[name]["checkpoints"][-1]["spanish_val"]["bpc"])
    an = report.analyse("cpt", BASE, flat, FAMILIES, (42,))
    assert an["levels"] == [] and an["reference"]["gain"] == 0.0


def test_best_control_is_the_least_kl_at_three_quarters_of_the_reference_gain():
    runs = _runs()
    # 75% of 20 nats = 15 nats: control-a reaches 16 nats at 0.3 (interpolated 0.04 -> 0.3 between 10 and 16
    # nats: 0.2567), control-b has a dial point at 15 nats, KL 0.2
    assert report.best_control("cpt", BASE, runs, None, families=FAMILIES) == "control-b"
    del runs["control-a@0.0001"]
    assert report.best_control("cpt", BASE, runs, None, families=FAMILIES) is None  # a grid is unfinished


def test_a_verdict_across_seeds_needs_the_same_sign_at_every_seed():
    fam = {"full": FAMILIES["full"], "lora-r16": ({"method": "lora"}, (1e-3,))}
    runs = {"full@0.0001": _run("full", 1e-4, (10.0, 0.10), val_bpc=2.1),
            "full@0.0003": _run("full", 3e-4, (20.0, 0.40), val_bpc=2.0),
            "full@0.001": _run("full", 1e-3, (22.0, 0.90), val_bpc=2.05),
            "full@chosen-seed1": _run("full", 3e-4, (20.0, 0.30), seed=1),
            "lora-r16@0.001": _run("lora-r16", 1e-3, (20.0, 0.50)),
            "lora-r16@chosen-seed1": _run("lora-r16", 1e-3, (20.0, 0.20), seed=1)}
    an = report.analyse("cpt", BASE, runs, fam, (42, 1))
    seeds = an["seeds"]
    assert seeds["rows"]["full"]["seeds"] == [1, 42] and seeds["rows"]["lora-r16"]["seeds"] == [1, 42]
    pair = [p for p in seeds["pairs"] if {p["a"], p["b"]} == {"full", "lora-r16"}]
    # seed 42: full below LoRA at every level; seed 1: above
    assert pair and all(p["holds"] == "mixed" for p in pair)
    runs["lora-r16@chosen-seed1"] = _run("lora-r16", 1e-3, (20.0, 0.60), seed=1)
    an = report.analyse("cpt", BASE, runs, fam, (42, 1))
    pair = [p for p in an["seeds"]["pairs"] if {p["a"], p["b"]} == {"full", "lora-r16"}]
    assert all(p["holds"] == ("a below" if p["a"] == "full" else "a above") for p in pair)


COMMITTED = os.path.join(ROOT, "benchmarks", "results", "retention_runs", "frontier")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "base.json")), reason="no committed frontier records")
def test_report_only_regenerates_the_committed_frontier_results_from_the_records(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(COMMITTED, results / "retention_runs" / "frontier")
    script = os.path.join(ROOT, "benchmarks", "retention", "frontier.py")
    # --estimate on a fresh run folder reads the base model's scores from the committed base.json too
    listed = subprocess.run([sys.executable, script, "--estimate", "--runs", str(tmp_path / "runs"),
                             "--results", str(results)], capture_output=True, text=True, timeout=900)
    assert listed.returncode == 0, listed.stderr[-2000:]
    records = sum(n.endswith(".json") for e in ("cpt", "csft") if os.path.isdir(os.path.join(COMMITTED, e))
                  for n in os.listdir(os.path.join(COMMITTED, e)))
    assert sum(line.split()[-1] == "done" for line in listed.stdout.splitlines()) == records
    out = subprocess.run([sys.executable, script, "--report-only", "--runs", str(tmp_path / "runs"),
                          "--results", str(results)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("retention_frontier.md", "retention_frontier.json"):
        with open(os.path.join(ROOT, "benchmarks", "results", name), encoding="utf-8") as f:
            committed = f.read()
        assert (results / name).read_text(encoding="utf-8") == committed, name
    assert json.loads((results / "retention_frontier.json").read_text())["finished_runs"] > 0


def test_a_validation_tie_is_reported_and_the_run_beyond_the_grid_is_a_row_of_its_own():
    rates = (1e-4, 3e-4, 1e-3)
    runs = _runs()
    runs["full@0.0001"]["checkpoints"][-1]["spanish_val"]["bpc"] = 1.9  # the lowest rate: a run beyond
    below = report.BEYOND["full"][0]
    runs["full@beyond"] = _run("full", below, (6.0, 0.02), val_bpc=1.95, name="full@beyond")
    runs["control-a@0.0001"]["checkpoints"][-1]["spanish_val"]["bpc"] = 2.2  # tied with 1e-3
    assert report.validation_ties("cpt", "control-a", (1e-4, 1e-3), runs) == [1e-3]
    assert report.validation_ties("cpt", "full", rates, runs) == []
    an = report.analyse("cpt", BASE, runs, FAMILIES, (42,))
    assert an["rows"]["full"] == "full@0.0001" and an["rows"]["full-beyond"] == "full@beyond"
    chosen = [g for g in an["grid"] if g["family"] == "control-a" and g["chosen"]]
    assert [(g["lr"], g["val_tied_with"]) for g in chosen] == [(1e-4, [1e-3])]
    md = report.markdown({"cpt": an}, _Settings(), BASE, "cmd", 1, 1)
    assert "tied on validation with 0.001: ties go to the lower rate" in md
    assert f"full@{below:g} (beyond the grid)" in md  # the row beyond the grid is in the table
    # Control / full ratios, each with a paired interval
    assert "control-a / full-beyond" in an["ratios"] and len(an["ratios"]["control-a / full"]) == 3
    # the claim against every full rate as the reference, the beyond run included
    assert set(an["claim_by_reference"]) == {f"{lr:g}" for lr in (below, *rates)}


class _Settings:
    cpt_steps = cpt_batch = cpt_seq = sft_steps = sft_batch = 1
    spanish_test = arith_test = english_texts = mc_items = 1
    dial_points = (0.5,)


def test_the_seed_table_counts_the_seeds_that_reach_each_level():
    fam = {"full": FAMILIES["full"], "lora-r16": ({"method": "lora"}, (1e-3,))}
    runs = {"full@0.0001": _run("full", 1e-4, (10.0, 0.10), val_bpc=2.1),
            "full@0.0003": _run("full", 3e-4, (20.0, 0.40), val_bpc=2.0),
            "full@0.001": _run("full", 1e-3, (22.0, 0.90), val_bpc=2.05),
            "lora-r16@0.001": _run("lora-r16", 1e-3, (20.0, 0.50)),
            "lora-r16@chosen-seed1": _run("lora-r16", 1e-3, (16.0, 0.20), seed=1)}  # short of 90% (18 nats)
    row = report.analyse("cpt", BASE, runs, fam, (42, 1))["seeds"]["rows"]["lora-r16"]
    assert row["reached"] == [2, 2, 1]
    # the mean of the one seed that reaches: seed 42 at 18 nats, between (10, 0.125) and (20, 0.5)
    assert row["mean"][2] == pytest.approx(0.425) and row["sd"][2] is None
