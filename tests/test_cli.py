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
    assert code == 0 and (merged / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    from controlllm.runs import load_model

    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert plain.config.num_hidden_layers == 4 and not any("base_layer" in n for n, _ in plain.named_parameters())
    # The reported KL is KL(unmerged || merged) on the check text: recompute it from the two models,
    # and check the merge is far closer to the trained model than the untouched base is.
    control, tokenizer, _ = load_model(run)
    enc = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        reference = torch.log_softmax(control.eval()(**enc).logits.float(), -1)
        with control.disable_control():
            base = torch.log_softmax(control(**enc).logits.float(), -1)
        candidate = torch.log_softmax(plain.eval()(**enc).logits.float(), -1)
    kl_merged = float((reference.exp() * (reference - candidate)).sum(-1).mean())
    kl_base = float((reference.exp() * (reference - base)).sum(-1).mean())
    assert report["kl_mean"] == pytest.approx(kl_merged, rel=1e-3, abs=1e-7)
    assert 0 < report["kl_mean"] < kl_base / 10

    code, out, _ = run_cli(["eval", "--model", str(run), "--tasks", f"heldout:{text_file},kl:{text_file}",
                            "--limit", "4", "--output", str(tmp_path / "eval.json")], capsys)
    results = json.loads((tmp_path / "eval.json").read_text())
    assert code == 0 and results["kind"] == "control"
    assert results[f"heldout:{text_file}/bpc"] > 0 and results[f"kl:{text_file}/kl"] >= 0

    code, _, err = run_cli(["merge", "--model", str(tiny_model_dir), "--output", str(tmp_path / "x")], capsys)
    assert code == 2 and "already plain weights" in err


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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, text_file):
    from controlllm.training.train import TrainConfig, train

    output = tmp_path_factory.mktemp("runs") / "done"
    train(TrainConfig(model=str(tiny_model_dir), data=str(text_file), output=str(output), max_steps=2, batch_size=2,
                      seq_len=32, save_steps=2, lr=1e-2, progress=False))
    return output


