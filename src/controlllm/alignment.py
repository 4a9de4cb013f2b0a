"""Alignment (divergence) losses that keep the trainable branch close to the frozen one.

Each returns one value per token, in fp32; the model masks padding and averages over tokens and
expanded layers.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def mse_alignment(h_p: torch.Tensor, h_e: torch.Tensor) -> torch.Tensor:
    """Mean over hidden dims of (h_e - h_p)^2, per token."""
    return (h_e.float() - h_p.float()).pow(2).mean(dim=-1)


def nmse_alignment(h_p: torch.Tensor, h_e: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised MSE per token: ||h_e - h_p||^2 / ||h_p||^2 (the norm of h_p taken as a constant).

    The same relative drift costs the same on every model, whatever the scale of its hidden states;
    plain `mse` grows with that scale (hidden states with a few large dimensions make it dwarf the LM loss).
    """
    diff = (h_e.float() - h_p.float()).pow(2).sum(dim=-1)
    return diff / h_p.detach().float().pow(2).sum(dim=-1).clamp_min(eps)


def cosine_alignment(h_p: torch.Tensor, h_e: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """0.5 * relu(1 - margin - cos(h_p, h_e))^2 per token (smooth at zero distance); the paper's CPT loss.

    Unlike mse and nmse it is not a function of the gap h_e - h_p: it is blind to the hidden states'
    norms and to a shift of both, so its gradient reaches the layers below the expanded one even where
    the two branches respond alike, and it can be lowered by growing the hidden states (see
    `ControlBlock.forward`). nmse is the scale-free loss whose push below is the gap's.
    """
    cos = F.cosine_similarity(h_p.float(), h_e.float(), dim=-1, eps=1e-8)
    d = F.relu(1.0 - margin - cos)
    return 0.5 * d * d


def alignment_per_token(kind: str, h_p: torch.Tensor, h_e: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """The alignment loss `kind` ('mse', 'nmse' or 'cosine') for every token, shape h_p.shape[:-1], fp32."""
    if kind == "mse":
        return mse_alignment(h_p, h_e)
    if kind == "nmse":
        return nmse_alignment(h_p, h_e)
    if kind == "cosine":
        return cosine_alignment(h_p, h_e, margin)
    raise ValueError(f"Unknown alignment_loss {kind!r}; allowed: 'mse', 'nmse', 'cosine', 'none'")


def masked_layer_means(per_layer: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Each layer's per-token loss averaged over the tokens where `mask` is 1: shape [layers].

    per_layer: tensors of shape [batch, seq]; mask: [batch, seq] (1 = real token) or None.
    """
    stacked = torch.stack(per_layer)  # [layers, batch, seq]
    if mask is None:
        return stacked.mean(dim=(1, 2))
    m = mask.to(stacked.dtype).unsqueeze(0)
    return (stacked * m).sum(dim=(1, 2)).div(m.sum().clamp_min(1.0))


def masked_mean(per_layer: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Average per-token losses over the tokens where `mask` is 1, then over layers."""
    return masked_layer_means(per_layer, mask).mean()
