import pytest
import torch

from controlllm import ControlConfig, get_control_model, merge_fidelity

from conftest import batch, clone, make_model, perturb_trainable


def wrap(model, **kwargs):
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


def test_dynamic_merge_uses_weight_measured_in_eval():
    model = wrap(make_model("llama"), interpolation="dlerp")
    perturb_trainable(model, scale=0.3)
    block = model.blocks[0]
    assert block.merge_weight() == pytest.approx(block.interpolator.nominal_weight())
    ids, mask = batch(left_pad=3)
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    expected = float((block.last_weight.squeeze(-1).double() * mask).sum() / mask.sum())
    assert block.merge_weight() == pytest.approx(expected)
    model.train()
    model(input_ids=ids, attention_mask=mask)
    assert block.merge_weight() == pytest.approx(expected)  # training does not move the statistic


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
