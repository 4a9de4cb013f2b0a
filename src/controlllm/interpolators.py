"""Interpolators: how a Control block merges the frozen branch h_p with the trainable branch h_e.

Pure tensor maths, no model knowledge. Every interpolator returns `(h, w)` where `w` is the weight
given to the trainable branch, a 0-dim tensor (one per layer) or one per token (shape [..., 1]).
The merge is written h_p + w * (h_e - h_p), which is bit-exact h_p whenever h_e == h_p (at
initialisation), whatever w is; the textbook (1 - w) h_p + w h_e is not.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

# Below this angle (radians) slerp's sin(theta) denominator is unreliable and lerp is used instead;
# the same threshold is applied near pi, where the two directions are opposite.
SLERP_MIN_ANGLE = 1e-3


def lerp(h_p: torch.Tensor, h_e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h_p + w (h_e - h_p), in the dtype of h_p."""
    return h_p + w.to(h_p.dtype) * (h_e - h_p)


def slerp(h_p: torch.Tensor, h_e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per token (last dim = hidden), computed in fp32.

    theta = acos(<h_p/|h_p|, h_e/|h_e|>) and h = sin((1-w) theta)/sin(theta) h_p + sin(w theta)/sin(theta) h_e.
    Tokens whose angle is within SLERP_MIN_ANGLE of 0 or pi fall back to lerp, decided per token so
    one sequence never changes another's output. Gradients stay finite where the branches coincide:
    the slerp side is evaluated at a safe angle for those tokens, so `torch.where` never multiplies
    a zero gradient by an infinite derivative.
    """
    dtype = h_p.dtype
    p, e = h_p.float(), h_e.float()
    wf = w.float()
    cos = (nn.functional.normalize(p, dim=-1, eps=1e-12) * nn.functional.normalize(e, dim=-1, eps=1e-12)).sum(-1, keepdim=True)
    limit = torch.cos(torch.tensor(SLERP_MIN_ANGLE, dtype=torch.float32, device=cos.device))
    degenerate = cos.abs() >= limit
    safe_cos = torch.where(degenerate, torch.zeros_like(cos), cos)  # acos(0) = pi/2: well away from the poles
    theta = torch.acos(safe_cos)
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - wf) * theta) / sin_theta) * p + (torch.sin(wf * theta) / sin_theta) * e
    linear = p + wf * (e - p)
    return torch.where(degenerate, linear, spherical).to(dtype)


class Interpolator(nn.Module, abc.ABC):
    """Base class. `forward(h_p, h_e, x, scale)` -> (h, w); x is the block input (used by dlerp_in).

    `scale` is the retention dial s (`controlllm.dial`): the weight actually used is s * w, per
    layer or per token. s = 1 computes exactly what the interpolator computes alone (s * w == w);
    s = 0 gives exactly h_p (the base model)."""

    dynamic = False  # True when w is computed per token

    @abc.abstractmethod
    def nominal_weight(self) -> float:
        """The weight this interpolator gives the trainable branch when no input is at hand."""


class Lerp(Interpolator):
    """w = sigmoid(f), one scalar logit f per layer."""

    def __init__(self, init: float = 0.0):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(init)))

    def weight(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def nominal_weight(self) -> float:
        return float(self.weight().detach())

    def forward(self, h_p, h_e, x=None, scale: float = 1.0):
        w = self.weight() * scale
        return lerp(h_p, h_e, w), w


class Slerp(Lerp):
    """Spherical interpolation with w = sigmoid(f), one scalar logit per layer."""

    def forward(self, h_p, h_e, x=None, scale: float = 1.0):
        w = self.weight() * scale
        return slerp(h_p, h_e, w), w


def gate_features(features: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """The input of a per-token gate: with `normalize`, each token's vector scaled to unit RMS and
    divided by sqrt(dim) (unit norm), computed in fp32.

    Unnormalised hidden states have norms in the hundreds on real models, so a zero-initialised gate
    under Adam (every weight moves by about lr per step) shifts its logit by lr x sum |h_i| per step,
    several units at lr 1e-3: the gate saturates at 0 or 1 within a few steps. On unit-norm input the
    shift is at most lr x sqrt(dim).
    """
    if not normalize:
        return features.to(dtype)
    f = features.float()
    f = f * torch.rsqrt(f.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12))
    return f.to(dtype)


class DLerp(Interpolator):
    """Dynamic lerp: w = sigmoid(W [h_p ; h_e] + b) per token, W: 2H -> 1 (zero-initialised), b = f.

    With `normalize` (the default) the gate reads [h_p ; h_e] scaled to unit norm per token
    (`gate_features`); without it, the raw hidden states as in the reference release.
    """

    dynamic = True

    def __init__(self, hidden_size: int, init: float = 0.0, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        self.gate = self._zero_gate(2 * hidden_size, init)

    @staticmethod
    def _zero_gate(in_features: int, init: float) -> nn.Linear:
        gate = nn.Linear(in_features, 1)
        nn.init.zeros_(gate.weight)
        nn.init.constant_(gate.bias, float(init))
        return gate

    def nominal_weight(self) -> float:
        return float(torch.sigmoid(self.gate.bias.detach()[0]))

    def forward(self, h_p, h_e, x=None, scale: float = 1.0):
        features = gate_features(torch.cat([h_p, h_e], dim=-1), self.normalize, self.gate.weight.dtype)
        w = torch.sigmoid(self.gate(features)) * scale
        return lerp(h_p, h_e, w), w


class DLerpIn(DLerp):
    """Dynamic lerp from the block input: w = sigmoid(W x + b) per token, W: H -> 1."""

    def __init__(self, hidden_size: int, init: float = 0.0, normalize: bool = True):
        nn.Module.__init__(self)
        self.normalize = normalize
        self.gate = self._zero_gate(hidden_size, init)

    def forward(self, h_p, h_e, x=None, scale: float = 1.0):
        w = torch.sigmoid(self.gate(gate_features(x, self.normalize, self.gate.weight.dtype))) * scale
        return lerp(h_p, h_e, w), w


def build_interpolator(name: str, hidden_size: int, init: float = 0.0, gate_norm: bool = True) -> Interpolator:
    """The interpolator called `name` ('lerp', 'dlerp', 'dlerp_in', 'slerp'); `gate_norm` applies to
    the per-token gates."""
    if name == "lerp":
        return Lerp(init)
    if name == "slerp":
        return Slerp(init)
    if name == "dlerp":
        return DLerp(hidden_size, init, gate_norm)
    if name == "dlerp_in":
        return DLerpIn(hidden_size, init, gate_norm)
    raise ValueError(f"Unknown interpolation {name!r}; allowed: 'lerp', 'dlerp', 'dlerp_in', 'slerp'")
