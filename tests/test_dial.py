"""The retention dial: bit-exact ends for every method, reloads dialled, budgets honoured, clear errors."""

import json

import pytest
import torch

from conftest import TOKENIZER_CORPUS, batch, clone, make_model, make_tokenizer, perturb_trainable
from controlllm import ControlConfig, ControlModel, get_control_model
from controlllm.dial import Dial, DialBudgetError, DialPoint, choose, dial_curve, search
from controlllm.errors import UsageError

CONFIGS = {
    "lerp": dict(expanded_layers=[1, 3]),
    "dlerp": dict(expanded_layers=[0, 2], interpolation="dlerp"),
    "dlerp_in": dict(expanded_layers=[1, 2], interpolation="dlerp_in"),
    "slerp": dict(expanded_layers=[3], interpolation="slerp"),
    "hybrid": dict(expanded_layers=[0, 1, 3], expand_type="hybrid"),
}


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _trained_control(name, seed=0):
    base = make_model("llama", seed=seed)
    reference = clone(base)
    model = get_control_model(base, ControlConfig(**CONFIGS[name]))
    perturb_trainable(model, 0.05)
    return model, reference


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["output", "weights"])
def test_control_dial_ends_are_the_base_and_the_trained_model_bit_for_bit(name, mode):
    model, base = _trained_control(name)
    ids, mask = batch(left_pad=3)
    trained = _logits(model, ids, mask)
    dial = Dial(model, mode=mode)
    dial.set(0.0)
    assert torch.equal(_logits(model, ids, mask), _logits(base, ids, mask))
    dial.set(0.4)
    middle = _logits(model, ids, mask)
    assert not torch.equal(middle, trained) and not torch.equal(middle, _logits(base, ids, mask))
    dial.set(1.0)
    assert torch.equal(_logits(model, ids, mask), trained)
    dial.set(0.4)
    assert torch.equal(_logits(model, ids, mask), middle)  # any value, any number of times


def test_output_dial_scales_every_weight_per_layer_and_per_token():
    model, _ = _trained_control("dlerp")
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    full = {i: b.last_weight.clone() for i, b in model.control_blocks.items()}
    model.set_dial(0.25)
    assert model.control_config.dial == 0.25
    model(input_ids=ids, attention_mask=mask)
    for i, b in model.control_blocks.items():
        # The first dialled layer sees the same input, so its gate computes the same w, times 0.25.
        if i == min(model.control_blocks):
            assert torch.allclose(b.last_weight, 0.25 * full[i])
    lerp, _ = _trained_control("lerp")
    w = lerp.interpolation_weights()
    lerp.set_dial(0.5)
    assert lerp.merge_weights()[1]["weight"] == pytest.approx(0.5 * w[1])
    assert "dial 0.5" in lerp.merge_weights()[1]["source"]


def test_a_dialled_delta_reloads_dialled_and_merges_at_s_w(tmp_path):
    model, base = _trained_control("hybrid")
    ids, mask = batch()
    model.set_dial(0.3)
    dialled = _logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "control_config.json").read_text())
    assert saved["control_config"]["dial"] == 0.3
    again = ControlModel.from_pretrained(clone(base), tmp_path)
    assert again.dial == 0.3
    assert torch.equal(_logits(again, ids, mask), dialled)
    # Merging at s = 0 gives the base model exactly, stack copies included (folded to the identity).
    again.set_dial(0.0)
    merged = again.merge_and_unload()
    assert torch.equal(_logits(merged, ids, mask), _logits(base, ids, mask))


def test_merging_a_dialled_lerp_model_folds_at_s_w():
    model, _ = _trained_control("lerp")
    model.set_dial(0.5)
    w = {i: b.interpolator.nominal_weight() for i, b in model.control_blocks.items()}
    block = model.control_blocks[1]
    expected = {n: p + 0.5 * w[1] * (dict(block.expanded_layer.named_parameters())[n] - p)
                for n, p in block.base_layer.named_parameters()}
    merged = model.merge_and_unload()
    for name, p in merged.model.layers[1].named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-7)


