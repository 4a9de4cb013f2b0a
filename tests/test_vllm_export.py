"""The vLLM export (`controlllm serve-export`): the folder's config and tensor names, checked without vLLM.
That vLLM's engine serves it exactly is tested in tests/serving (`make test-serving`)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model, make_tokenizer, perturb_trainable
from controlllm import ControlConfig, get_control_model
from controlllm.cli import main
from controlllm.serving.vllm_export import ARCHITECTURE, CONTROL_KEY, export_for_vllm, serving_state_dict


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def control_run(tmp_path, tiny_model_dir, **config):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_control_model(base, ControlConfig(expanded_layers=[1, 3], train_interpolation=True, **config))
    perturb_trainable(model)
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / "run_config.json").write_text(json.dumps({"model": str(tiny_model_dir)}))
    return run, model


@pytest.mark.parametrize("interpolation", ["lerp", "dlerp"])
def test_export_names_copies_by_slot_and_keeps_base_names(tmp_path, tiny_model_dir, capsys, interpolation):
    run, model = control_run(tmp_path, tiny_model_dir, interpolation=interpolation, dial=0.7)
    out = tmp_path / "served"
    code, stdout, _ = run_cli(["serve-export", "--model", str(run), "--output", str(out)], capsys)
    assert code == 0 and json.loads(stdout)["serve"] == f"vllm serve {out}"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "llama"
    assert config[CONTROL_KEY] == {"format": 1, "expanded_layers": [1, 3], "slots": [4, 5],
                                   "interpolation": interpolation, "gate_norm": True, "dial": 0.7}
    tensors = load_file(out / "model.safetensors")
    inner = model.base_model.state_dict()
    q = "self_attn.q_proj.weight"
    assert torch.equal(tensors[f"model.layers.1.{q}"], inner[f"model.layers.1.base_layer.{q}"])
    assert torch.equal(tensors[f"model.expanded_layers.4.{q}"], inner[f"model.layers.1.expanded_layer.{q}"])
    assert torch.equal(tensors[f"model.expanded_layers.5.{q}"], inner[f"model.layers.3.expanded_layer.{q}"])
    assert not torch.equal(tensors[f"model.expanded_layers.5.{q}"], tensors[f"model.layers.3.{q}"])  # trained
    interp = "logit" if interpolation == "lerp" else "gate.weight"
    assert torch.equal(tensors[f"model.interpolators.5.{interp}"], inner[f"model.layers.3.interpolator.{interp}"])
    assert not any("base_layer" in k or "expanded_layer." in k or "budget" in k or "running_drift" in k for k in tensors)
    per_layer = {k for k in tensors if k.startswith("model.layers.0.")}
    assert {k.replace("model.layers.0.", "model.expanded_layers.4.") for k in per_layer} == \
        {k for k in tensors if k.startswith("model.expanded_layers.4.")}
    assert os.path.isfile(out / "tokenizer.json")


def test_plain_model_exports_with_no_expanded_layer(tmp_path):
    model = make_model("llama")
    out = export_for_vllm(model, make_tokenizer(), tmp_path / "served")
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config[CONTROL_KEY]["expanded_layers"] == [] and config["architectures"] == [ARCHITECTURE]
    assert serving_state_dict(model).keys() == model.state_dict().keys()


def test_stack_runs_and_other_architectures_are_refused(tmp_path, tiny_model_dir, capsys):
    run, _ = control_run(tmp_path, tiny_model_dir, expand_type="stack")
    code, _, err = run_cli(["serve-export", "--model", str(run), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "concat expansion only" in err
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        export_for_vllm(make_model("qwen2"), None, tmp_path / "q")
