import pytest
import torch

from controlllm import ControlConfig, get_control_model, merge_fidelity

from conftest import batch, clone, make_model, perturb_trainable


def wrap(model, **kwargs):
    # Interpolators trained (so perturbing the trainable parameters moves the gates too).
    kwargs.setdefault("train_interpolation", True)
    return get_control_model(model, ControlConfig(num_expanded_layers=None, expanded_layers=[0, 2], **kwargs))


@pytest.mark.parametrize("interpolation", ["lerp", "dlerp", "dlerp_in", "slerp"])
def test_untrained_merge_equals_base_exactly(interpolation):
    base = make_model("gemma2")
    ids, mask = batch(left_pad=2)
    expected = base(input_ids=ids, attention_mask=mask).logits
    reference_state = base.state_dict()
    reference_state = {k: v.clone() for k, v in reference_state.items()}
    merged = wrap(clone(base), interpolation=interpolation, interpolation_init=-1.3).merge_and_unload()
    assert type(merged) is type(base)
    assert merged.state_dict().keys() == reference_state.keys()
    for k, v in merged.state_dict().items():
        assert torch.equal(v, reference_state[k]), k
    assert torch.equal(merged(input_ids=ids, attention_mask=mask).logits, expected)
    assert all(p.requires_grad for p in merged.parameters())


def test_lerp_merge_folds_weights():
    base = make_model("llama")
    model = wrap(clone(base), interpolation_init=0.4, train_interpolation=False)
    perturb_trainable(model)
    w = float(torch.sigmoid(torch.tensor(0.4)))
    e = model.blocks[2].expanded_layer.mlp.up_proj.weight.detach().clone()
    merged = model.merge_and_unload()
    p = base.model.layers[2].mlp.up_proj.weight
    assert torch.allclose(merged.model.layers[2].mlp.up_proj.weight, p + w * (e - p))
    assert torch.equal(merged.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)


def test_merge_fidelity_measures_the_gap():
    model = wrap(make_model("llama"))
    ids, mask = batch(left_pad=2)
    exact = merge_fidelity(model, ids, mask)
    assert exact["kl_mean"] == 0 and exact["top1_agreement"] == 1
    perturb_trainable(model, scale=0.3)
    before = model(input_ids=ids, attention_mask=mask).logits
    report = merge_fidelity(model, ids, mask)
    assert report["kl_mean"] > 0 and report["max_abs_logit_diff"] > 0
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)  # model untouched


def masked_mean_weight(model, layer, ids, mask):
    """The mean over real tokens of layer `layer`'s per-token weight, in float64."""
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    w = model.blocks[layer].last_weight.squeeze(-1).double()
    return float(w[mask.bool()].sum() / mask.sum())


@pytest.mark.parametrize("interpolation", ["dlerp", "dlerp_in"])
def test_checking_a_merge_does_not_change_it(interpolation):
    model = wrap(make_model("llama"), interpolation=interpolation)
    perturb_trainable(model, scale=0.3)
    before = model.merge_weights()
    ids, mask = batch(left_pad=3)
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    merge_fidelity(model, ids, mask)
    assert model.merge_weights() == before  # evaluation and the fidelity check measure nothing
    assert all(v["weight"] == model.blocks[i].interpolator.nominal_weight() for i, v in before.items())


def test_measure_merge_weights_is_the_masked_mean_of_the_named_data_only():
    model = wrap(make_model("llama"), interpolation="dlerp")
    perturb_trainable(model, scale=0.3)
    model.train()
    a, b = batch(left_pad=3, seed=1), batch(left_pad=5, seed=2)
    expected = {layer: masked_mean_weight(model, layer, *b) for layer in (0, 2)}
    model.train()
    model.measure_merge_weights([{"input_ids": a[0], "attention_mask": a[1]}])
    measured = model.measure_merge_weights([{"input_ids": b[0], "attention_mask": b[1]}], source="b.txt")
    assert model.training  # the mode is restored
    assert measured == pytest.approx(expected, abs=1e-12)  # a new measurement starts afresh
    assert model.blocks[0].merge_weight() == measured[0]
    assert model.merge_weights()[0]["source"] == "measured: mean per-token weight on b.txt (19 tokens)"
    e = model.blocks[0].expanded_layer.mlp.up_proj.weight.detach().clone()
    p = model.blocks[0].base_layer.mlp.up_proj.weight.detach().clone()
    merged = model.merge_and_unload()
    assert torch.allclose(merged.model.layers[0].mlp.up_proj.weight, p + measured[0] * (e - p))


