import json
import os

import pytest
import torch
from safetensors.torch import load_file

from controlllm import ControlConfig, ControlModel, get_control_model
from controlllm.errors import CheckpointError
from controlllm.model import STATE_BUFFERS

from conftest import batch, clone, make_model, perturb_trainable


def trained(arch="llama", **kwargs):
    base = make_model(arch)
    pristine = clone(base)
    kwargs.setdefault("train_interpolation", True)  # so perturbing the trainable parameters moves the gates too
    config = ControlConfig(num_expanded_layers=None, expanded_layers=[1, 3], **kwargs)
    model = get_control_model(base, config)
    perturb_trainable(model)
    return model, pristine


@pytest.mark.parametrize("kwargs", [dict(interpolation="dlerp"), dict(expand_type="hybrid", interpolation="slerp"),
                                    dict(expand_type="stack")])
def test_round_trip_exact(tmp_path, kwargs):
    model, pristine = trained("qwen3", **kwargs)
    ids, mask = batch(left_pad=2)
    model.eval()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["control_config.json", "control_model.safetensors"]
    loaded = ControlModel.from_pretrained(pristine, tmp_path)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    assert loaded.control_config == model.control_config


def test_delta_holds_only_what_was_trained(tmp_path):
    model, _ = trained(interpolation="dlerp")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "control_model.safetensors")
    assert tensors and all(".expanded_layer." in k or ".interpolator." in k or k.endswith(STATE_BUFFERS)
                           for k in tensors)
    # the copies, and the interpolators whether they were trained or kept fixed
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad or ".interpolator." in n)
    assert sum(t.numel() for k, t in tensors.items() if not k.endswith(STATE_BUFFERS)) == trainable
    meta = json.loads((tmp_path / "control_config.json").read_text())
    assert meta["base_model"]["class"] == "LlamaForCausalLM" and len(meta["base_model"]["frozen_model_sha256"]) == 64


def test_self_contained_checkpoint_loads_in_one_call(tmp_path):
    model, _ = trained()
    ids, _ = batch()
    model.eval()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, save_base=True)
    loaded = ControlModel.from_pretrained(tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    with pytest.raises(FileNotFoundError, match="pass the base model"):
        ControlModel.from_pretrained(tmp_path / "base")


def test_wrong_base_is_refused(tmp_path):
    model, pristine = trained()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="class='LlamaForCausalLM'.*class='MistralForCausalLM'"):
        ControlModel.from_pretrained(make_model("mistral"), tmp_path)
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=64"):
        ControlModel.from_pretrained(make_model("llama", hidden_size=64), tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers=4.*num_hidden_layers=6"):
        ControlModel.from_pretrained(make_model("llama", num_hidden_layers=6), tmp_path)
    other = make_model("llama", seed=7)  # same shapes, other frozen weights
    with pytest.raises(CheckpointError, match=r"frozen weights of the base model differ .* decoder layers \[0, 1, 2, 3\]"):
        ControlModel.from_pretrained(other, tmp_path)
    # the refused base is left unwrapped and usable
    assert not any("base_layer" in n for n, _ in other.named_parameters())
    ControlModel.from_pretrained(make_model("llama", seed=7), tmp_path, check_base_weights=False)


def test_missing_or_mismatched_delta(tmp_path):
    with pytest.raises(FileNotFoundError, match="control_config.json"):
        ControlModel.from_pretrained(make_model("llama"), tmp_path)
    model, pristine = trained()
    state = model.trainable_state_dict()
    name = next(k for k in state if ".expanded_layer." in k)
    state[name] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        model.load_trainable_state(state)
    state.pop(name)
    with pytest.raises(ValueError, match="missing"):
        model.load_trainable_state(state)



def test_delta_without_budget_buffers_loads_with_them_at_zero():
    # A delta saved before the drift budget existed has no budget buffers: it loads, multipliers at zero.
    model, pristine = trained(alignment_budget=0.01)
    ids, mask = batch(left_pad=2)
    model.eval()
    expected = model(input_ids=ids, attention_mask=mask).logits
    legacy = {k: v.clone() for k, v in model.trainable_state_dict().items() if not k.endswith(STATE_BUFFERS)}
    target = get_control_model(pristine, model.control_config)  # another model, mid-run: its state is not the delta's
    for block in target.control_blocks.values():
        block.budget_multiplier.fill_(3.0)
        block.running_drift.fill_(0.2)
    target.load_trainable_state(legacy)
    target.eval()
    state = [(float(b.budget_multiplier), float(b.running_drift)) for b in target.control_blocks.values()]
    print("budget state after loading a delta without it:", state)
    assert torch.equal(target(input_ids=ids, attention_mask=mask).logits, expected)
    assert state == [(0.0, 0.0)] * len(state)


def test_a_later_stage_delta_refuses_the_base_without_the_earlier_stage(tmp_path):
    original = make_model("llama")
    first = get_control_model(clone(original), ControlConfig(expanded_layers=[1, 3]))
    perturb_trainable(first)
    folded = first.merge_and_unload()  # stage 1 changed layers 1 and 3
    second = get_control_model(clone(folded), ControlConfig(expanded_layers=[0, 2]))
    perturb_trainable(second, seed=2)
    ids, mask = batch(left_pad=2)
    second.eval()
    expected = second(input_ids=ids, attention_mask=mask).logits
    second.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"frozen weights of the base model differ .* decoder layers \[1, 3\]"):
        ControlModel.from_pretrained(clone(original), tmp_path)  # the original base: stage 1 missing
    loaded = ControlModel.from_pretrained(clone(folded), tmp_path)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_delta_of_an_earlier_release_is_checked_with_its_own_rule(tmp_path):
    model, pristine = trained()
    ids, mask = batch()
    model.eval()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    _legacy_config(tmp_path, model)
    loaded = ControlModel.from_pretrained(clone(pristine), tmp_path)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    with pytest.raises(CheckpointError, match=r"frozen weights of the expanded layers \[1, 3\] differ"):
        ControlModel.from_pretrained(make_model("llama", seed=7), tmp_path)


def _legacy_config(directory, model):
    """Rewrite a saved delta's metadata as an earlier release wrote it (expanded layers fingerprinted only)."""
    from controlllm.model import _legacy_frozen_fingerprint

    path = os.path.join(directory, "control_config.json")
    meta = json.loads(open(path).read())
    for key in ("frozen_model_sha256", "frozen_parts_sha256"):
        meta["base_model"].pop(key)
    meta["base_model"]["frozen_sha256"] = _legacy_frozen_fingerprint(model.blocks)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_save_leaves_no_temporary_files_and_overwrites(tmp_path):
    model, _ = trained()
    model.save_pretrained(tmp_path)
    perturb_trainable(model, seed=5)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["control_config.json", "control_model.safetensors"]
    saved = load_file(tmp_path / "control_model.safetensors")
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(saved[k], v)
