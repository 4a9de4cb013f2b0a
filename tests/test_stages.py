"""Multi-stage training: a run starts from a finished run's result, records its lineage, and loads back."""

import json

import pytest
import torch

from controlllm import ControlModel
from controlllm.checkpoints import load_as_base, load_model
from controlllm.train import TrainConfig, train

FAST = dict(max_steps=3, batch_size=2, seq_len=32, save_steps=3, logging_steps=1, progress=False, threads=1)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("first", ["control", "lora", "full"])
def test_second_stage_starts_from_the_first_stage_result(tmp_path, tiny_model_dir, text_file, first):
    stage_a = tmp_path / "a"
    result_a = train(TrainConfig(data=str(text_file), output=str(stage_a), model=str(tiny_model_dir), method=first,
                                 lr=1e-2, **FAST))
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    a_model = result_a.model
    if first in ("control", "lora"):
        a_model = a_model.merge_and_unload()
    folded_a = logits(a_model, ids)

    # The new stage's frozen base is stage A's result folded: at initialisation it computes A exactly.
    base_b, _, kind = load_as_base(str(stage_a))
    assert kind == first
    assert torch.equal(logits(base_b, ids), folded_a)

    stage_b = tmp_path / "b"
    result_b = train(TrainConfig(data=str(text_file), output=str(stage_b), model=str(stage_a), method="control",
                                 lr=1e-2, **FAST))
    assert isinstance(result_b.model, ControlModel)
    with result_b.model.disable_control():
        assert torch.equal(logits(result_b.model, ids), folded_a)  # B's frozen part is A, bit for bit
    trained_b = logits(result_b.model, ids)
    assert not torch.equal(trained_b, folded_a)

    lineage = json.loads((stage_b / "final" / "run_config.json").read_text())["lineage"]
    assert lineage["base_model"] == str(tiny_model_dir)
    assert [s["output"] for s in lineage["stages"]] == [str(stage_a), str(stage_b)]
    assert [s["method"] for s in lineage["stages"]] == [first, "control"]

    # Loading stage B rebuilds A (folded) under it and reproduces B's outputs.
    loaded, _, kind = load_model(str(stage_b))
    assert kind == "control"
    assert torch.allclose(logits(loaded, ids), trained_b, atol=1e-5, rtol=0)