def test_wise_ft_dial_of_a_full_fine_tune():
    base = make_model("llama")
    tuned = clone(base)
    for p in tuned.parameters():
        p.requires_grad_(True)
    perturb_trainable(tuned, 0.05)
    ids, mask = batch()
    trained = _logits(tuned, ids, mask)
    dial = Dial(tuned, base=base)
    assert dial.kind == "weights" and dial.set(0.0) is tuned
    assert torch.equal(_logits(tuned, ids, mask), _logits(base, ids, mask))
    dial.set(0.5)
    for (name, p), q in zip(tuned.named_parameters(), base.parameters()):
        assert torch.allclose(p, q + 0.5 * (dial._trained[name] - q), atol=1e-7)
    dial.set(1.0)
    assert torch.equal(_logits(tuned, ids, mask), trained)
    with pytest.raises(UsageError, match="needs its base model"):
        Dial(tuned)
    with pytest.raises(UsageError, match="does not match"):
        Dial(tuned, base=make_model("llama", num_hidden_layers=2))


def test_lora_dial_scales_the_adapter():
    from peft import LoraConfig, get_peft_model

    base = make_model("llama")
    reference = clone(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    ids, mask = batch()
    trained = _logits(model, ids, mask)
    dial = Dial(model)
    assert dial.kind == "lora"
    dial.set(0.0)
    assert torch.equal(_logits(model, ids, mask), _logits(reference, ids, mask))
    dial.set(1.0)
    assert torch.equal(_logits(model, ids, mask), trained)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_dial_values_are_refused(value):
    model, _ = _trained_control("lerp")
    with pytest.raises((UsageError, ValueError), match="dial"):
        Dial(model).set(value)
    with pytest.raises(ValueError, match="dial"):
        ControlConfig(dial=value) if not isinstance(value, str) else ControlConfig(dial=float("inf"))
    with pytest.raises(UsageError, match="mode"):
        Dial(model, mode="sideways")


def _point(value, gain, kl, keep=0.0):
    return DialPoint(value=value, learn_nll=0, learn_bpc=0, keep_nll=0, keep_bpc=0, kl=kl, gain=gain, keep_increase=keep)


def test_choose_takes_the_most_gain_within_the_budget_and_names_the_closest_when_none():
    points = [_point(0, 0, 0), _point(0.25, 0.2, 0.01, 0.001), _point(0.5, 0.3, 0.04, 0.01), _point(1, 0.35, 0.2, 0.05)]
    assert choose(points, max_kl=0.05).value == 0.5
    assert choose(points, max_kl=0.05, max_keep_increase=0.005).value == 0.25
    assert choose(points, max_keep_increase=1).value == 1
    with pytest.raises(DialBudgetError, match=r"closest is s = 0.25 with KL 0.01"):
        choose(points, max_kl=0.001)
    with pytest.raises(UsageError, match="give a forgetting budget"):
        choose(points)
    with pytest.raises(UsageError, match="max_kl=-1"):
        choose(points, max_kl=-1)


def test_curve_on_real_text_starts_at_the_base_and_the_search_honours_the_budget():
    tokenizer = make_tokenizer()
    base = make_model("llama", vocab_size=len(tokenizer))
    model = get_control_model(base, ControlConfig(expanded_layers=[1, 3], alignment_weight=0.0))
    learn, keep = TOKENIZER_CORPUS[:3], TOKENIZER_CORPUS[3:]
    ids = tokenizer(learn, return_tensors="pt", padding=True)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(15):  # learn the learn texts: the dial then has a gain to trade
        model(**ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    dial = Dial(model)
    points = dial_curve(dial, tokenizer, learn, keep, values=[0.5, 1.0], seq_len=16, progress=False)
    assert [p.value for p in points] == [0.0, 0.5, 1.0]
    assert points[0].kl == 0.0 and points[0].gain == 0.0 and points[0].keep_increase == 0.0
    assert 0 < points[1].kl < points[2].kl
    assert model.dial == 1.0  # left where it was
    budget = points[1].kl * 1.5
    best, scored = search(dial, tokenizer, learn, keep, max_kl=budget, values=[0.5, 1.0], refine=2, seq_len=16,
                          progress=False)
    assert best.kl <= budget and model.dial == best.value
    assert len(scored) > 3  # the bisection scored values between 0.5 and 1
    assert all(p.kl > budget for p in scored if p.value > best.value)
