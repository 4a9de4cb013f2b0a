"""The retention benchmark's own measuring code, on tiny random models (the benchmark itself runs
on the real model with `make bench-retention`)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from conftest import TOKENIZER_CORPUS, make_model, make_tokenizer
from controlllm import ControlConfig, get_control_model
from controlllm.evaluation import heldout_loss, kl_to_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "retention"))
tasks = pytest.importorskip("retention_tasks")
report = pytest.importorskip("retention_report")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256)
    return model, tokenizer


def test_per_text_nll_sums_to_the_library_heldout_loss(tiny):
    model, tokenizer = tiny
    texts = TOKENIZER_CORPUS[:5]
    scores = tasks.per_text_scores(model, tokenizer, texts, seq_len=128, batch_size=2)
    whole = heldout_loss(model, tokenizer, texts, seq_len=128, batch_size=3, progress=False)
    assert sum(scores["tokens"]) == whole["tokens"]
    assert math.isclose(tasks.bpc(scores), whole["bpc"], rel_tol=1e-5)


def test_per_text_kl_matches_the_library_and_is_zero_at_init(tiny):
    model, tokenizer = tiny
    control = get_control_model(make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256),
                                ControlConfig(num_expanded_layers=2))

    def base(ids, mask):
        with control.disable_control():
            return control(input_ids=ids, attention_mask=mask).logits

    texts = TOKENIZER_CORPUS[:4]
    at_init = tasks.per_text_scores(control, tokenizer, texts, reference=base, batch_size=2)
    assert max(abs(k) for k in at_init["kl"]) < 1e-6  # an untrained Control model is the base model
    with torch.no_grad():
        for p in control.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    moved = tasks.per_text_scores(control, tokenizer, texts, reference=base, batch_size=2)
    # Batched and padded, each text's KL equals that of the text alone, over its predicted positions.
    for text, kl in zip(texts, moved["kl"]):
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)])[:, :-1]
        mask = torch.ones_like(ids)
        with torch.no_grad():
            log_q = control(input_ids=ids, attention_mask=mask).logits[0].log_softmax(-1)
            log_p = base(ids, mask)[0].log_softmax(-1)
        assert kl == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum()), rel=1e-4)
    # The library's mean KL also scores the position after each text's last token: close, not equal.
    library = kl_to_reference(control, "base", tokenizer, texts, seq_len=256, batch_size=3, progress=False)
    assert sum(moved["kl"]) / sum(moved["tokens"]) == pytest.approx(library, rel=0.2)


def test_paired_change_and_its_standard_error():
    change, se = tasks.paired_change([0, 1, 1, 0], [1, 1, 0, 1])
    assert change == pytest.approx(0.25)
    d = [1, 0, -1, 1]
    sd = math.sqrt(sum((x - 0.25) ** 2 for x in d) / 3)
    assert se == pytest.approx(sd / 2)
    # A constant shift has no paired uncertainty, however noisy the items are.
    assert tasks.paired_change([3.0, 10.0, -4.0], [3.5, 10.5, -3.5]) == pytest.approx((0.5, 0.0))
    weighted, _ = tasks.paired_change([1.0, 2.0], [2.0, 4.0], weights=[10, 20])
    assert weighted == pytest.approx(3.0 / 30)


def test_arithmetic_splits_never_share_a_problem_and_answers_are_right():
    test = tasks.arithmetic_items(50, seed=1)
    train = tasks.arithmetic_items(300, seed=3, exclude={it["key"] for it in test})
    assert not {it["key"] for it in test} & {it["key"] for it in train}
    for it in test + train:
        a, op, b = it["key"]
        assert int(it["answer"]) == (a + b if op == "+" else a - b)
        assert it["response"].endswith(f"= {it['answer']}")
        assert 10 <= a <= 999 and 10 <= b <= 999


def test_learning_rate_choice_uses_validation_only():
    runs = [
        {"lr": 1e-4, "val": {"arith_val": {"exact_match": 0.5}}, "val_loss": 0.3},
        {"lr": 3e-4, "val": {"arith_val": {"exact_match": 0.5}}, "val_loss": 0.2},
        {"lr": 1e-3, "val": {"arith_val": {"exact_match": 0.4}}, "val_loss": 0.1},
    ]
    assert report.choose("csft", runs)["lr"] == 3e-4  # best exact match, tie broken by validation loss
    assert report.choose("cpt", runs)["lr"] == 1e-3  # lowest validation loss
