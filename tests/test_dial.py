"""The retention dial: bit-exact ends for every method, reloads dialled, budgets honoured, clear errors."""

import dataclasses
import json
import math

import pytest
import torch

from conftest import TOKENIZER_CORPUS, batch, clone, make_model, make_tokenizer, perturb_trainable
from controlllm import ControlConfig, ControlModel, get_control_model
from controlllm.dial import (Dial, DialBudgetError, DialPoint, choose, dial_curve, read_eval_texts, search,
                             search_report)
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


# ------------------------------------------------------------------ PEFT ends, SFT data, out-of-sample budgets


@pytest.mark.parametrize("extra", [dict(modules_to_save=["lm_head"]), dict(use_dora=True),
                                   dict(use_dora=True, modules_to_save=["lm_head"],
                                        target_modules=["q_proj", "v_proj", "embed_tokens"])],
                         ids=["modules_to_save", "dora", "dora+embedding+modules_to_save"])
def test_lora_dial_ends_are_exact_with_modules_to_save_and_dora(extra):
    from peft import LoraConfig, get_peft_model

    base = make_model("llama")
    reference = clone(base)
    model = get_peft_model(base, LoraConfig(**{"r": 4, "target_modules": "all-linear", "lora_dropout": 0.0, **extra}))
    perturb_trainable(model, 0.05)  # B matrices, magnitudes and the saved copies all move
    model.eval()
    ids, mask = batch()
    trained = _logits(model, ids, mask)
    dial = Dial(model)
    dial.set(0.0)
    assert torch.equal(_logits(model, ids, mask), _logits(reference, ids, mask))
    dial.set(0.5)
    assert not torch.equal(_logits(model, ids, mask), trained)
    dial.set(1.0)
    assert torch.equal(_logits(model, ids, mask), trained)


def test_lora_dial_refuses_adapters_that_train_the_base_in_place():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], bias="all"))
    with pytest.raises(UsageError, match="bias='all'"):
        Dial(model)


CHATS = [
    [{"role": "system", "content": "Answer in Spanish."}, {"role": "user", "content": "Hello there, how are you today?"},
     {"role": "assistant", "content": "En el principio creo Dios los cielos y la tierra."}],
    [{"role": "user", "content": "What is the capital of Spain?"}, {"role": "assistant", "content": "Madrid is."}],
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "I am fine, thank you very much."}],
]


def _answer_nll(model, tokenizer, chats):
    """Mean NLL of the answer tokens, labelled by the training data code, one chat at a time."""
    from controlllm.training.data import build_sft_dataset

    total, count = 0.0, 0
    for example in build_sft_dataset(chats, tokenizer, seq_len=10_000):
        labels = example["labels"][1:]
        with torch.no_grad():
            log_q = model(input_ids=example["input_ids"][None]).logits[0, :-1].log_softmax(-1)
        real = labels != -100
        total += float(torch.nn.functional.nll_loss(log_q[real], labels[real], reduction="sum"))
        count += int(real.sum())
    return total / count


def test_dial_on_sft_chats_scores_the_answer_tokens():
    tokenizer = make_tokenizer()
    model = get_control_model(make_model("llama", vocab_size=len(tokenizer)), ControlConfig(expanded_layers=[1, 3]))
    perturb_trainable(model, 0.05)
    dial = Dial(model)
    points = dial_curve(dial, tokenizer, CHATS, CHATS, values=[1.0], seq_len=256, batch_size=2, progress=False)
    assert points[-1].learn_nll == pytest.approx(_answer_nll(model, tokenizer, CHATS), rel=1e-5)
    dial.set(0.0)
    assert points[0].learn_nll == pytest.approx(_answer_nll(model, tokenizer, CHATS), rel=1e-5)
    dial.set(1.0)
    answers = sum(len(m["content"]) for c in CHATS for m in c if m["role"] == "assistant")
    assert points[-1].learn_bpc == pytest.approx(points[-1].learn_nll * _tokens_of(tokenizer, CHATS) / math.log(2) / answers,
                                                 rel=1e-6)


def _tokens_of(tokenizer, data):
    from controlllm.evaluation.scoring import prepare

    prepared = prepare(tokenizer, data, 256)
    return sum(t != -100 for labels in prepared.labels for t in labels)


