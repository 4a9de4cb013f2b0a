"""The controlllm command: exit code 2 with a one-line error on bad input, and the subcommands."""

import json
import os

import pytest
import torch

from controlllm.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def train_args(model_dir, data, output, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--max-steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--save-steps", "2", "--threads", "1", "--no-progress", *extra]


@pytest.mark.parametrize("case, words", [
    ("missing", ["does not exist"]),
    ("malformed", ["bad.jsonl:3"]),
    ("empty", ["empty"]),
    ("method", ["--method 'sgd'", "allowed"]),
    ("model", ["/no/such/model", "does not exist"]),
    ("layers", ["out of range"]),
])
def test_bad_input_exits_2_and_leaves_no_finished_run(tmp_path, tiny_model_dir, text_file, capsys, case, words):
    data, model, extra = text_file, tiny_model_dir, []
    if case == "missing":
        data = tmp_path / "nope.txt"
    elif case == "malformed":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n')
    elif case == "empty":
        data = tmp_path / "empty.txt"
        data.write_text("\n\n")
    elif case == "method":
        extra = ["--method", "sgd"]
    elif case == "model":
        model = "/no/such/model"
    elif case == "layers":
        extra = ["--expanded-layers", "1,9"]
    code, out, err = run_cli(train_args(model, data, tmp_path / "run", *extra), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("controlllm: error:") and "Traceback" not in err
    for w in words:
        assert w in err
    assert not (tmp_path / "run" / "final").exists()


def test_train_generate_merge_eval(tmp_path, tiny_model_dir, text_file, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(train_args(tiny_model_dir, text_file, run, "--lr", "1e-2", "--preset", "paper-csft"), capsys)
    assert code == 0 and json.loads(out)["final"] == str(run / "final")

    code, out, _ = run_cli(["generate", "--model", str(run), "--prompt", "Paris is", "--max-new-tokens", "5"], capsys)
    assert code == 0 and out.strip() != ""

    merged = tmp_path / "merged"
    code, out, _ = run_cli(["merge", "--model", str(run), "--output", str(merged)], capsys)
    report = json.loads(out)
    assert code == 0 and report["kl_mean"] >= 0 and (merged / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert plain.config.num_hidden_layers == 4 and not any("base_layer" in n for n, _ in plain.named_parameters())

    code, out, _ = run_cli(["eval", "--model", str(run), "--tasks", f"heldout:{text_file},kl:{text_file}",
                            "--limit", "4", "--output", str(tmp_path / "eval.json")], capsys)
    results = json.loads((tmp_path / "eval.json").read_text())
    assert code == 0 and results["kind"] == "control"
    assert results[f"heldout:{text_file}/bpc"] > 0 and results[f"kl:{text_file}/kl"] >= 0

    code, _, err = run_cli(["merge", "--model", str(tiny_model_dir), "--output", str(tmp_path / "x")], capsys)
    assert code == 2 and "needs a Control delta" in err


def test_help_lists_subcommands(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for name in ("train", "generate", "chat", "merge", "eval", "demo"):
        assert name in out


def test_sft_run_and_chat(tmp_path, tiny_model_dir, chat_file, capsys, monkeypatch):
    run = tmp_path / "sft"
    code, out, _ = run_cli(train_args(tiny_model_dir, chat_file, run, "--task", "sft", "--method", "lora"), capsys)
    assert code == 0 and (run / "final" / "adapter_model.safetensors").is_file()
    replies = iter(["What is 2 plus 3?", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    code, out, _ = run_cli(["chat", "--model", str(run), "--max-new-tokens", "4"], capsys)
    assert code == 0 and out.count("model> ") == 1


@pytest.mark.parametrize("method", ["lora", "full"])
def test_eval_kl_for_lora_and_full_runs(tmp_path, tiny_model_dir, text_file, capsys, method):
    run = tmp_path / method
    assert run_cli(train_args(tiny_model_dir, text_file, run, "--method", method, "--lr", "1e-2"), capsys)[0] == 0
    code, out, _ = run_cli(["eval", "--model", str(run), "--tasks", f"kl:{text_file}", "--limit", "4"], capsys)
    results = json.loads(out)
    assert code == 0 and results["kind"] == method and results[f"kl:{text_file}/kl"] > 0
