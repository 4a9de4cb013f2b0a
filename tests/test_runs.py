"""controlllm.runs: one reading of a run for every command, one fold rule, one dial meaning, one output writer.

The consistency matrix: for every method, undialled and dialled (s = 0.6), with a second stage on top,
the model `eval` scores, the merged folder, the GGUF file read back and the next stage's frozen base
are one model. Tolerances, where the arithmetic is not the same:
- unmerged vs merged Control (concat, hybrid): folding W_p + w (W_e - W_p) is exact only for untrained
  copies (a block is not linear in its weights), so the merge is held to a fraction of what training
  changed; stack, full and freeze merge exactly; LoRA's B A added into W rounds in float32 (1e-5).
- merged folder vs GGUF (f32): the converter reorders q/k rows and transformers' GGUF loader undoes it;
  the arithmetic is the same up to float32 summation order (1e-4).
- merged vs the next stage's base: the same rule, computed the same way: bit for bit.
"""

import json
import os
import shutil

import pytest
import torch

from controlllm.cli import main
from controlllm.errors import UsageError
from controlllm.runs import Output, open_run
from controlllm.training.train import TrainConfig, train

IDS = torch.tensor([[5, 17, 33, 2, 61, 40, 9, 12, 77, 3, 50, 21]])

# method name -> TrainConfig options
METHODS = {
    "lerp": dict(method="control", interpolation="lerp"),
    "dlerp": dict(method="control", interpolation="dlerp", train_interpolation=True, interpolation_lr=0.3),
    "dlerp_in": dict(method="control", interpolation="dlerp_in", train_interpolation=True, interpolation_lr=0.3),
    "slerp": dict(method="control", interpolation="slerp"),
    "hybrid": dict(method="control", preset="paper-csft", expanded_layers=[1, 3], alignment_loss="nmse"),
    "stack": dict(method="stack"),
    "full": dict(method="full"),
    "freeze": dict(method="freeze"),
    "lora": dict(method="lora", lora_r=4, lora_alpha=8),
    "qlora": dict(method="lora", lora_r=4, lora_alpha=8, quantize_base="4bit"),
    "control-4bit": dict(method="control", quantize_base="4bit"),
    "lowrank": dict(method="control", copy_rank=4),
    "lowrank-4bit": dict(method="control", copy_rank=4, quantize_base="4bit"),
}
EXACT_MERGE = {"stack", "full", "freeze"}


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _train(model, data, eval_data, output, **options):
    if options.get("quantize_base"):
        pytest.importorskip("bitsandbytes")
    if options.get("method") == "control" and "expanded_layers" not in options:
        options["num_expanded_layers"] = 2
    if options.get("method") == "freeze":
        options["num_expanded_layers"] = 1
    cfg = TrainConfig(model=str(model), data=str(data), eval_data=str(eval_data), output=str(output), max_steps=3,
                      batch_size=2, seq_len=32, lr=options.pop("lr", 3e-3), save_steps=3, logging_steps=1,
                      threads=1, progress=False, **options)
    train(cfg)
    return output


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir, text_file):
    return tmp_path_factory.mktemp("matrix"), tiny_model_dir, text_file