def test_eval_kl_equals_dial_kl_for_the_same_model_and_file(tmp_path):
    from controlllm.evaluation import evaluate

    tokenizer = make_tokenizer()
    model = get_control_model(make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=512),
                              ControlConfig(expanded_layers=[1, 3]))
    perturb_trainable(model, 0.05)
    long = [" ".join(TOKENIZER_CORPUS[i:] + TOKENIZER_CORPUS[:i]) * (1 + i) for i in range(4)]  # longer than seq_len
    texts = tmp_path / "keep.txt"
    texts.write_text("\n\n".join(long))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    for path in (texts, chats):
        data = read_eval_texts(path)
        point = dial_curve(Dial(model), tokenizer, data, data, values=[1.0], seq_len=32, batch_size=8,
                           progress=False)[-1]
        out = evaluate(model, tokenizer, [f"kl:{path}", f"heldout:{path}"], reference="base", seq_len=32,
                       batch_size=8, progress=False)
        assert out[f"kl:{path}/kl"] == pytest.approx(point.kl, rel=1e-6)
        assert out[f"heldout:{path}/nll"] == pytest.approx(point.learn_nll, rel=1e-6)
        assert out[f"heldout:{path}/bpc"] == pytest.approx(point.keep_bpc, rel=1e-6)


def _trained_on(learn):
    tokenizer = make_tokenizer()
    model = get_control_model(make_model("llama", vocab_size=len(tokenizer)),
                              ControlConfig(expanded_layers=[1, 3], alignment_weight=0.0))
    ids = tokenizer(learn, return_tensors="pt", padding=True)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(15):
        model(**ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


def test_search_holds_the_budget_with_a_bound_and_reports_held_out_texts():
    learn = TOKENIZER_CORPUS[:3]
    keep = [a + " " + b for a in TOKENIZER_CORPUS for b in TOKENIZER_CORPUS[:2]]  # 12 keep texts
    model, tokenizer = _trained_on(learn)
    dial = Dial(model)
    plain = dial_curve(dial, tokenizer, learn, keep, values=[0.5, 1.0], seq_len=16, progress=False, check=0.5,
                       confidence=0.95)
    assert all(p.choice_texts == 6 and p.check_texts == 6 for p in plain)
    assert all(p.kl_bound > p.kl and p.check_kl > 0 for p in plain[1:])
    budget = (plain[1].kl + plain[1].kl_bound) / 2  # s = 0.5 is within by its estimate, not by its bound
    with pytest.raises(DialBudgetError, match="upper bounds"):
        choose(plain, max_kl=budget)
    estimates = [dataclasses.replace(p, kl_bound=None, keep_increase_bound=None) for p in plain]
    assert choose(estimates, max_kl=budget).value == 0.5  # the estimate alone would take it
    best, points = search(dial, tokenizer, learn, keep, max_kl=plain[2].kl_bound * 0.9, values=[0.5, 1.0], refine=2,
                          seq_len=16, progress=False)
    assert best.kl_bound <= plain[2].kl_bound * 0.9 and best.check_kl is not None
    report = search_report(best, points, max_kl=plain[2].kl_bound * 0.9)
    assert report["held_out"]["texts"] == 6 and report["held_out"]["kl"] == best.check_kl
    assert report["held_out"]["within_budget"] == (best.check_kl <= plain[2].kl_bound * 0.9)
    assert not report["trained_fits"] and "held out of the choice" in report["note"]


def test_search_keeps_the_trained_model_at_once_when_it_fits(capsys):
    learn = TOKENIZER_CORPUS[:3]
    model, tokenizer = _trained_on(learn)
    dial = Dial(model)
    best, points = search(dial, tokenizer, learn, TOKENIZER_CORPUS[3:], max_kl=1e9, seq_len=16, progress=True)
    assert best.value == 1.0 and [p.value for p in points] == [0.0, 1.0]  # nothing else scored
    assert "already within the budget" in capsys.readouterr().err
    assert search_report(best, points, max_kl=1e9)["trained_fits"]


def test_points_carry_what_their_means_divide_by():
    tokenizer = make_tokenizer()
    model = get_control_model(make_model("llama", vocab_size=len(tokenizer)), ControlConfig(expanded_layers=[1, 3]))
    perturb_trainable(model, 0.05)
    point = dial_curve(Dial(model), tokenizer, CHATS, TOKENIZER_CORPUS, values=[1.0], seq_len=256, progress=False)[-1]
    assert point.learn_tokens == _tokens_of(tokenizer, CHATS)
    assert point.learn_characters == sum(len(m["content"]) for c in CHATS for m in c if m["role"] == "assistant")
    assert point.keep_characters == sum(map(len, TOKENIZER_CORPUS))
    assert point.keep_tokens == sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in TOKENIZER_CORPUS)
