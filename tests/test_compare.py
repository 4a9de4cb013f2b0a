"""controlllm.compare: methods trained over a rate grid chosen on validation, read at equal gain along
their dials, with bootstrap intervals that re-make every choice; a recommendation only where the
interval excludes a tie; resumable from per-run records."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_CORPUS, make_model, make_tokenizer
from controlllm import compare as cmp


def _loader():
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return model, tokenizer


@pytest.fixture()
def files(tmp_path):
    out = {}
    for name, texts in (("train", TOKENIZER_CORPUS * 20), ("validation", TOKENIZER_CORPUS[:4]),
                        ("test", TOKENIZER_CORPUS[1:5]), ("keep", TOKENIZER_CORPUS[2:6])):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n\n".join(texts))
        out[name] = str(path)
    return out


def test_compare_end_to_end_at_toy_size_and_resumes_from_its_records(tmp_path, files, monkeypatch):
    output = tmp_path / "cmp"
    options = dict(task="cpt", output=str(output), methods=("full", "lora"),
                   rates={"full": (1e-4, 1e-3), "lora": (1e-3, 1e-2)}, seeds=(42,), steps=2, batch_size=2,
                   seq_len=32, dial_values=(0.5, 1.0), bootstrap=40, threads=1, progress=False)
    an = cmp.compare(**files, loader=_loader, **options)
    runs = sorted(os.listdir(output / "runs"))
    assert runs == ["full@0.0001-seed42.json", "full@0.001-seed42.json", "lora@0.001-seed42.json",
                    "lora@0.01-seed42.json"]  # the training folders are gone, the records stay
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (output / name).stat().st_size > 0
    assert an["reference"] == "full" and an["missing"] == []
    for m in ("full", "lora"):
        t = an["table"][m]
        assert t["lr"] in options["rates"][m] and t["train_seconds"] > 0 and t["trainable_parameters"] > 0
        assert np.isfinite(t["peak_memory_mib"]) and 0 <= t["rate_chosen_share"] <= 1
        assert t["points"][0]["value"] == [0.0, 0.5, 1.0] and t["points"][0]["kl"][0] == 0.0  # s = 0 is the base
    saved = json.loads((output / "compare.json").read_text())
    assert saved["analysis"]["methods"] == ["full", "lora"]
    md = (output / "compare.md").read_text()
    assert "| full |" in md and "| lora |" in md and "peak memory" in md

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(cmp, "train_and_score", no_training)
    again = cmp.compare(**files, loader=_loader, **options)
    assert again["table"]["full"]["lr"] == an["table"]["full"]["lr"]
    # a different budget is another plan: its runs are not reused
    with pytest.raises(AssertionError, match="trained again"):
        cmp.compare(**files, loader=_loader, **{**options, "steps": 3})


def test_low_rank_control_is_a_method_of_the_comparison(tmp_path, files):
    an = cmp.compare(**files, loader=_loader, task="cpt", output=str(tmp_path / "cmp"),
                     methods=("full", "control-lowrank"), rates={"full": (1e-3,), "control-lowrank": (3e-3,)},
                     seeds=(42,), steps=2, batch_size=2, seq_len=32, dial_values=(0.5, 1.0), bootstrap=20, threads=1,
                     progress=False)
    full, low = an["table"]["full"], an["table"]["control-lowrank"]
    assert low["lr"] == 3e-3 and low["points"][0]["kl"][0] == 0.0  # s = 0 is the base
    assert 0 < low["trainable_parameters"] < full["trainable_parameters"] / 4  # factors, not copies
    assert cmp.METHODS["control-lowrank"][0]["copy_rank"] == 16


def test_score_dial_in_one_pass_equals_each_unit_scored_alone_with_far_fewer_dial_settings():
    from controlllm.dial import Dial, dial_curve

    model, tokenizer = _loader()
    base, _ = _loader()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a "trained" model: WiSE-FT moves every weight
    dial = Dial(model, base=base)
    sets = []
    real_set = dial.set
    dial.set = lambda v: sets.append(v) or real_set(v)
    learn = [TOKENIZER_CORPUS[i % len(TOKENIZER_CORPUS)] for i in range(12)]
    keep = [TOKENIZER_CORPUS[(i + 3) % len(TOKENIZER_CORPUS)] for i in range(12)]
    learn_groups, keep_groups = cmp._groups(learn, 6), cmp._groups(keep, 6)
    units = cmp.score_dial(dial, tokenizer, learn_groups, keep_groups, (0.5, 1.0), 32)
    one_pass = len(sets)
    sets.clear()
    for unit, lg, kg in zip(units, learn_groups, keep_groups):
        points = dial_curve(dial, tokenizer, lg, kg, values=(0.5, 1.0), seq_len=32, progress=False)
        assert unit["learn_chars"] == points[0].learn_characters and unit["keep_chars"] == points[0].keep_characters
        for got, p in zip(unit["points"], points):
            assert got["value"] == p.value and got["keep_tokens"] == p.keep_tokens
            assert got["learn_bits"] == pytest.approx(p.learn_bpc * p.learn_characters, rel=1e-6)
            assert got["keep_bits"] == pytest.approx(p.keep_bpc * p.keep_characters, rel=1e-6)
            assert got["kl_sum"] == pytest.approx(p.kl * p.keep_tokens, rel=1e-5, abs=1e-9)
        assert unit["points"][-1]["kl_sum"] > 0
    assert one_pass * 3 <= len(sets)  # 6 units scored alone set the dial 6 times as often as one pass over 2 batches


def test_every_test_item_is_scored_when_the_keep_data_has_fewer_items_than_units(tmp_path, files):
    path = tmp_path / "keep2.txt"
    path.write_text("\n\n".join(TOKENIZER_CORPUS[2:4]))  # 2 keep texts, 4 test texts, 64 units asked for
    cmp.compare(**{**files, "keep": str(path)}, loader=_loader, task="cpt", output=str(tmp_path / "cmp"),
                methods=("full",), rates={"full": (1e-3,)}, seeds=(42,), steps=1, batch_size=2, seq_len=32,
                dial_values=(1.0,), bootstrap=20, threads=1, progress=False)
    record = json.loads((tmp_path / "cmp" / "runs" / "full@0.001-seed42.json").read_text())
    scored = sum(u["learn_chars"] for u in record["test"])
    assert len(record["test"]) == 2 and scored == sum(len(t) for t in TOKENIZER_CORPUS[1:5])


@pytest.fixture()
def chat_files(tmp_path):
    """Chats (prompt / response) for an SFT comparison: sums to learn, greetings to keep."""
    sums = [{"prompt": f"What is {a} plus {b}?", "response": f"{a + b}"} for a in range(6) for b in range(6)]
    keep = [{"prompt": p, "response": r} for p, r in (("Hello there, how are you today?", "I am fine, thank you."),
                                                       ("What is the capital of France?", "Paris is."),
                                                       ("What is the capital of Spain?", "Madrid is."))]
    out = {}
    for name, rows in (("train", sums), ("validation", sums[:4]), ("test", sums[4:8]), ("keep", keep)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        out[name] = str(path)
    return out


def test_sdft_runs_beside_full_fine_tuning_on_chats_and_reports_its_rows(tmp_path, chat_files, capsys):
    output = tmp_path / "cmp"
    options = dict(task="sft", output=str(output), methods=("full", "sdft"),
                   rates={"full": (1e-3,), "sdft": (1e-4, 1e-3)}, seeds=(42,), steps=2, batch_size=2, seq_len=32,
                   dial_values=(0.5, 1.0), bootstrap=20, threads=1, progress=False)
    an = cmp.compare(**chat_files, loader=_loader, **options)
    assert sorted(os.listdir(output / "runs")) == ["full@0.001-seed42.json", "sdft@0.0001-seed42.json",
                                                    "sdft@0.001-seed42.json"]
    assert an["methods"] == ["full", "sdft"] and an["missing"] == []
    record = json.loads((output / "runs" / "sdft@0.001-seed42.json").read_text())
    assert record["method"] == "sdft" and record["train_seconds"] > 0 and np.isfinite(record["peak_memory_mib"])
    assert record["dial_kind"] == json.loads((output / "runs" / "full@0.001-seed42.json").read_text())["dial_kind"]
    t = an["table"]["sdft"]
    assert t["lr"] in (1e-4, 1e-3) and t["trainable_parameters"] == an["table"]["full"]["trainable_parameters"]
    p = t["points"][0]
    assert p["value"] == [0.0, 0.5, 1.0] and p["kl"][0] == 0.0 and p["kl"][-1] > 0  # it moved off the base
    md = (output / "compare.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| sdft |"))
    assert row.count("|") == 9 and f"{t['trainable_parameters']:,}" in row  # the row, its cost beside it
    with capsys.disabled():
        print("\n" + "\n".join(line for line in md.splitlines() if line.startswith(("| method", "| full", "| sdft"))))


def test_sdft_saves_a_run_folder_that_opens_as_full_weights_on_its_base(tmp_path):
    from controlllm.integrations.sdft import SDFTError, sdft_records, train_sdft
    from controlllm.runs import open_run

    chats = [[{"role": "user", "content": f"What is {a} plus {a}?"}, {"role": "assistant", "content": f"{2 * a}"}]
             for a in range(4)]
    assert sdft_records(chats[:1]) == [{"prompt": chats[0][:1], "privileged_context": "0"}]
    with pytest.raises(SDFTError, match="needs a user turn"):
        sdft_records([[{"role": "assistant", "content": "hi"}]])
    model, tokenizer = _loader()
    result = train_sdft(model, tokenizer, chats, str(tmp_path / "run"), lr=1e-3, steps=1, batch_size=2, seq_len=24,
                        seed=1, threads=1, progress=False)
    run = open_run(tmp_path / "run")
    assert run.kind == "full" and run.record["method"] == "sdft" and run.base_path == result.base_path
    trained, _ = run.model()
    base, _ = run.base_model()
    fresh, _ = _loader()
    for (name, a), b, c in zip(trained.named_parameters(), base.parameters(), fresh.parameters()):
        assert torch.equal(b, c), name  # the recorded base is the model SDFT started from
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))
    # a tokenizer without a chat template: prompts rendered as `controlllm train` renders chats
    model, _ = _loader()
    plain = make_tokenizer(chat_template=None)
    train_sdft(model, plain, chats, str(tmp_path / "plain"), lr=1e-3, steps=1, batch_size=2, seq_len=24, threads=1,
               progress=False)
    assert open_run(tmp_path / "plain").kind == "full"


def test_sdft_save_steps_writes_weight_checkpoints_that_hold_the_trained_weights(tmp_path):
    from safetensors.torch import load_file

    from controlllm.integrations.sdft import train_sdft

    chats = [[{"role": "user", "content": f"What is {a} plus {a}?"}, {"role": "assistant", "content": f"{2 * a}"}]
             for a in range(4)]
    model, tokenizer = _loader()
    result = train_sdft(model, tokenizer, chats, str(tmp_path / "run"), lr=1e-3, steps=2, batch_size=2, seq_len=24,
                        seed=1, threads=1, progress=False, save_steps=1)
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint-")) == ["checkpoint-1",
                                                                                             "checkpoint-2"]
    assert not (tmp_path / "run" / "checkpoint-1" / "optimizer.pt").exists()  # weights only
    first = load_file(str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"))
    last = load_file(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"))
    trained = dict(result.model.named_parameters())
    assert all(torch.equal(last[k], trained[k].detach().cpu()) for k in last)  # the end state, bit for bit
    assert any(not torch.equal(first[k], last[k]) for k in first)  # step 1 is another state
    assert not any(n.startswith("checkpoint-") for n in os.listdir(
        train_sdft(*_loader(), chats, str(tmp_path / "none"), lr=1e-3, steps=1, batch_size=2, seq_len=24,
                   threads=1, progress=False).output))


def test_sft_defaults_add_sdft_and_cpt_refuses_it(files, tmp_path):
    assert cmp.CompareConfig(train="a", validation="b", test="c", keep="d").methods == (
        "full", "lora", "control", "sdft")
    assert "sdft" not in cmp.CompareConfig(train="a", validation="b", test="c", keep="d", task="cpt").methods
    assert cmp.CompareConfig(train="a", validation="b", test="c", keep="d").grid("sdft") == (1e-5, 3e-5, 1e-4)
    import argparse

    parser = argparse.ArgumentParser()
    cmp.add_arguments(parser)
    flags = ["--train", "a", "--validation", "b", "--test", "c", "--keep", "d"]
    assert cmp.config_from_args(parser.parse_args(flags)).methods == cmp.DEFAULT_METHODS["sft"]
    assert cmp.config_from_args(parser.parse_args([*flags, "--task", "cpt"])).methods == cmp.DEFAULT_METHODS["cpt"]
    with pytest.raises(cmp.CompareError, match="'sdft' learn from chats"):
        cmp.compare(**files, task="cpt", methods=("full", "sdft"), output=str(tmp_path / "x"), loader=_loader)


def _record(method, lr, kl_scale, gain_bits=1.0, val_bits=1.0, units=20, noise=0.0, seed=0):
    """A synthetic run: per unit, dial s gives gain s * gain_bits bits per char and KL kl_scale * s^2."""
    rng = np.random.default_rng(seed)
    values = [0.0, 0.5, 1.0]
    test = []
    for _ in range(units):
        k = kl_scale * (1 + noise * rng.standard_normal())
        test.append({"learn_chars": 100, "keep_chars": 100, "points": [
            {"value": s, "learn_bits": 300 - 100 * gain_bits * s, "keep_bits": 200.0, "kl_sum": 50 * k * s * s,
             "keep_tokens": 50.0} for s in values]})
    val = [{"learn_chars": 100, "points": [{"value": 0.0, "learn_bits": 300.0},
                                          {"value": 1.0, "learn_bits": 300 - 100 * val_bits}]} for _ in range(units)]
    return {"name": cmp.run_name(method, lr, 42), "method": method, "lr": lr, "seed": 42, "test": test,
            "validation": val, "train_seconds": 1.0, "peak_memory_mib": 10.0, "memory_kind": "test",
            "trainable_parameters": 5, "dial_kind": "test"}


def _cfg(**kw):
    return cmp.CompareConfig(train="t", validation="v", test="x", keep="k", methods=("full", "lora"),
                             rates={"full": (1e-4, 1e-3), "lora": (1e-3,)}, bootstrap=100, **kw)


def test_the_rate_is_chosen_on_validation_and_a_clear_winner_is_recommended():
    records = {r["name"]: r for r in (
        _record("full", 1e-4, 0.10, val_bits=0.9), _record("full", 1e-3, 0.01, val_bits=1.0),  # 1e-3 validates best
        _record("lora", 1e-3, 0.50, noise=0.05, seed=1))}
    an = cmp.analyse(records, _cfg())
    assert an["table"]["full"]["lr"] == 1e-3 and an["table"]["full"]["edge"] == "top"
    assert an["levels"] == pytest.approx([0.5, 0.75, 0.9])
    at50 = an["equal_gain"][0]
    # full at 1e-3: KL 0.01 s^2, read at s = 0.5 (gain 0.5): 0.0025
    assert at50["methods"]["full"]["kl"] == pytest.approx(0.0025)
    assert at50["best"] == "full" and at50["recommend"] == "full" and at50["margin_interval"][0] > 0


def test_no_recommendation_where_the_interval_includes_a_tie_and_validation_ties_go_to_the_lower_rate():
    records = {r["name"]: r for r in (
        _record("full", 1e-4, 0.10, noise=0.5, seed=2), _record("full", 1e-3, 0.50),  # equal validation: 1e-4
        _record("lora", 1e-3, 0.10, noise=0.5, seed=3))}
    an = cmp.analyse(records, _cfg())
    assert an["table"]["full"]["lr"] == 1e-4 and an["table"]["full"]["validation_ties"] == [1e-3]
    for lv in an["equal_gain"]:
        assert lv["recommend"] is None and lv["tied"]  # same KL up to noise: a tie, said as a tie
        assert lv["margin_interval"][0] <= 0 <= lv["margin_interval"][1]
    md = cmp.markdown(an, _cfg())
    assert "tie:" in md and "No recommendation" in md and "tied on validation with 0.001" in md


def test_a_bad_plan_fails_before_anything_trains(files, tmp_path):
    with pytest.raises(cmp.CompareError, match="'dpo' not supported"):
        cmp.compare(**files, methods=("full", "dpo"), output=str(tmp_path / "x"), loader=_loader)
    with pytest.raises(cmp.CompareError, match="--keep"):
        cmp.compare(**{**files, "keep": str(tmp_path / "missing.txt")}, output=str(tmp_path / "x"), loader=_loader)
    with pytest.raises(cmp.UserError):
        cmp.compare(**files, task="dpo", output=str(tmp_path / "x"), loader=_loader)


def test_the_command_line_flags_make_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    cmp.add_arguments(parser)
    args = parser.parse_args(["--train", "a", "--validation", "b", "--test", "c", "--keep", "d", "--task", "cpt",
                              "--methods", "full,control", "--rates", "full=1e-5,3e-5", "--seeds", "1,2"])
    cfg = cmp.config_from_args(args)
    assert cfg.methods == ("full", "control") and cfg.grid("full") == (1e-5, 3e-5) and cfg.seeds == (1, 2)
    assert cfg.grid("control") == cmp.METHODS["control"][1]
    with pytest.raises(cmp.CompareError, match="METHOD=LR"):
        cmp.config_from_args(parser.parse_args(["--train", "a", "--validation", "b", "--test", "c", "--keep", "d",
                                                "--rates", "1e-5"]))
