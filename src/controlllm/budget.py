"""The drift budget: hold each expanded layer's drift at or below a user-set level during training.

A fixed alignment weight means different things on different models, learning rates and data (the
paper's MSE at weight 1 stops a small model from learning; the scale-free nmse at weight 1 no
longer holds it back). A budget states the constraint instead, per expanded layer l:

    running_drift_l <= budget      (running_drift: an EMA over optimizer steps of the layer's
                                    alignment loss on the training batches: its nmse, or
                                    0.5 relu(1 - margin - cos)^2 for 'cosine'; the same
                                    quantity is logged as drift/{l})

and solves it by dual ascent. The loss is LM + mean_l(lambda_l * alignment_l) / budget, and after
every optimizer step

    lambda_l <- max(0, lambda_l + budget_lr * (running_drift_l / budget - 1))

so a layer's multiplier grows while the layer is over budget and decays to zero when it is under:
a layer that stays within budget trains as if unconstrained. Multipliers and running drifts are
buffers of the blocks, saved with every checkpoint, so a resumed run continues bit-identically.

`step_drift_budget(model)` is the update; `DriftBudgetCallback` calls it from any transformers
Trainer (including TRL's) after each optimizer step.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

# EMA factor of the running drift, per optimizer step (a memory of about 10 steps).
DRIFT_EMA = 0.9


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


@torch.no_grad()
def step_drift_budget(model) -> dict[int, tuple[float, float]]:
    """After an optimizer step: fold the step's observed drift into each layer's running drift and,
    under a budget, take one dual-ascent step on its multiplier. Returns {layer: (running drift,
    multiplier)}. Call it on every rank (the observations are summed across ranks first)."""
    from .model import ControlModel

    while not isinstance(model, ControlModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if not isinstance(model, ControlModel):
        return {}
    config = model.control_config
    blocks = sorted(model.control_blocks.items())
    if not blocks:
        return {}
    device = blocks[0][1].running_drift.device
    observed = torch.zeros(len(blocks), 2, dtype=torch.float64, device=device)  # (alignment x tokens, tokens)
    for j, (_, block) in enumerate(blocks):
        observed[j, 0] = torch.as_tensor(block.step_alignment_sum, dtype=torch.float64, device=device)
        observed[j, 1] = torch.as_tensor(block.step_tokens, dtype=torch.float64, device=device)
        block.reset_observations(step=True, window=False)
    observed = _all_reduce_sum(observed)
    report = {}
    for j, (index, block) in enumerate(blocks):
        sum_, tokens = observed[j]
        if tokens > 0:
            drift = (sum_ / tokens).to(block.running_drift.dtype)
            block.running_drift.mul_(DRIFT_EMA).add_((1 - DRIFT_EMA) * drift)
            if config.alignment_budget is not None:
                violation = block.running_drift.float() / config.alignment_budget - 1.0
                block.budget_multiplier.add_(config.alignment_budget_lr * violation).clamp_(min=0.0)
        report[index] = (float(block.running_drift), float(block.budget_multiplier))
    return report


class DriftBudgetCallback(TrainerCallback):
    """Runs `step_drift_budget` after every optimizer step of a transformers `Trainer`.

    Add it to any Trainer that trains a ControlModel (`controlllm.training.train` does); without it the
    multipliers stay at their initial value (zero) and running drifts are not updated.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            step_drift_budget(model)


__all__ = ["DriftBudgetCallback", "step_drift_budget", "DRIFT_EMA"]