def test_measured_weight_is_exact_in_bfloat16():
    model = wrap(make_model("llama"), interpolation="dlerp_in")
    perturb_trainable(model, scale=0.3)
    model.to(torch.bfloat16)
    batches = [dict(zip(("input_ids", "attention_mask"), batch(bsz=4, seq=40, left_pad=4, seed=s))) for s in range(3)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert tokens > 400  # bf16 cannot count past 256 in steps of one
    sums = {0: 0.0, 2: 0.0}
    for b in batches:
        for layer in sums:
            sums[layer] += masked_mean_weight(model, layer, b["input_ids"], b["attention_mask"]) * float(b["attention_mask"].sum())
    measured = model.measure_merge_weights(batches, source="three batches")
    assert measured == pytest.approx({layer: s / tokens for layer, s in sums.items()}, abs=1e-12)
    assert f"({tokens} tokens)" in model.merge_weights()[0]["source"]
    model.to(torch.float32).to(torch.bfloat16)
    assert model.blocks[0].merge_weight() == measured[0]  # dtype casts leave it exact


def test_delta_with_legacy_gate_statistics_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    from controlllm import ControlModel

    base = make_model("llama")
    model = wrap(clone(base), interpolation="dlerp")
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "control_model.safetensors"
    tensors = load_file(path)
    for layer in (0, 2):
        tensors[f"model.layers.{layer}.weight_sum"] = torch.tensor(40.0, dtype=torch.float64)
        tensors[f"model.layers.{layer}.weight_count"] = torch.tensor(50.0, dtype=torch.float64)
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = ControlModel.from_pretrained(clone(base), tmp_path)
    ids, mask = batch(left_pad=2)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
    assert loaded.blocks[0].merge_weight() == loaded.blocks[0].interpolator.nominal_weight()


def test_cli_merge_folds_with_weights_measured_on_calibration_data(tmp_path, tiny_model_dir, text_file, capsys):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from controlllm.cli import run

    model = wrap(AutoModelForCausalLM.from_pretrained(tiny_model_dir), interpolation="dlerp")
    perturb_trainable(model, scale=0.3)
    model.save_pretrained(tmp_path / "delta")
    folded = {}
    for check in ("Hello there.", "Paris is the capital of France, and Madrid is the capital of Spain."):
        out = tmp_path / f"merged{len(folded)}"
        code = run(["merge", "--model", str(tmp_path / "delta"), "--base", str(tiny_model_dir), "--output", str(out),
                    "--check-text", check, "--calibration-data", str(text_file)])
        assert code == 0
        report = json.loads(capsys.readouterr().out)
        folded[check] = load_file(out / "model.safetensors")
        recorded = json.loads((out / "merge_weights.json").read_text())
    first, second = folded.values()
    assert all(torch.equal(first[k], second[k]) for k in first)  # the check text does not change the merge
    assert recorded["calibration_data"] == str(text_file)
    layers = recorded["layers"]
    assert sorted(layers) == ["0", "2"] and all(v["source"].startswith(f"measured: mean per-token weight on {text_file}")
                                                for v in layers.values())
    assert all(v["weight"] == pytest.approx(report["merge_weights"][k], abs=1e-6) for k, v in layers.items())
    assert all(v["weight"] != pytest.approx(0.5, abs=1e-6) for v in layers.values())  # not sigmoid(b)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_stack_merge_is_exact_and_deeper(arch):
    model = wrap(make_model(arch), expand_type="hybrid")
    perturb_trainable(model, scale=0.2)
    ids, mask = batch(left_pad=2, seq=8)
    model.blocks[2].interpolator.logit.data.fill_(20.0)  # w = 1: the concat fold is exact too
    expected = model(input_ids=ids, attention_mask=mask).logits
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    merged = model.merge_and_unload()
    assert merged.config.num_hidden_layers == 5 and len(merged.model.layers) == 5
    if getattr(merged.config, "layer_types", None) is not None:
        assert len(merged.config.layer_types) == 5
    assert [layer.self_attn.layer_idx for layer in merged.model.layers] == [0, 1, 2, 3, 4]
    assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)
    again = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(again, generated)
