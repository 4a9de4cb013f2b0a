"""A run documents itself: final/README.md, and the card carried into a merged folder."""

import json

import pytest

from controlllm.model_card import build_model_card
from controlllm.training.train import TrainConfig, train

FAST = dict(max_steps=2, batch_size=2, seq_len=32, save_steps=2, logging_steps=1, progress=False, lr=1e-3)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, text_file):
    run = tmp_path_factory.mktemp("card") / "run"
    train(TrainConfig(model=str(tiny_model_dir), data=str(text_file), eval_data=str(text_file), output=str(run), **FAST))
    return run


def test_final_has_a_model_card(finished_run, tiny_model_dir, text_file):
    card = (finished_run / "final" / "README.md").read_text()
    fingerprint = json.loads((finished_run / "final" / "control_config.json").read_text())["base_model"]["frozen_model_sha256"]
    assert card.startswith("---\nlibrary_name: controlllm\n")
    assert f"- path: `{tiny_model_dir}`" in card and fingerprint in card
    assert "| interpolation | lerp |" in card and "| alignment_loss | nmse |" in card
    assert f"| training | `{text_file}` | {text_file.stat().st_size:,d} bytes |" in card
    assert "| max_steps | 2 |" in card and "| lr | 0.001 |" in card
    assert "## Last evaluation" in card and "| eval_perplexity |" in card
    assert not list(finished_run.glob("final.tmp*")) and "final.tmp" not in card


def test_card_lists_stages_and_says_when_nothing_was_evaluated(tmp_path):
    config = {"output": str(tmp_path), "method": "control", "task": "sft", "max_steps": 10,
              "stages": [{"name": "cpt", "data": "a.txt", "max_steps": 100}, {"name": "sft", "data": "b.jsonl"}]}
    card = build_model_card(tmp_path, config)
    assert "## Stages" in card and "| stage | data | max_steps | name |" in card
    assert "| 1 | a.txt | 100 | cpt |" in card and "| 2 | b.jsonl |  | sft |" in card
    assert "No evaluation was run" in card and "controlllm merge" not in card  # no Control delta in the folder


def test_merge_carries_the_card_and_adds_fidelity(finished_run, tmp_path, capsys):
    from controlllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--model", str(finished_run), "--output", str(tmp_path / "merged")])
    assert exit_info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    card = (tmp_path / "merged" / "README.md").read_text()
    trained = (finished_run / "final" / "README.md").read_text()
    # The merged card describes the merged folder (a plain model), not the delta it came from.
    assert "the base model itself is not included" in trained and "the base model itself is not included" not in card
    assert "plain transformers model" in card and "## Base model" in card and "## Control config" in card
    assert "## Merge" in card and f"| kl_mean | {report['kl_mean']:.6g} |" in card
    assert "| top1_agreement |" in card