@pytest.mark.parametrize("dialled", [False, True], ids=["s=1", "s=0.6"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_reading_of_a_run_is_one_model(folders, name, dialled, capsys):
    root, model_dir, data = folders
    where = root / f"{name}-{'d' if dialled else 'u'}"
    run = _train(model_dir, data, data, where / "run", **METHODS[name])
    if dialled:
        code, _, err = run_cli(["dial", "--model", str(run), "--value", "0.6", "--output", str(where / "dialled")],
                               capsys)
        assert code == 0, err
        run = where / "dialled"
    opened = open_run(run)
    evaluated, tokenizer = opened.model()  # what eval, generate and chat use
    base = logits(opened.base_model()[0])
    e = logits(evaluated)

    code, out, err = run_cli(["merge", "--model", str(run), "--output", str(where / "merged")], capsys)
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    merged_model = AutoModelForCausalLM.from_pretrained(where / "merged", dtype=torch.float32)
    m = logits(merged_model)
    change = float((e - base).abs().max())
    assert change > 1e-4, "training changed nothing: the matrix would prove nothing"
    gap = float((e - m).abs().max())
    if name in EXACT_MERGE and not dialled or name in ("full", "freeze"):
        assert torch.equal(e, m)
    elif name in ("lora", "qlora"):
        assert gap < 1e-4 if name == "lora" else gap < 0.05 * change
    else:
        assert gap < 0.5 * change, (gap, change)
    assert json.loads(out)["kind"] == opened.kind

    # the next stage's frozen base is the merged model, bit for bit
    stage2 = _train(str(run), data, data, where / "stage2", method="control", interpolation="dlerp",
                    train_interpolation=True, expanded_layers=[0], lr=1e-3)
    second = open_run(stage2)
    assert torch.equal(logits(second.base_model()[0]), m)
    assert second.lineage["stages"][-2]["output"] in (str(where / "run"),)

    # the serve-export folder: a plain model reads back in transformers as the model eval scores; a Control run's
    # frozen branch is written dequantised (no packed 4-bit tensors), its copies and interpolators beside it
    if name not in ("lora", "qlora", "stack", "hybrid"):
        code, _, err = run_cli(["serve-export", "--model", str(run), "--output", str(where / "serve")], capsys)
        assert code == 0, err
        if name in ("full", "freeze"):
            served = AutoModelForCausalLM.from_pretrained(where / "serve", dtype=torch.float32)
            assert torch.equal(logits(served), e)
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(where / "serve" / "model.safetensors"))
            assert all(t.dtype == torch.float32 for t in tensors.values())
            assert any(k.startswith("model.expanded_layers.") for k in tensors)
            assert not any("absmax" in k or "quant" in k for k in tensors)

    # the GGUF file of the run (read back with transformers) is the merged folder
    gguf = where / "model.gguf"
    code, out, err = run_cli(["export", "--model", str(run), "--output", str(gguf)], capsys)
    assert code == 0, err
    read = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert float((logits(read) - m).abs().max()) < 1e-4
    assert json.loads(out)["source_kind"] == opened.kind
    shutil.rmtree(where)


def test_a_dial_is_relative_to_the_trained_stage_for_every_method(tmp_path, tiny_model_dir, text_file, capsys):
    for name in ("lerp", "full", "lora"):
        run = _train(tiny_model_dir, text_file, text_file, tmp_path / name, **METHODS[name])
        trained = logits(open_run(run).model()[0])
        half = tmp_path / f"{name}-half"
        assert run_cli(["dial", "--model", str(run), "--value", "0.5", "--output", str(half)], capsys)[0] == 0
        assert not torch.equal(logits(open_run(half).model()[0]), trained)
        back = tmp_path / f"{name}-back"
        assert run_cli(["dial", "--model", str(half), "--value", "1", "--output", str(back)], capsys)[0] == 0
        assert torch.equal(logits(open_run(back).model()[0]), trained), name  # not 0.5 x 1 composed
        zero = tmp_path / f"{name}-zero"
        assert run_cli(["dial", "--model", str(half), "--value", "0", "--output", str(zero)], capsys)[0] == 0
        assert torch.equal(logits(open_run(zero).model()[0]), logits(open_run(run).base_model()[0]))


def test_opening_a_run_never_reads_its_data(tmp_path, tiny_model_dir, text_file, capsys):
    data = tmp_path / "train.txt"
    shutil.copy(text_file, data)
    run = _train(tiny_model_dir, data, data, tmp_path / "run", **METHODS["dlerp"])
    assert open_run(run).record["fold"]["calibration_data"] == str(data)  # measured once, when it finished
    before, _ = open_run(run).merged()
    stage2 = _train(str(run), data, data, tmp_path / "stage2", method="full", lr=1e-3)
    data.write_text("other text entirely, " * 200)  # changed: a loader that re-measured would differ
    after, _ = open_run(run).merged()
    assert torch.equal(logits(before), logits(after))
    os.remove(data)  # and gone
    code, _, err = run_cli(["dial", "--model", str(stage2), "--value", "0", "--output", str(tmp_path / "zero")], capsys)
    assert code == 0, err
    assert torch.equal(logits(open_run(tmp_path / "zero").model()[0]), logits(before))
    assert run_cli(["merge", "--model", str(run), "--output", str(tmp_path / "m")], capsys)[0] == 0


def test_a_dialled_card_shows_the_dialled_models_measurements(tmp_path, tiny_model_dir, text_file, capsys):
    run = _train(tiny_model_dir, text_file, text_file, tmp_path / "run", **METHODS["lerp"])
    out = tmp_path / "d"
    code, _, err = run_cli(["dial", "--model", str(run), "--learn-data", str(text_file), "--keep-data", str(text_file),
                            "--value", "0.5", "--output", str(out), "--seq-len", "32"], capsys)
    assert code == 0, err
    card = (out / "README.md").read_text()
    chosen = json.loads((out / "dial.json").read_text())["chosen"]
    assert "Measured on this dialled model (s = 0.5)" in card and f"| kl | {chosen['kl']:.6g} |" in card
    assert "Last evaluation of the trained run (s = 1, before the dial)" in card


# ------------------------------------------------------------------------------------------------ Output
def test_output_refuses_what_it_must_not_replace_before_anything_loads(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [(notes, {}, "not empty"), (run, {"protect": [run]}, "is the model"),
             (tmp_path, {"protect": [run], "overwrite": True}, "holds the model"), (a_file, {}, "is a file"),
             (a_file / "sub", {}, "which is a file")]
    for path, options, words in cases:
        with pytest.raises(UsageError, match=words):
            Output(path, **options)
    assert (notes / "todo.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="file exists"):
        Output(a_file, kind="file")


def test_output_is_put_in_place_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    out = Output(target, overwrite=True)
    with pytest.raises(RuntimeError):
        with out.staging() as folder:
            (open(os.path.join(folder, "new.txt"), "w")).write("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]  # the old output stands
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind
    with out.staging() as folder:
        open(os.path.join(folder, "new.txt"), "w").write("whole")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_every_command_refuses_its_source_and_non_empty_folders_in_one_line(tmp_path, tiny_model_dir, text_file,
                                                                           capsys):
    run = _train(tiny_model_dir, text_file, text_file, tmp_path / "run", **METHODS["lerp"])
    capsys.readouterr()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for command in (["dial", "--value", "0.5"], ["merge"], ["serve-export"]):
        for output, words in ((notes, "not empty"), (run, "is the model"), (tiny_model_dir, "is the model"),
                              (text_file, "is a file")):
            code, _, err = run_cli([*command, "--model", str(run), "--output", str(output)], capsys)
            assert code == 2 and err.count("\n") == 1 and words in err, (command, output, err)
    code, _, err = run_cli(["export", "--model", str(run), "--output", str(notes / "todo.txt")], capsys)
    assert code == 2 and "gguf" in err
    (notes / "m.gguf").write_text("an earlier file")
    code, _, err = run_cli(["export", "--model", str(run), "--output", str(notes / "m.gguf")], capsys)
    assert code == 2 and "--overwrite" in err and (notes / "m.gguf").read_text() == "an earlier file"
    assert (notes / "todo.txt").read_text() == "mine"
    assert (run / "final").is_dir() and (tiny_model_dir / "config.json").is_file()


# ------------------------------------------------------------------------------------------- legacy runs
LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy_runs")
# Where the committed runs were written (by the release before controlllm.runs); their records name it.
LEGACY_WRITTEN_AT = "/work/main/tests/data/legacy_runs"


def _legacy_copy(tmp_path):
    target = tmp_path / "legacy_runs"
    shutil.copytree(LEGACY, target)
    for root, _, files in os.walk(target):
        for name in files:
            if name in ("run_config.json", "dial.json"):
                path = os.path.join(root, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(text.replace(LEGACY_WRITTEN_AT, str(target)))
    return target


@pytest.mark.parametrize("name", ["dlerp", "stage2", "full-dialled", "lora-dialled"])
def test_runs_written_by_the_earlier_release_load_with_the_same_logits(tmp_path, name):
    from safetensors.torch import load_file

    legacy = _legacy_copy(tmp_path)
    expected = load_file(str(legacy / "expected_logits.safetensors"))[name]
    model, _ = open_run(legacy / name).model()
    assert torch.equal(logits(model), expected)
