"""The main job, end to end at smoke size on the real SmolLM2 (slow: loads the real model)."""

import json

import pytest

from controlllm.demo import format_table, spanish_chapters


def test_format_table_shows_change():
    before = {"spanish_bpc": 2.8, "english_bpc": 1.5, "arc_easy_acc": 0.5, "english_kl_to_base": 0.0}
    after = {"spanish_bpc": 2.3, "english_bpc": 1.51, "arc_easy_acc": 0.49, "english_kl_to_base": 0.02}
    table = format_table(before, after)
    assert "| new skill: Spanish held-out bits/char (lower is better) | 2.800 | 2.300 | -0.5000 |" in table
    assert table.count("\n") == 5
    dialled = {"spanish_bpc": 2.5, "english_bpc": 1.5, "arc_easy_acc": 0.5, "english_kl_to_base": 0.005}
    table = format_table(before, after, dialled, 0.5)
    assert "| metric | base | Control LLM | change | dialled (s = 0.5) | change |" in table
    assert "| 2.800 | 2.300 | -0.5000 | 2.500 | -0.3000 |" in table


@pytest.mark.slow
def test_spanish_split_is_disjoint():
    train, heldout = spanish_chapters()
    assert len(heldout) > 40 and len(train) > 1000
    assert not set(heldout) & set(train)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    from controlllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--output", str(tmp_path)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "| metric | base | Control LLM | change | dialled (s = " in out
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["steps"] == 4 and report["after"]["english_kl_to_base"] > 0
    assert report["dialled"]["english_kl_to_base"] <= report["after"]["english_kl_to_base"] + 1e-9
    assert (tmp_path / "dialled" / "dial.json").is_file()
    assert (tmp_path / "run" / "final" / "control_model.safetensors").is_file()
