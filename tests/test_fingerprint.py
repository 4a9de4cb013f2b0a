"""The base model's fingerprint (controlllm.model._frozen_parts_fingerprint): hashed once per base while its
frozen tensors stay as they are, hashed again (and a mismatch refused) when the base changes."""

import pytest
import torch
from torch import nn

import controlllm.model as model_module
from controlllm import ControlConfig, ControlModel, get_control_model
from controlllm.errors import CheckpointError
from controlllm.model import _frozen_parts_fingerprint

from conftest import make_model, perturb_trainable


@pytest.fixture
def hashed(monkeypatch):
    """A list that receives the name of every tensor hashed."""
    calls = []
    original = model_module._hash_tensor

    def counting(digest, name, tensor):
        calls.append(name)
        original(digest, name, tensor)

    monkeypatch.setattr(model_module, "_hash_tensor", counting)
    return calls


def control():
    base = make_model("llama")
    model = get_control_model(base, ControlConfig(num_expanded_layers=None, expanded_layers=[1, 3]))
    perturb_trainable(model)
    return base, model


def test_saving_again_hashes_nothing_and_gives_the_same_fingerprint(tmp_path, hashed):
    _, model = control()
    model.save_pretrained(tmp_path / "a")
    first = len(hashed)
    assert first > 0
    perturb_trainable(model, seed=2)  # training moves the copies only: the fingerprint leaves them out
    model.save_pretrained(tmp_path / "b")
    print("tensors hashed at the first save", first, "at the second", len(hashed) - first)
    assert len(hashed) == first
    a = (tmp_path / "a" / "control_config.json").read_text()
    b = (tmp_path / "b" / "control_config.json").read_text()
    assert a == b
    # The cached digests are those of a full hash (the uncached path, with the state given).
    state = {k: v.detach().clone() for k, v in model.base_model.state_dict().items()}
    assert _frozen_parts_fingerprint(model.base_model) == _frozen_parts_fingerprint(model.base_model, state)


def test_loading_onto_the_same_unchanged_base_hashes_nothing(tmp_path, hashed):
    base, model = control()
    model.save_pretrained(tmp_path)
    model.unload()
    before = len(hashed)
    ControlModel.from_pretrained(base, tmp_path)
    assert len(hashed) == before


@pytest.mark.parametrize("change", ["in_place", "new_parameter", "buffer"])
def test_a_changed_base_is_still_refused(tmp_path, change):
    base, model = control()
    model.save_pretrained(tmp_path)
    model.unload()
    layer = base.model.layers[0]
    with torch.no_grad():
        if change == "in_place":
            layer.self_attn.q_proj.weight.add_(1e-3)
        elif change == "new_parameter":
            layer.self_attn.q_proj.weight = nn.Parameter(layer.self_attn.q_proj.weight + 1e-3, requires_grad=False)
        else:
            base.model.norm.weight.mul_(1.001)
    with pytest.raises(CheckpointError, match="differ"):
        ControlModel.from_pretrained(base, tmp_path)


def test_another_base_of_the_same_shape_is_hashed_and_refused(tmp_path):
    _, model = control()
    model.save_pretrained(tmp_path)
    del model
    with pytest.raises(CheckpointError, match="differ"):
        ControlModel.from_pretrained(make_model("llama", seed=5), tmp_path)
