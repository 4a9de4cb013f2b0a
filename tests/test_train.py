"""Training: every method on a tiny model, frozen weights, checkpoints, resume after SIGKILL, errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from controlllm.errors import UsageError
import torch
from safetensors.torch import load_file

from controlllm import ControlModel
from controlllm.training.data import DataError
from controlllm.training.train import TrainConfig, TrainingError, train, trainable_state

from conftest import make_model, make_tokenizer

FAST = dict(max_steps=4, batch_size=2, seq_len=32, save_steps=2, logging_steps=1, progress=False, lr=1e-3,
            keep_checkpoints=True)


def tiny():
    tokenizer = make_tokenizer()
    return make_model("llama", vocab_size=len(tokenizer)), tokenizer


@pytest.mark.parametrize("method", ["control", "full", "lora", "stack", "freeze"])
def test_each_method_trains_and_writes_final(tmp_path, text_file, method):
    model, tokenizer = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(TrainConfig(data=str(text_file), eval_data=str(text_file), output=str(tmp_path / "run"),
                               method=method, **FAST), model=model, tokenizer=tokenizer)
    files = set(os.listdir(result.final))
    expected = {"control": "control_model.safetensors", "stack": "control_model.safetensors",
                "lora": "adapter_model.safetensors", "full": "model.safetensors", "freeze": "model.safetensors"}
    assert expected[method] in files and "tokenizer.json" in files and "run_config.json" in files
    assert "eval_perplexity" in result.metrics and result.metrics["eval_perplexity"] > 1
    records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    # the base's eval loss, measured at step 0 (every method is its base there), beside the trained run's
    assert records[0]["step"] == 0 and "eval_loss" in records[0]
    assert result.metrics["base_eval_loss"] == records[0]["eval_loss"]
    assert result.metrics["eval_loss_change"] == result.metrics["eval_loss"] - records[0]["eval_loss"]
    if method in ("control", "stack"):
        assert "alignment_loss" in [r for r in records if "loss" in r][0] or method == "stack"
    after = result.model
    if method == "freeze":
        changed = {k.split(".")[2] for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {"3"}  # k = N // 4 = 1 layer: i = 3, where (i + 1) % 4 == 0
    assert trainable_state(after)


def test_freeze_trains_the_same_layers_control_expands(tmp_path, text_file):
    model, tokenizer = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(data=str(text_file), output=str(tmp_path / "f"), method="freeze", expanded_layers=[1, 3], **FAST)
    result = train(cfg, model=model, tokenizer=tokenizer)
    changed = sorted({k.split(".")[2] for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])})
    assert changed == ["1", "3"]


def test_control_run_keeps_frozen_weights_bit_identical(tmp_path, text_file):
    model, tokenizer = tiny()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(TrainConfig(data=str(text_file), output=str(tmp_path / "run"), interpolation="dlerp",
                               alignment_loss="cosine", train_interpolation=True, **FAST), model=model, tokenizer=tokenizer)
    control = result.model
    assert isinstance(control, ControlModel)
    state = control.base_model.state_dict()
    for name, value in original.items():
        if name not in state:
            name = name.replace(".layers.3.", ".layers.3.base_layer.")
        assert torch.equal(state[name], value), name
    delta = load_file(os.path.join(result.final, "control_model.safetensors"))
    moved = [k for k, v in delta.items() if ".expanded_layer." in k
             and not torch.equal(v, state[k.replace("expanded_layer", "base_layer")])]
    assert moved


@pytest.mark.parametrize("method", ["full", "control"])
def test_bf16_training_returns_a_model_that_computes_in_float32(tmp_path, text_file, method):
    """Mixed precision is for the training steps: the returned model (and the caller's object) must
    not keep computing in bfloat16 autocast afterwards (scores of a trained model would be off)."""
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    cfg = TrainConfig(data=str(text_file), output=str(tmp_path / "run"), method=method, max_steps=2, batch_size=2,
                      seq_len=32, bf16=True, progress=False, num_expanded_layers=1)
    trained = train(cfg, model=model, tokenizer=tokenizer).model
    ids = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        got = trained(input_ids=ids).logits
        plain = type(trained).forward(trained, input_ids=ids).logits  # the class's own forward, no wrapper
    assert got.dtype == torch.float32 and torch.equal(got, plain)


def test_checkpoints_are_complete_and_rotated(tmp_path, text_file):
    model, tokenizer = tiny()
    train(TrainConfig(data=str(text_file), output=str(tmp_path / "run"), **{**FAST, "max_steps": 6}),
          model=model, tokenizer=tokenizer)
    names = sorted(os.listdir(tmp_path / "run"))
    # runs/: the Trainer's TensorBoard event files (tensorboard is a dependency)
    assert names == ["checkpoint-4", "checkpoint-6", "final", "logs", "metrics.jsonl", "run_config.json"]
    ckpt = set(os.listdir(tmp_path / "run" / "checkpoint-6"))
    assert {"control_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= ckpt


def test_same_data_order_for_every_method(tmp_path, text_file):
    seen = {}
    for method in ("control", "full"):
        model, tokenizer = tiny()
        batches = []
        model.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["input_ids"].clone()) if kw.get("input_ids") is not None else None,
                                        with_kwargs=True)
        train(TrainConfig(data=str(text_file), output=str(tmp_path / method), method=method, **FAST),
              model=model, tokenizer=tokenizer)
        seen[method] = batches
    assert len(seen["control"]) == len(seen["full"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["control"], seen["full"]))


def _cli(args):
    return [sys.executable, "-m", "controlllm.cli", *args], dict(os.environ)


def test_resume_after_sigkill_reaches_same_weights(tmp_path, tiny_model_dir, text_file):
    common = ["train", "--model", str(tiny_model_dir), "--data", str(text_file), "--max-steps", "12",
              "--batch-size", "2", "--seq-len", "32", "--save-steps", "3", "--logging-steps", "1", "--lr", "1e-3",
              "--interpolation", "dlerp", "--train-interpolation", "--alignment-budget", "1e-4", "--threads", "1",
              "--no-progress"]
    cmd, env = _cli([*common, "--output", str(tmp_path / "straight")])
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    cmd, env = _cli([*common, "--output", str(killed)])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-6").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    cmd, env = _cli([*common, "--output", str(killed), "--resume"])
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    a = load_file(tmp_path / "straight" / "final" / "control_model.safetensors")
    b = load_file(killed / "final" / "control_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the drift budget's multipliers and running drifts engaged, and resumed exactly
    assert any(float(v) > 0 for k, v in a.items() if k.endswith("budget_multiplier"))
    steps = [json.loads(l)["step"] for l in open(killed / "metrics.jsonl") if '"loss"' in l]
    assert steps == list(range(1, 13))  # no step logged twice


@pytest.mark.parametrize("method", ["control", "full", "lora"])
def test_resume_of_a_finished_run_changes_nothing(tmp_path, text_file, method):
    model, tokenizer = tiny()
    cfg = TrainConfig(data=str(text_file), output=str(tmp_path / "run"), method=method, **{**FAST, "max_steps": 2})
    train(cfg, model=model, tokenizer=tokenizer)
    final = tmp_path / "run" / "final"
    before = {p.name: p.read_bytes() for p in final.iterdir() if p.suffix == ".safetensors"}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    model, tokenizer = tiny()
    result = train(dataclasses.replace(cfg, resume=True), model=model, tokenizer=tokenizer)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.suffix == ".safetensors"} == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    # the returned model is the finished one
    saved = load_file(final / next(iter(before)))
    if method == "lora":
        from peft import get_peft_model_state_dict

        own = get_peft_model_state_dict(result.model)
    else:
        own = trainable_state(result.model) if method == "control" else result.model.state_dict()
    assert saved and set(saved) <= set(own)
    for key, value in saved.items():
        assert torch.equal(own[key].detach(), value), key


def test_non_finite_loss_stops_and_names_the_step(tmp_path, text_file):
    model, tokenizer = tiny()
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step \d+"):
        train(TrainConfig(data=str(text_file), output=str(tmp_path / "run"), method="full",
                          **{**FAST, "lr": 1e12, "max_steps": 8}), model=model, tokenizer=tokenizer)
    assert not (tmp_path / "run" / "final").exists()


def test_bad_config_values():
    with pytest.raises(ValueError, match="--method 'sgd' is not supported; allowed: control, full, lora, stack, freeze"):
        TrainConfig(data="x", method="sgd")
    with pytest.raises(ValueError, match="--task 'rl'"):
        TrainConfig(data="x", task="rl")
    with pytest.raises(ValueError, match="--max-steps must be a positive integer"):
        TrainConfig(data="x", max_steps=0)
    with pytest.raises(ValueError, match="interpolation"):
        TrainConfig(data="x", interpolation="cubic")
    with pytest.raises(DataError, match="does not exist"):
        train(TrainConfig(data="/nonexistent/file.txt"))


@pytest.mark.slow
def test_real_smollm2_takes_a_few_control_steps(tmp_path, text_file):
    from controlllm.assets import load_pretrained

    model, tokenizer = load_pretrained(None)
    result = train(TrainConfig(data=str(text_file), output=str(tmp_path / "run"), max_steps=2, batch_size=1,
                               seq_len=64, save_steps=2, progress=False, num_expanded_layers=2), model=model,
                   tokenizer=tokenizer)
    assert sorted(result.model.blocks) == [14, 29]
    assert os.path.isfile(os.path.join(result.final, "control_model.safetensors"))


def test_logged_losses_do_not_depend_on_gradient_accumulation(tmp_path, chat_file):
    logged = {}
    for accum in (1, 2):
        model, tokenizer = tiny()
        run = tmp_path / f"ga{accum}"
        train(TrainConfig(data=str(chat_file), output=str(run), task="sft", max_steps=2, batch_size=4 // accum,
                          grad_accum=accum, seq_len=32, save_steps=10, logging_steps=1, progress=False, lr=1e-4),
              model=model, tokenizer=tokenizer)
        logged[accum] = [json.loads(l) for l in open(run / "metrics.jsonl") if "lm_loss" in l]
    for one, two in zip(logged[1], logged[2]):
        assert two["lm_loss"] == pytest.approx(one["lm_loss"], abs=2e-4)
        assert two["alignment_loss"] == pytest.approx(one["alignment_loss"], rel=1e-2, abs=1e-6)
        assert two["loss"] == pytest.approx(one["loss"], abs=2e-4)  # the Trainer's own total, for reference
    assert len(logged[1]) == len(logged[2]) == 2


def test_interpolation_lr_keeps_the_trainers_weight_decay_rule(tmp_path):
    from transformers import TrainingArguments

    from controlllm import ControlConfig, get_control_model
    from controlllm.training.train import ControlTrainer

    model = get_control_model(make_model("llama"), ControlConfig(expanded_layers=[1, 3], interpolation="dlerp",
                                                                  train_interpolation=True))
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, learning_rate=1e-3, use_cpu=True, report_to=[])

    def settings(**kwargs):
        optimizer = ControlTrainer(model=model, args=args, **kwargs).create_optimizer()
        return {id(p): (g["weight_decay"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}

    default, custom = settings(), settings(interpolation_lr=5e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert default.keys() == custom.keys()
    for key, (decay, lr) in default.items():
        if ".interpolator." in names[key]:
            assert custom[key] == (0.0, 5e-2), names[key]
        else:  # biases and norm weights stay without decay
            assert custom[key] == (decay, lr), (names[key], custom[key], (decay, lr))
    assert any(decay == 0.0 and "norm" in names[k] for k, (decay, _) in default.items())


def test_a_failing_run_record_leaves_the_existing_one(tmp_path, text_file):
    model, tokenizer = tiny()
    damaged = tmp_path / "damaged"  # a run folder whose record cannot be read
    damaged.mkdir()
    (damaged / "run_config.json").write_text("{not json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text('{"kept": true}')
    with pytest.raises(ValueError):
        train(TrainConfig(data=str(text_file), output=str(run), model=str(damaged), resume=True, **FAST),
              model=model, tokenizer=tokenizer)
    print("run_config.json after the failure:", repr((run / "run_config.json").read_text()))
    assert json.loads((run / "run_config.json").read_text()) == {"kept": True}


def test_metrics_are_rewritten_atomically_on_resume(tmp_path):
    from controlllm.training.train import MetricsFile

    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
    path.write_text(original)
    with open(path) as reader:  # opened before the rewrite, as a plotting or tailing process would be
        MetricsFile(str(path), resume_step=2)
        seen = reader.read()
    print("a reader of the old file saw", seen.count("\n"), "of 4 records")
    assert seen == original  # the old file was replaced, not truncated and rewritten in place
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]


def test_final_is_never_missing_while_it_is_replaced(tmp_path, text_file, monkeypatch):
    model, tokenizer = tiny()
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(text_file), output=str(run), **{**FAST, "max_steps": 2})
    train(cfg, model=model, tokenizer=tokenizer)
    delta = (run / "final" / "control_model.safetensors").read_bytes()
    final, real_replace = str(run / "final"), os.replace

    def replace(src, dst):  # the filesystem refuses to put the new final/ in place
        if os.fspath(dst) == final and os.path.basename(os.fspath(src)).startswith(".final.staging-"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    model, tokenizer = tiny()
    with pytest.raises(OSError, match="disk full"):  # resumed to train on (4 steps): final/ is written again
        train(TrainConfig(data=str(text_file), output=str(run), resume=True, **{**FAST, "max_steps": 4}),
              model=model, tokenizer=tokenizer)
    print("final/ after the failed replacement:", sorted(os.listdir(run)))
    assert (run / "final" / "control_model.safetensors").read_bytes() == delta


def test_checkpoints_go_when_the_run_finishes_unless_kept(tmp_path, text_file):
    model, tokenizer = tiny()
    run = tmp_path / "run"
    options = {**FAST, "keep_checkpoints": False}
    train(TrainConfig(data=str(text_file), output=str(run), **options), model=model, tokenizer=tokenizer)
    assert sorted(os.listdir(run)) == ["final", "logs", "metrics.jsonl", "run_config.json"]  # no optimizer state
    model, tokenizer = tiny()
    with pytest.raises(UsageError, match="checkpoints were removed.*--model"):
        train(TrainConfig(data=str(text_file), output=str(run), resume=True, **options), model=model, tokenizer=tokenizer)
    assert (run / "final").is_dir()
