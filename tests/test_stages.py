"""Multi-stage training: a run starts from a finished run's result, records its lineage, and loads back."""

import json

import pytest
import torch

from controlllm import ControlModel
from controlllm.runs import load_as_base, load_model
from controlllm.training.train import TrainConfig, train

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


def test_dlerp_stages_over_different_layers_fold_as_merge_does_and_refuse_the_original_base(
        tmp_path, tiny_model_dir, text_file, capsys):
    from transformers import AutoModelForCausalLM

    from controlllm.cli import main
    from controlllm.errors import CheckpointError

    dlerp = dict(method="control", interpolation="dlerp", train_interpolation=True, eval_data=str(text_file),
                 max_eval_samples=4, lr=3e-2, **FAST)
    stage_a, stage_b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    train(TrainConfig(data=str(text_file), output=str(stage_a), model=str(tiny_model_dir), expanded_layers=[1, 3],
                      **dlerp))
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--model", str(stage_a), "--output", str(merged)])
    assert exit_info.value.code == 0
    capsys.readouterr()
    merge_weights = json.loads((merged / "merge_weights.json").read_text())
    assert merge_weights["calibration_data"] == str(text_file)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    folded_by_merge = logits(AutoModelForCausalLM.from_pretrained(merged), ids)

    result_b = train(TrainConfig(data=str(text_file), output=str(stage_b), model=str(stage_a), expanded_layers=[0, 2],
                                 **dlerp))
    with result_b.model.disable_control():
        frozen_b = logits(result_b.model, ids)
    weights = {i: v["weight"] for i, v in merge_weights["layers"].items()}
    print("merge weights:", weights, "max |stage 2's frozen base - merged stage 1|:",
          float((frozen_b - folded_by_merge).abs().max()))
    assert any(abs(w - 0.5) > 1e-3 for w in weights.values())  # the trained gates moved away from sigmoid(b)
    assert torch.equal(frozen_b, folded_by_merge)  # one rule: stage 2 freezes what merge produces

    record = json.loads((stage_b / "final" / "run_config.json").read_text())
    fold = record["lineage"]["stages"][-1]["base_fold"]
    assert fold["calibration_data"] == str(text_file)
    assert {i: v["weight"] for i, v in fold["layers"].items()} == weights
    assert all(v["source"].startswith("measured: mean per-token weight on ") for v in fold["layers"].values())

    # Loading stage 2 rebuilds stage 1 with the recorded weights; the original base alone is refused.
    trained_b = logits(result_b.model, ids)
    loaded, _, _ = load_model(str(stage_b))
    assert torch.allclose(logits(loaded, ids), trained_b, atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match=r"decoder layers \[1, 3\]"):
        load_model(str(stage_b), base=str(tiny_model_dir))