def _other_base(path):
    """A tiny Llama like tiny_model_dir but with other random weights (same shapes)."""
    import shutil

    from conftest import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    make_model("llama", seed=7, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("case, words", [
    ("truncated_delta", ["control_model.safetensors", "truncated"]),
    ("garbage_delta", ["control_model.safetensors", "corrupt"]),
    ("other_base", ["frozen weights", "differ"]),
    ("unfinished", ["the run did not finish; use --resume"]),
    ("truncated_base", ["cannot load the model"]),
    ("no_config", ["no config.json"]),
    ("bad_control_config", ["cannot read the Control config"]),
    ("unknown_task", ["unknown task 'nosuch'"]),
    ("missing_calibration", ["--calibration-data", "/no/such/calibration.txt", "does not exist"]),
])
def test_user_mistakes_with_models_exit_2_in_one_line(tmp_path, finished_run, tiny_model_dir, capsys, case, words):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    args = ["generate", "--model", str(run), "--base", str(base), "--prompt", "Hi", "--max-new-tokens", "2"]
    delta = run / "final" / "control_model.safetensors"
    if case == "truncated_delta":
        delta.write_bytes(delta.read_bytes()[:-100])
    elif case == "garbage_delta":
        delta.write_bytes(b"\x00not a safetensors file at all")
    elif case == "other_base":
        shutil.rmtree(base)
        _other_base(base)
    elif case == "unfinished":
        shutil.rmtree(run / "final")
    elif case == "truncated_base":
        weights = base / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "no_config":
        (base / "config.json").unlink()
    elif case == "bad_control_config":
        (run / "final" / "control_config.json").write_text("{not json")
    elif case == "unknown_task":
        args = ["eval", "--model", str(run), "--tasks", "nosuch"]
    elif case == "missing_calibration":
        args = ["merge", "--model", str(run), "--calibration-data", "/no/such/calibration.txt", "--output",
                str(tmp_path / "merged")]
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()  # progress bars of model loading may come before it
    assert lines[-1].startswith("controlllm: error:") and err.count("controlllm: error:") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("method", ["full", "control"])
def test_train_on_a_run_with_a_damaged_record_exits_2(tmp_path, tiny_model_dir, text_file, capsys, method):
    stage_a = tmp_path / "a"
    assert run_cli(train_args(tiny_model_dir, text_file, stage_a, "--method", method), capsys)[0] == 0
    (stage_a / "final" / "run_config.json").write_text('{"model": "x", "lineage": ')  # cut off mid-write
    code, _, err = run_cli(train_args(stage_a, text_file, tmp_path / "b"), capsys)
    print(err.strip().splitlines()[-1])
    assert code == 2 and "Traceback" not in err and err.count("controlllm: error:") == 1, err
    assert err.strip().splitlines()[-1].startswith("controlllm: error:") and "run_config.json" in err


def test_internal_bugs_keep_their_traceback(tmp_path, tiny_model_dir, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr("controlllm.evaluation.evaluate", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy", "--limit", "1"])
    monkeypatch.setattr("controlllm.runs.Run.model", lambda *a, **k: (_ for _ in ()).throw(OSError("bug")))
    with pytest.raises(OSError, match="bug"):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "Hi"])


def test_merge_refuses_a_non_empty_folder_and_replaces_it_whole_with_overwrite(tmp_path, tiny_model_dir, text_file,
                                                                                capsys):
    run = tmp_path / "run"
    assert run_cli(train_args(tiny_model_dir, text_file, run, "--lr", "1e-2"), capsys)[0] == 0
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")  # an earlier merge (or a damaged one, or the user's model)
    (merged / "stale.safetensors").write_text("old shard")
    code, _, err = run_cli(["merge", "--model", str(run), "--output", str(merged)], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err and (merged / "stale.safetensors").exists()
    code, _, _ = run_cli(["merge", "--model", str(run), "--output", str(merged), "--overwrite"], capsys)
    assert code == 0 and not (merged / "stale.safetensors").exists()
    assert json.loads((merged / "config.json").read_text())["num_hidden_layers"] == 4
    assert (merged / "merge_weights.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name or p.name.endswith(".old")] == []

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    code, _, err = run_cli(["merge", "--model", str(run), "--output", str(other)], capsys)
    assert code == 2 and "not empty" in err and (other / "todo.txt").read_text() == "mine"


def test_one_recipe_file_feeds_train_dial_and_compare_and_flags_override_it(tmp_path, capsys):
    from controlllm.cli import _recipe_defaults, build_parser

    recipe = tmp_path / "run.yaml"
    recipe.write_text("lr: 3.0e-4\nmax_steps: 7\ndial:\n  max_kl: 0.07\n  seq-len: 32\n  value: 0.4\n"
                      "compare:\n  steps: 3\n  keep: general.txt\n")

    def parse(*argv):
        command, defaults = _recipe_defaults(list(argv))
        return build_parser(defaults if command == "train" else None, {command: defaults}).parse_args(list(argv))

    train = parse("train", "--config", str(recipe), "--max-steps", "9")
    assert (train.lr, train.max_steps) == (3e-4, 9)
    dial = parse("dial", "--config", str(recipe), "--model", "m", "--output", "o", "--value", "0.5")
    assert (dial.max_kl, dial.seq_len, dial.value) == (0.07, 32, 0.5)
    compare = parse("compare", "--config", str(recipe), "--train", "a", "--validation", "b", "--test", "c")
    assert (compare.steps, compare.keep) == (3, "general.txt")  # --keep, required, comes from the file
    recipe.write_text("dial:\n  maxkl: 1\n")
    code, _, err = run_cli(["dial", "--config", str(recipe), "--model", "m", "--output", "o"], capsys)
    assert code == 2 and "unknown key 'maxkl'" in err and "max_kl" in err


def test_threads_default_leaves_the_busy_cores_alone(monkeypatch):
    from controlllm import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(8)))
    for load, threads in ((0.2, 8), (2.6, 5), (7.9, 1), (30.0, 1)):
        monkeypatch.setattr(cli.os, "getloadavg", lambda load=load: (load, load, load))
        assert cli.default_threads() == threads
