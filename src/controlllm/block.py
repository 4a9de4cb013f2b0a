"""Control blocks: a frozen decoder layer paired with its trainable copy.

`ControlBlock` (concat, Control LLM) runs both on the same input and merges them with an
interpolator. `StackBlock` (LLaMA-Pro) runs the copy after the frozen layer, the copy's output
projections zeroed so it starts as the identity. Both give the copy its own KV-cache slot: the
copy's attention is numbered `slot` (>= the model's layer count) and the block makes sure the
cache has that slot before the layers run, so no cache object is patched and no slot is guessed.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from .alignment import alignment_per_token, nmse_alignment
from .config import BUDGET_LOSSES
from .interpolators import Interpolator

# Names of the output projections of attention and MLP sub-blocks across architectures.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "fc2", "c_proj")


# Post-norm decoder layers (Gemma 2/3, OLMo 2) normalise each sub-block's output before the
# residual add; they are recognised by their norm after the MLP, and both of these norms are
# output norms there (in Llama-like layers `post_attention_layernorm` is the MLP's input norm).
POST_NORM_MARKER = "post_feedforward_layernorm"
POST_SUBLAYER_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def _silence_norm(norm: nn.Module, what: str) -> None:
    """Set a norm's scale so that it outputs exactly zero: weight 0 for `weight * x_hat`, or -1
    for Gemma's `(1 + weight) * x_hat`, found by probing the module."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Stack expansion needs a scale parameter `weight` on {what} to start the copy as the identity")
    probe = torch.randn(2, weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()
        for value in (0.0, -1.0):
            weight.fill_(value)
            if not norm(probe).any():
                return
    raise ValueError(f"Stack expansion cannot make {what} ({type(norm).__name__}) output zero with a constant scale")


def renumber_layer(layer: nn.Module, old_index: int, new_index: int) -> None:
    """Point every sub-module that addresses the KV cache as layer `old_index` to `new_index`."""
    for module in layer.modules():
        if getattr(module, "layer_idx", None) == old_index:
            module.layer_idx = new_index


def copy_layer(layer: nn.Module, index: int, slot: int) -> nn.Module:
    """A trainable deep copy of decoder layer `index` that caches its keys/values in slot `slot`.

    A quantised layer (`controlllm.quantize`) is copied with its weights dequantised, in the dtype
    it computes in: the copy computes exactly what the quantised layer computes."""
    from .quantize import dequantized_copy, is_quantized_linear

    quantized = any(is_quantized_linear(m) for m in layer.modules())
    clone = dequantized_copy(layer) if quantized else copy.deepcopy(layer)
    renumber_layer(clone, index, slot)
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def _fresh_cache_layer_like(cache, like: int, slot: int):
    template = cache.layers[like]
    if template.get_seq_length() > 0:
        raise RuntimeError(
            f"The KV cache has no slot {slot} for a trainable branch but already holds tokens for layer {like}: it "
            "was filled by a pass without the Control blocks (e.g. under disable_control()). Start from a new cache."
        )
    return copy.deepcopy(template)


def ensure_cache_slot(cache, slot: int, plan: "CachePlan") -> None:
    """Append empty cache layers to `cache` up to `slot`, each shaped like the frozen layer it mirrors.

    transformers builds caches from the config, with one slot per original layer; the trainable
    branches live beyond them. Caches that grow lazily (no config) need nothing.
    """
    if cache is None or getattr(cache, "layer_class_to_replicate", None) is not None:
        return
    layers = cache.layers
    while len(layers) <= slot:
        extra = len(layers) - plan.num_base_layers
        if extra < 0:
            raise RuntimeError(
                f"The KV cache has {len(layers)} layers but the model has {plan.num_base_layers}: it was not built "
                "for this model"
            )
        layers.append(_fresh_cache_layer_like(cache, plan.mirrors[extra], plan.num_base_layers + extra))


class CachePlan:
    """Which original layer each extra cache slot mirrors: slot num_base_layers + j mirrors mirrors[j]."""

    def __init__(self, num_base_layers: int, mirrors: list[int]):
        self.num_base_layers = num_base_layers
        self.mirrors = list(mirrors)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _like(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _cache_of(kwargs):
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class _Block(nn.Module):
    """Shared state: the frozen `base_layer`, the trainable `expanded_layer`, an on/off switch."""

    def __init__(self, base_layer: nn.Module, index: int, slot: int, plan: CachePlan):
        super().__init__()
        self.base_layer = base_layer
        self.expanded_layer = copy_layer(base_layer, index, slot)
        self.layer_index = index
        self.slot = slot
        self.plan = plan
        self.enabled = True
        # The retention dial s (`controlllm.dial`): how much of the trained branch is used, 1 = all
        # of it (the trained model, bit for bit), 0 = none (the base model, bit for bit).
        self.dial = 1.0

    @contextmanager
    def disabled(self):
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


class ControlBlock(_Block):
    """Concat expansion: h = h_p + w (h_e - h_p), h_p from the frozen layer, h_e from its trainable copy.

    When `record` is set (by `ControlModel.forward`), the block keeps its per-token alignment loss
    in `alignment` ([batch, seq], fp32), in training its per-token drift (detached) in `drift`, and the
    weights it used in `last_weight`; otherwise it does no extra work, so generation pays only for
    the second branch.

    The drift is the quantity a drift budget constrains, in one unit: the alignment loss itself when
    it is scale-free ('nmse' or 'cosine': 0.5 relu(1 - margin - cos)^2), else ('mse', 'none') the nmse.

    Buffers `budget_multiplier` and `running_drift` hold the drift budget's state (see
    `controlllm.budget`); they are saved with the delta so a resumed run continues exactly.
    """

    def __init__(self, base_layer: nn.Module, index: int, slot: int, plan: CachePlan, interpolator: Interpolator,
                 alignment_loss: str = "mse", alignment_margin: float = 0.0):
        super().__init__(base_layer, index, slot, plan)
        self.interpolator = interpolator
        self.alignment_loss = alignment_loss
        self.alignment_margin = alignment_margin
        self.record = False
        self.alignment: torch.Tensor | None = None
        self.drift: torch.Tensor | None = None
        self.last_weight: torch.Tensor | None = None
        self.register_buffer("budget_multiplier", torch.zeros((), dtype=torch.float32))
        self.register_buffer("running_drift", torch.zeros((), dtype=torch.float32))
        self.reset_observations()
        # The weight a merge folds a dynamic interpolator with at s = 1, measured only when asked
        # (`ControlModel.measure_merge_weights`) or restored from a run's record; plain Python numbers,
        # so dtype casts keep them exact. At dial s the fold uses s times it (`merge_weight`).
        self.measured_weight: float | None = None
        self.measured_on: str | None = None
        # An absolute fold weight recorded by an earlier release for this dial (a later stage's
        # lineage); used verbatim so the stage is rebuilt onto the very base it was trained on.
        self.fold_weight: float | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if not self.enabled:
            return self.base_layer(hidden_states, *args, **kwargs)
        ensure_cache_slot(_cache_of(kwargs), self.slot, self.plan)
        out_p = self.base_layer(hidden_states, *args, **kwargs)
        out_e = self.expanded_layer(hidden_states, *args, **kwargs)
        h_p, h_e = _first(out_p), _first(out_e)
        h, w = self.interpolator(h_p, h_e, hidden_states, self.dial)
        if self.record:
            # Both branches stay in the graph, as functions of the block input x (h = x + f(x)). For a
            # loss of the gap h_e - h_p alone (mse; nmse, whose normaliser |h_p|^2 is a constant) the
            # gradient sent below is (J_e - J_p)^T dL/d(gap): non-zero only where the branches respond
            # differently. Detaching h_p would send (I + J_e)^T dL/dh_e, whose identity part moves the
            # residual stream, both branches at once: drift, not alignment. Cosine is not a function of
            # the gap (not translation-invariant): its gradients on h_p and h_e do not cancel, so it
            # pushes the layers below even when the branches respond alike (a copy off by a constant
            # sends them 0.7-2.3x its own gradient, tests/test_alignment.py) and can lower its value by
            # growing the hidden states. nmse is the scale-free loss whose push below is the gap's.
            self.alignment = (None if self.alignment_loss == "none"
                              else alignment_per_token(self.alignment_loss, h_p, h_e, self.alignment_margin))
            if self.training and torch.is_grad_enabled():  # only training observes the drift
                self.drift = (self.alignment.detach() if self.alignment_loss in BUDGET_LOSSES
                              else nmse_alignment(h_p.detach(), h_e.detach()))
            self.last_weight = w.detach()
        return _like(out_p, h)

    # -------------------------------------------------------------- observations (training only)
    def reset_observations(self, step: bool = True, window: bool = True) -> None:
        """Clear what was observed since the last optimizer step (`step`) / the last log (`window`)."""
        if step:
            self.step_alignment_sum, self.step_tokens = 0.0, 0.0
        if window:
            self.window = {"drift": 0.0, "w": 0.0, "w_std": 0.0, "n": 0}

    def observe(self, alignment_mean: torch.Tensor | None, drift_mean: torch.Tensor, tokens: torch.Tensor,
                w_mean: torch.Tensor, w_std: torch.Tensor) -> None:
        """Add one training micro-batch's layer means (detached tensors; no device sync here)."""
        if alignment_mean is not None:
            self.step_alignment_sum = self.step_alignment_sum + alignment_mean * tokens
            self.step_tokens = self.step_tokens + tokens
        self.window["drift"] = self.window["drift"] + drift_mean
        self.window["w"] = self.window["w"] + w_mean
        self.window["w_std"] = self.window["w_std"] + w_std
        self.window["n"] += 1

    def merge_weight(self) -> float:
        """The w used to fold the copy into the frozen layer: the dial s times, for dynamic
        interpolators, the mean per-token weight at s = 1 measured by
        `ControlModel.measure_merge_weights` (when measured), else the interpolator's own weight
        (sigmoid of its logit or bias). One rule at every dial: the fold at s is s times the fold at 1."""
        if self.fold_weight is not None:
            return self.fold_weight
        if self.interpolator.dynamic and self.measured_weight is not None:
            return self.dial * self.measured_weight
        return self.dial * self.interpolator.nominal_weight()

    def merge_weight_source(self) -> str:
        """Where `merge_weight()` comes from, in words (for the merged model's metadata)."""
        dial = f" x dial {self.dial:g}" if self.dial != 1.0 else ""
        if self.fold_weight is not None:
            return f"recorded: {self.measured_on}"
        if self.interpolator.dynamic and self.measured_weight is not None:
            return f"measured: mean per-token weight on {self.measured_on}{dial}"
        if self.interpolator.dynamic:
            return f"sigmoid(b) of the gate{dial}: no weight was measured"
        return f"sigmoid(f) of the interpolation logit{dial}"


def make_identity(layer: nn.Module, what: str) -> nn.Module:
    """Make a copy of a decoder layer add exactly zero to the residual stream (in place): the stack
    copy's initialisation (see `StackBlock`). Returns the layer."""
    if isinstance(getattr(layer, POST_NORM_MARKER, None), nn.Module):
        for name in POST_SUBLAYER_NORMS:
            _silence_norm(getattr(layer, name), f"{what}.{name}")
        return layer
    zeroed = 0
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS and isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            zeroed += 1
    if zeroed < 2:
        raise ValueError(
            f"Stack expansion needs the attention and MLP output projections of {what} "
            f"(Linear layers named one of {OUTPUT_PROJECTIONS}) to start the copy as the identity; found {zeroed}"
        )
    return layer


class StackBlock(_Block):
    """Stack expansion (LLaMA-Pro): the trainable copy runs after the frozen layer.

    The copy starts as exactly the identity: each sub-block adds zero to the residual stream.
    Pre-norm layers (Llama, Qwen, Mistral, Phi3, ...) get their output projections (weights and
    biases) zeroed, as LLaMA-Pro does. Post-norm layers (Gemma 2/3, OLMo 2: a norm on each
    sub-block's output before the residual add) get that norm's scale set to output zero instead,
    and keep their projections: a zeroed projection feeding a norm would be rescaled to full size
    by the norm after the first small update.
    """

    def __init__(self, base_layer: nn.Module, index: int, slot: int, plan: CachePlan):
        super().__init__(base_layer, index, slot, plan)
        make_identity(self.expanded_layer, type(base_layer).__name__)

    def forward(self, hidden_states, *args, **kwargs):
        if not self.enabled:
            return self.base_layer(hidden_states, *args, **kwargs)
        ensure_cache_slot(_cache_of(kwargs), self.slot, self.plan)
        out_p = self.base_layer(hidden_states, *args, **kwargs)
        out_e = self.expanded_layer(_first(out_p), *args, **kwargs)
        if self.dial == 1.0:
            return _like(out_p, _first(out_e))
        # The dial scales the copy's contribution: h_p + s (copy(h_p) - h_p); s = 0 is h_p exactly.
        h_p = _first(out_p)
        return _like(out_p, torch.lerp(h_p, _first(out_e), self.dial))
