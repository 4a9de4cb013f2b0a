"""The retention benchmark's own measuring code, on tiny random models (the benchmark itself runs
on the real model with `make bench-retention`)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from conftest import TOKENIZER_CORPUS, make_model, make_tokenizer
from controlllm import ControlConfig, get_control_model
from controlllm.evaluation import heldout_loss, kl_to_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "retention"))
tasks = pytest.importorskip("retention_tasks")
report = pytest.importorskip("retention_report")
run = pytest.importorskip("run")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256)
    return model, tokenizer


def test_per_text_nll_sums_to_the_library_heldout_loss(tiny):
    model, tokenizer = tiny
    texts = TOKENIZER_CORPUS[:5]
    scores = tasks.per_text_scores(model, tokenizer, texts, seq_len=128, batch_size=2)
    whole = heldout_loss(model, tokenizer, texts, seq_len=128, batch_size=3, progress=False)
    assert sum(scores["tokens"]) == whole["tokens"]
    assert math.isclose(tasks.bpc(scores), whole["bpc"], rel_tol=1e-5)


def test_per_text_kl_matches_the_library_and_is_zero_at_init(tiny):
    model, tokenizer = tiny
    control = get_control_model(make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256),
                                ControlConfig(num_expanded_layers=2))

    def base(ids, mask):
        with control.disable_control():
            return control(input_ids=ids, attention_mask=mask).logits

    texts = TOKENIZER_CORPUS[:4]
    at_init = tasks.per_text_scores(control, tokenizer, texts, reference=base, batch_size=2)
    assert max(abs(k) for k in at_init["kl"]) < 1e-6  # an untrained Control model is the base model
    with torch.no_grad():
        for p in control.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    moved = tasks.per_text_scores(control, tokenizer, texts, reference=base, batch_size=2)
    # Batched and padded, each text's KL equals that of the text alone, over its predicted positions.
    for text, kl in zip(texts, moved["kl"]):
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)])[:, :-1]
        mask = torch.ones_like(ids)
        with torch.no_grad():
            log_q = control(input_ids=ids, attention_mask=mask).logits[0].log_softmax(-1)
            log_p = base(ids, mask)[0].log_softmax(-1)
        assert kl == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum()), rel=1e-4)
    # The library's mean KL also scores the position after each text's last token: close, not equal.
    library = kl_to_reference(control, "base", tokenizer, texts, seq_len=256, batch_size=3, progress=False)
    assert sum(moved["kl"]) / sum(moved["tokens"]) == pytest.approx(library, rel=0.2)


def test_wise_ft_interpolates_between_the_base_and_the_tuned_weights(tiny):
    _, tokenizer = tiny
    base = make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256)
    tuned = make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
    ids = torch.tensor([tokenizer.encode(TOKENIZER_CORPUS[0])[:24]])
    with torch.no_grad():
        want_base, want_tuned = base(input_ids=ids).logits, tuned(input_ids=ids).logits
    model = make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256)
    with torch.no_grad():
        run.interpolate_weights(model, base_state, tuned_state, 0.0)
        assert torch.equal(model(input_ids=ids).logits, want_base)
        run.interpolate_weights(model, base_state, tuned_state, 1.0)
        assert torch.equal(model(input_ids=ids).logits, want_tuned)
        run.interpolate_weights(model, base_state, tuned_state, 0.25)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(model.state_dict()[name], 0.75 * base_state[name] + 0.25 * tuned_state[name], atol=1e-6)
    with pytest.raises(ValueError, match="differ in weights"):
        run.interpolate_weights(model, {k: v for k, v in base_state.items() if k != name}, tuned_state, 0.5)


def test_paired_change_and_its_standard_error():
    change, se = tasks.paired_change([0, 1, 1, 0], [1, 1, 0, 1])
    assert change == pytest.approx(0.25)
    d = [1, 0, -1, 1]
    sd = math.sqrt(sum((x - 0.25) ** 2 for x in d) / 3)
    assert se == pytest.approx(sd / 2)
    # A constant shift has no paired uncertainty, however noisy the items are.
    assert tasks.paired_change([3.0, 10.0, -4.0], [3.5, 10.5, -3.5]) == pytest.approx((0.5, 0.0))
    weighted, _ = tasks.paired_change([1.0, 2.0], [2.0, 4.0], weights=[10, 20])
    assert weighted == pytest.approx(3.0 / 30)


def test_arithmetic_splits_never_share_a_problem_and_answers_are_right():
    test = tasks.arithmetic_items(50, seed=1)
    train = tasks.arithmetic_items(300, seed=3, exclude={it["key"] for it in test})
    assert not {it["key"] for it in test} & {it["key"] for it in train}
    for it in test + train:
        a, op, b = it["key"]
        assert int(it["answer"]) == (a + b if op == "+" else a - b)
        assert it["response"].endswith(f"= {it['answer']}")
        assert 10 <= a <= 999 and 10 <= b <= 999


def test_checkpoints_are_log_spaced_and_end_at_the_last_step():
    assert run.checkpoint_steps(200) == [25, 50, 100, 200]
    assert run.checkpoint_steps(48) == [6, 12, 24, 48]
    assert run.checkpoint_steps(4) == [1, 2, 4]
    assert run.checkpoint_steps(100) == [12, 24, 48, 100]
    for total in range(1, 2000):  # the Trainer writes checkpoints at multiples of the first, and at the end
        steps = run.checkpoint_steps(total)
        assert steps[-1] == total and all(s % steps[0] == 0 for s in steps[:-1]) and len(steps) >= min(total, 3)


def test_run_configs_compare_relative_to_the_run_folder_they_were_made_in():
    made_here = {"output": "/a/runs/full/seq/lora/stage2", "model": "/a/runs/full/seq/lora/stage1",
                 "data": "/a/runs/full/data/cpt_train.txt", "lr": 3e-4, "preset": None}
    elsewhere = {**made_here, "output": "/ci/x/runs/full/seq/lora/stage2", "model": "/ci/x/runs/full/seq/lora/stage1",
                 "data": "/ci/x/runs/full/data/cpt_train.txt"}
    assert run._portable_config(made_here) == run._portable_config(elsewhere)
    assert run._portable_config(made_here)["data"] == os.path.join("data", "cpt_train.txt")
    assert run._portable_config(made_here) != run._portable_config({**elsewhere, "lr": 1e-4})
    assert run._portable_config(made_here) != run._portable_config({**elsewhere, "data": "/ci/x/runs/full/data/other"})


def test_jobs_start_in_priority_order_and_are_balanced_over_workers():
    settings = run.full_settings()
    jobs = [(e, n) for e in run.EXPERIMENTS for n in settings.variants(e)]
    plan = run.assign(settings, jobs)
    assert sorted(j for part in plan for j in part) == sorted(jobs)
    assert {part[0] for part in plan} == {("cpt", "full"), ("cpt", "full-gentle")}  # the verdict's runs first
    for part in plan:  # every CPT run before any sequential one, on each worker
        kinds = [e for e, _ in part]
        assert kinds == sorted(kinds, key=run.EXPERIMENTS.index)
    loads = [sum(run.estimate_seconds(settings, *j) for j in part) for part in plan]
    assert max(loads) < 1.2 * min(loads)


def test_forgetting_is_read_on_the_trajectory_envelope():
    import numpy as np

    gains, values = np.array([0.0, 0.1, 0.3, 0.2]), np.array([0.0, 0.05, 0.25, 0.3])
    assert report.on_envelope(gains, values, 0.2) == pytest.approx(0.15)
    assert report.on_envelope(gains, values, 0.3) == pytest.approx(0.25)
    assert report.on_envelope(gains, values, 0.31) is None  # never reached
    # Interpolation is between envelope points, whatever their step order: gain 0.2 is reached at the
    # last checkpoint (0.4), not on the way up to 0.4 (the step path would give 0.3).
    assert report.on_envelope(np.array([0.0, 0.4, 0.2]), np.array([0.0, 0.6, 0.4]), 0.2) == pytest.approx(0.4)
    assert report.on_envelope(np.array([0.0, 0.4, 0.2]), np.array([0.0, 0.6, 0.4]), 0.1) == pytest.approx(0.2)


def test_frontier_keeps_only_undominated_checkpoints():
    rows = {"a": [{"step": 0, "gain": 0, "kl": 0}, {"step": 1, "gain": 0.2, "kl": 0.1}, {"step": 2, "gain": 0.4, "kl": 0.3}],
            "b": [{"step": 0, "gain": 0, "kl": 0}, {"step": 1, "gain": 0.2, "kl": 0.2}, {"step": 2, "gain": 0.5, "kl": 0.5}]}
    found = report.frontier(rows, "kl")
    assert [p["step"] for p in found["a"]] == [1, 2] and [p["step"] for p in found["b"]] == [2]


def _point(sp_nll, en_nll, kl, arith=None):
    point = {"spanish": {"nll": sp_nll, "chars": [100] * len(sp_nll), "bpc": sum(sp_nll) / math.log(2) / 100 / len(sp_nll)},
             "english": {"nll": en_nll, "chars": [100] * len(en_nll), "kl": kl, "tokens": [20] * len(kl),
                         "bpc": sum(en_nll) / math.log(2) / 100 / len(en_nll)},
             "spanish_val": {"bpc": sum(sp_nll)}}
    if arith is not None:
        point["arith"] = {"correct": arith, "exact_match": sum(arith) / len(arith)}
    return point


def test_equal_gain_analysis_pairs_methods_and_checks_the_claim():
    import random

    rng = random.Random(0)
    n = 12
    base_sp = [100 + rng.random() for _ in range(n)]
    base_en = [80 + rng.random() for _ in range(n)]
    base = {"cpt": _point(base_sp, base_en, [0.0] * n)}

    def run(name, drift_per_gain, method, scale=1.0):
        checkpoints = []
        for step, g in ((1, 5.0), (2, 10.0), (4, 20.0)):  # nats per text gained
            g *= scale
            checkpoints.append({"step": step, **_point([x - g + rng.random() * 0.1 for x in base_sp], base_en,
                                                       [drift_per_gain * g + rng.random() * 0.01 for _ in range(n)])})
        return {"experiment": "cpt", "variant": name, "config": {"method": method}, "checkpoints": checkpoints}

    runs = {"full-slow": run("full-slow", 0.2, "full", scale=0.5), "full": run("full", 0.4, "full"),
            "control-x": run("control-x", 0.05, "control")}
    # The merged model: 95% of full FT's last gain at a tenth of its KL; another at 80% of the gain.
    runs["control-x"]["merged"] = {"step": 4, **_point([x - 19.0 for x in base_sp], base_en, [0.8] * n)}
    runs["control-y"] = {**run("control-y", 1.0, "control"),
                         "merged": {"step": 4, **_point([x - 16.0 for x in base_sp], base_en, [0.1] * n)}}
    an = report.analyse("cpt", base, runs)
    assert an["reference"] == "full"  # of the full-FT learning rates, the better validation score
    levels = an["equal_gain"]
    assert len(levels) == 3
    ctrl = levels[-1]["methods"]["control-x"]["kl"]
    assert ctrl["ratio"] == pytest.approx(0.125, rel=0.1)  # 0.05 / 0.4 of full FT's KL at the same gain
    assert ctrl["minus_full"] < 0 and ctrl["minus_full_se"] > 0
    claim = {c["variant"]: c for c in an["claims"]}["control-x"]
    assert claim["kl"]["holds"]
    assert an["best_at_level"][-1]["best"] == "control-x"
    merged = {c["variant"]: c for c in an["claims"]}
    assert merged["control-x merged"]["max_gain_ratio"] == pytest.approx(0.95, rel=0.02)
    assert merged["control-x merged"]["kl"]["ratio"] == pytest.approx(0.1, rel=0.05)  # 0.8 / (0.4 x 20)
    assert merged["control-x merged"]["kl"]["holds"]
    short = merged["control-y merged"]["kl"]  # 80% of the gain: the ratio is shown, the claim fails
    assert short["ratio"] == pytest.approx(0.1 / 8, rel=0.05) and not short["gain_reached"] and not short["holds"]
    assert "control-x merged" in an["frontier"] and "control-y merged" in an["merged_points"]
    # A merged model against every curve at its own gain (19 nats of 20): full FT's KL there is about
    # 0.4 x 19 nats per text of 20 tokens, the merged model's 0.8.
    vs_full = an["at_merged_gain"]["control-x merged"]["methods"]["full"]
    assert vs_full["value"] == pytest.approx(0.4 * 19 / 20, rel=0.05)
    assert vs_full["minus"] == pytest.approx(0.8 / 20 - vs_full["value"]) and vs_full["minus_se"] > 0
    assert an["at_merged_gain"]["control-x merged"]["methods"]["full-slow"]["value"] is None  # reaches 10 only


def test_wise_ft_points_form_a_curve_of_their_own_that_is_never_the_reference():
    n = 6
    base = {"cpt": _point([100.0] * n, [80.0] * n, [0.0] * n)}
    full = {"experiment": "cpt", "variant": "full", "lr": 3e-4, "config": {"method": "full"},
            "checkpoints": [{"step": 4, "tokens": 64, **_point([80.0] * n, [80.0] * n, [1.0] * n)}],
            "wise_ft": [{"alpha": a, "step": 4, **_point([100 - 30 * a] * n, [80.0] * n, [a / 4] * n)}
                        for a in (0.75, 0.25)]}
    full["checkpoints"][0]["spanish_val"] = {"bpc": 9.0}
    full["wise_ft"][0]["spanish_val"] = {"bpc": 1.0}  # a better validation score must not make it the reference
    curves = report.with_wise_ft({"full": full})
    wise = curves["full WiSE-FT"]
    assert [c.get("alpha") for c in wise["checkpoints"]] == [0.25, 0.75, 1.0] and "wise_ft" not in wise
    an = report.analyse("cpt", base, curves)
    assert an["reference"] == "full"
    assert [r.get("alpha") for r in an["points"]["full WiSE-FT"]] == [None, 0.25, 0.75, 1.0]
    # Full FT's gain (20 nats per text) is reached between alpha 0.75 (22.5) and 0.25 (7.5) of the curve.
    assert [c["variant"] for c in an["claims"]] == ["full", "full WiSE-FT"]  # every curve, the reference too
    row = an["equal_gain"][0]["methods"]["full WiSE-FT"]["kl"]
    assert row["value"] == pytest.approx((0.25 / 4 + (20 - 7.5) / 15 * 0.5 / 4) / 20)  # KL per text / 20 tokens


@pytest.mark.slow
def test_quick_benchmark_runs_end_to_end(tmp_path):
    """`run.py --quick`: every code path on the real model (a few minutes)."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "retention", "run.py")
    out = subprocess.run([sys.executable, script, "--quick", "--runs", str(tmp_path / "runs"),
                          "--results", str(tmp_path / "report")], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "report" / "retention.json").read_text())
    assert result["complete"]
    cpt, seq = result["summary"]["cpt"], result["summary"]["seq"]
    assert len(cpt["full"]["checkpoints"]) == len(run.checkpoint_steps(run.quick_settings().cpt_steps))
    assert "mc" in cpt["full"]["checkpoints"][-1] and "merged" in cpt["control-nmse-8"]
    assert [c.get("alpha") for c in cpt["full WiSE-FT"]["checkpoints"]] == [0.5, 1.0]
    assert "mc" in cpt["full WiSE-FT"]["checkpoints"][0]
    assert "arith_loss" in seq["full"]["checkpoints"][-1]
    assert (tmp_path / "report" / "retention_cpt.png").is_file() and (tmp_path / "report" / "retention_seq.png").is_file()
    # On a new checkout (another run folder, no weights), the committed per-run records resume the plan:
    # nothing is trained again and the report is the same.
    again = subprocess.run([sys.executable, script, "--quick", "--runs", str(tmp_path / "elsewhere"),
                            "--results", str(tmp_path / "report")], capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "training" not in again.stdout and again.stdout.count("finished earlier") == len(run.quick_settings().cpt_variants) + len(seq)
    assert json.loads((tmp_path / "report" / "retention.json").read_text())["summary"] == result["summary"]


def test_skill_files_are_disjoint_sized_and_readable_by_compare(tmp_path):
    skills = pytest.importorskip("skills")
    from controlllm.dial import read_eval_texts

    counts = skills.write_data(str(tmp_path), test=30, validation=20, arith_train=50, keep=5)
    assert counts == {"arith_test.jsonl": 30, "arith_validation.jsonl": 20, "arith_train.jsonl": 50,
                      "sciq_test.jsonl": 30, "sciq_validation.jsonl": 20, "sciq_train.jsonl": 950, "keep.txt": 5}
    for skill in ("arith", "sciq"):
        splits = {s: read_eval_texts(str(tmp_path / f"{skill}_{s}.jsonl")) for s in ("train", "validation", "test")}
        assert [len(v) for v in splits.values()] == [counts[f"{skill}_{s}.jsonl"] for s in splits]
        prompts = {s: {chat[0]["content"] for chat in v} for s, v in splits.items()}
        assert not prompts["test"] & prompts["validation"] and not prompts["test"] & prompts["train"]
        assert all(chat[-1]["role"] == "assistant" and chat[-1]["content"] for chat in splits["test"])
    assert len(read_eval_texts(str(tmp_path / "keep.txt"))) == 5
    again = tmp_path / "again"
    skills.write_data(str(again), skills=("sciq",), test=30, validation=20, keep=5)
    assert (again / "sciq_test.jsonl").read_bytes() == (tmp_path / "sciq_test.jsonl").read_bytes()  # deterministic
    with pytest.raises(ValueError, match="leaves none to train on"):
        skills.sciq_splits(900, 100)
