"""`controlllm dial` and `train --keep-data`: dialled run folders every command accepts, budgets, rollback."""

import json

import pytest
import torch

from conftest import TOKENIZER_CORPUS
from controlllm.runs import load_model
from test_cli import run_cli, train_args


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dial-data")
    learn, keep = folder / "learn.txt", folder / "keep.txt"
    learn.write_text("\n\n".join(TOKENIZER_CORPUS[:3] * 4))
    keep.write_text("\n\n".join(TOKENIZER_CORPUS[3:] * 4))
    return learn, keep


def _logits(model, tokenizer):
    enc = tokenizer(TOKENIZER_CORPUS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module", params=["control", "full", "lora"])
def trained_run(request, tmp_path_factory, tiny_model_dir, split_files, capsysbinary=None):
    from controlllm.cli import main

    learn, _ = split_files
    run = tmp_path_factory.mktemp("dial-run") / request.param
    args = train_args(tiny_model_dir, learn, run, "--method", request.param, "--lr", "1e-2", "--max-steps", "6",
                      "--save-steps", "6")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return request.param, run


def test_dial_command_writes_a_dialled_run_within_the_budget(tmp_path, trained_run, split_files, tiny_model_dir, capsys):
    method, run = trained_run
    learn, keep = split_files
    base, tokenizer, _ = load_model(str(tiny_model_dir))
    trained, _, _ = load_model(str(run))
    # First the curve at 0.5 and 1 (values set by hand, scored on the data), to set a budget between them.
    points = []
    for value in ("0.5", "1"):
        code, out, err = run_cli(["dial", "--model", str(run), "--learn-data", str(learn), "--keep-data", str(keep),
                                  "--value", value, "--output", str(tmp_path / value), "--seq-len", "32"], capsys)
        assert code == 0, err
        points.append(json.loads((tmp_path / value / "dial.json").read_text())["chosen"])
    points.insert(0, {"kl": 0.0})
    assert points[2]["kl"] > points[1]["kl"] > 0
    budget = (points[1]["kl"] + points[2]["kl"]) / 2
    out_dir = tmp_path / "dialled"
    code, out, err = run_cli(["dial", "--model", str(run), "--learn-data", str(learn), "--keep-data", str(keep),
                              "--max-kl", str(budget), "--values", "0,0.5,1", "--refine", "2",
                              "--output", str(out_dir), "--seq-len", "32"], capsys)
    assert code == 0, err
    record = json.loads((out_dir / "dial.json").read_text())
    assert record["chosen"]["kl"] <= budget and 0.0 < record["value"] < 1.0
    for name in ("dial.md", "dial.png", "README.md", "run_config.json"):
        assert (out_dir / name).is_file()
    assert "Retention dial" in (out_dir / "README.md").read_text()
    dialled, _, kind = load_model(str(out_dir))
    assert kind == ("control" if method == "control" else method)
    # The folder is the model at the chosen value: it is neither the base nor the trained run.
    got = _logits(dialled.eval(), tokenizer)
    assert not torch.equal(got, _logits(base.eval(), tokenizer)) and not torch.equal(got, _logits(trained.eval(), tokenizer))
    code, out, err = run_cli(["eval", "--model", str(out_dir), "--tasks", f"heldout:{keep},kl:{keep}"], capsys)
    assert code == 0, err
    assert json.loads(out)[f"kl:{keep}/kl"] > 0
    code, out, err = run_cli(["generate", "--model", str(out_dir), "--prompt", "Hello", "--max-new-tokens", "3"], capsys)
    assert code == 0, err


def test_dial_value_zero_rolls_back_to_the_base_bit_for_bit(tmp_path, trained_run, tiny_model_dir, capsys):
    method, run = trained_run
    code, out, err = run_cli(["dial", "--model", str(run), "--value", "0", "--output", str(tmp_path / "rollback")], capsys)
    assert code == 0, err
    base, tokenizer, _ = load_model(str(tiny_model_dir))
    rolled, _, _ = load_model(str(tmp_path / "rollback"))
    assert torch.equal(_logits(rolled.eval(), tokenizer), _logits(base.eval(), tokenizer))
    if method == "control":  # a dialled Control run merges at s w: at s = 0, the base
        code, out, err = run_cli(["merge", "--model", str(tmp_path / "rollback"), "--output", str(tmp_path / "m")], capsys)
        assert code == 0, err
        merged, _, _ = load_model(str(tmp_path / "m"))
        assert torch.equal(_logits(merged.eval(), tokenizer), _logits(base.eval(), tokenizer))


@pytest.mark.parametrize("extra, words", [
    (["--max-kl", "0"], ["--max-kl", "> 0", "--value 0"]),
    (["--max-kl", "1e-12"], ["no dial value above 0", "closest is s = 0.5", "--value 0"]),
    ([], ["give a forgetting budget"]),
    (["--max-kl", "-1"], ["--max-kl", "> 0"]),
    (["--max-kl", "1", "--values", "0,2"], ["dial value 2.0", "[0, 1]"]),
    (["--max-kl", "1", "--mode", "sideways"], ["--mode", "'sideways'", "'output'"]),
])
def test_dial_errors_are_one_line(tmp_path, trained_run, split_files, capsys, extra, words):
    method, run = trained_run
    if method != "control":
        pytest.skip("the errors do not depend on the method")
    learn, keep = split_files
    code, out, err = run_cli(["dial", "--model", str(run), "--learn-data", str(learn), "--keep-data", str(keep),
                              "--values", "0,0.5,1", "--refine", "0", "--output", str(tmp_path / "d"), "--seq-len", "32",
                              *extra], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("controlllm: error:")
    for w in words:
        assert w in err
    assert not (tmp_path / "d").exists()


def test_train_with_keep_data_dials_at_the_end_and_mixes_data(tmp_path, tiny_model_dir, split_files, text_file, capsys):
    learn, keep = split_files
    run = tmp_path / "run"
    code, out, err = run_cli(train_args(tiny_model_dir, learn, run, "--lr", "1e-2", "--max-steps", "4", "--save-steps",
                                        "4", "--eval-data", str(learn), "--keep-data", str(keep), "--max-kl", "1e9",
                                        "--mix-data", str(text_file), "--mix-ratio", "0.25"), capsys)
    assert code == 0, err
    assert json.loads(out)["dialled"]["value"] == 1.0  # an unbounded budget keeps the trained run
    assert (run / "dialled" / "dial.json").is_file()
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["mix_data"] == str(text_file) and saved["mix_ratio"] == 0.25
    code, out, err = run_cli(train_args(tiny_model_dir, learn, tmp_path / "r2", "--keep-data", str(keep)), capsys)
    assert code == 2 and "needs --max-kl or --max-keep-increase" in err


def test_a_later_stage_dials_its_own_stage_only(tmp_path, trained_run, split_files, capsys):
    """s = 0 on a stage-2 run is stage 1's result (folded), not the original base."""
    from controlllm.runs import load_as_base
    from controlllm.cli import main

    method, run = trained_run
    if method != "control":
        pytest.skip("one stage kind is enough: the rule does not depend on the method")
    learn, _ = split_files
    stage2 = tmp_path / "stage2"
    args = ["train", "--model", str(run), "--data", str(learn), "--output", str(stage2), "--max-steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--save-steps", "2", "--threads", "1", "--no-progress",
            "--lr", "1e-2", "--expanded-layers", "0,2"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    code, out, err = run_cli(["dial", "--model", str(stage2), "--value", "0", "--output", str(tmp_path / "back")], capsys)
    assert code == 0, err
    stage1, tokenizer, _ = load_as_base(str(run))
    rolled, _, _ = load_model(str(tmp_path / "back"))
    assert torch.equal(_logits(rolled.eval(), tokenizer), _logits(stage1.eval(), tokenizer))
