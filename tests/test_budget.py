"""The drift budget: dual ascent holds each layer's running drift at its budget; a huge budget is no constraint."""

import pytest
import torch

from controlllm import ControlConfig, get_control_model
from controlllm.budget import DRIFT_EMA, step_drift_budget

from conftest import make_model

LAYERS = [1, 3]


def run(steps=60, lr=1e-3, seed=0, **config):
    """Train a tiny Llama's copies on random tokens with AdamW, calling the budget step after each
    optimizer step as the Trainer callback does; returns the model and the per-step report."""
    model = get_control_model(make_model("llama"), ControlConfig(expanded_layers=LAYERS, alignment_loss="nmse",
                                                                  **config))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        ids = torch.randint(0, 96, (4, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(step_drift_budget(model))
    return model, history


def test_budget_holds_drift_that_would_exceed_it_several_times():
    budget = 0.02
    _, free = run(alignment_weight=0.0)
    assert all(drift > 4 * budget for drift, _ in free[-1].values()), free[-1]  # unconstrained: far over budget
    model, held = run(alignment_budget=budget)
    for layer, (drift, multiplier) in held[-1].items():
        assert drift <= 1.25 * budget, (layer, drift)
    # The multipliers did engage on the way (every layer went over budget at some point).
    for layer in LAYERS:
        assert max(report[layer][1] for report in held) > 0.5
    stats = model.layer_statistics()
    assert set(stats) == {f"{k}/{i}" for k in ("w", "w_std", "drift", "multiplier") for i in LAYERS}


def test_huge_budget_is_the_unconstrained_run_exactly():
    free_model, _ = run(steps=8, lr=3e-3, alignment_weight=0.0)
    held_model, held = run(steps=8, lr=3e-3, alignment_budget=1e9)
    assert all(multiplier == 0.0 for _, multiplier in held[-1].values())
    a, b = free_model.trainable_state_dict(), held_model.trainable_state_dict()
    for name in a:
        if name.endswith(("budget_multiplier", "running_drift")):
            continue
        assert torch.equal(a[name], b[name]), name


def test_multiplier_decays_to_zero_when_under_budget():
    model, _ = run(steps=1, lr=1e-3, alignment_budget=0.5)
    block = model.control_blocks[1]
    block.budget_multiplier.fill_(3.0)
    seen = []
    for _ in range(8):  # drift 0: far under budget, each step lowers the multiplier by about budget_lr
        block.step_alignment_sum, block.step_tokens = torch.tensor(0.0), torch.tensor(10.0)
        seen.append(step_drift_budget(model)[1][1])
    assert seen == sorted(seen, reverse=True) and seen[0] < 3.0 and seen[-1] == 0.0


def test_budget_term_uses_multipliers():
    model, _ = run(steps=1, alignment_budget=0.01)
    for block in model.control_blocks.values():
        block.budget_multiplier.fill_(2.0)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=ids, labels=ids)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 2.0 * out.alignment_loss.item() / 0.01, rel=1e-5)


@pytest.mark.parametrize("alignment_loss", ["cosine", "nmse"])
def test_logged_drift_is_the_quantity_the_budget_constrains(alignment_loss):
    from conftest import perturb_trainable

    model = get_control_model(make_model("llama"), ControlConfig(expanded_layers=LAYERS, alignment_loss=alignment_loss,
                                                                  alignment_budget=1e-3))
    perturb_trainable(model, scale=0.05)
    model.train()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    out = model(input_ids=ids, labels=ids)
    stats = model.layer_statistics(reset=False)
    logged = [stats[f"drift/{i}"] for i in LAYERS]
    running = {i: drift for i, (drift, _) in step_drift_budget(model).items()}
    print(alignment_loss, "logged drift:", logged, "running drift / (1 - EMA):",
          [running[i] / (1 - DRIFT_EMA) for i in LAYERS], "alignment loss:", float(out.alignment_loss))
    # The running drift the budget holds starts from zero: one step puts (1 - EMA) x the step's drift in it.
    for i, value in zip(LAYERS, logged):
        assert running[i] == pytest.approx((1 - DRIFT_EMA) * value, rel=1e-5)
    assert sum(logged) / len(logged) == pytest.approx(float(out.alignment_loss), rel=1e-5)
