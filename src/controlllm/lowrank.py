"""Low-rank copies: a Control branch that is its frozen layer plus a trainable low-rank update.

`ControlConfig(copy_rank=r, copy_alpha=alpha)` builds each expanded layer's trainable branch with
`low_rank_copy` instead of a full deep copy. The branch has the decoder layer's own structure (so it
runs with the same arguments and caches its keys/values in its own slot), but holds no weight of its
own: every linear layer is a `LowRankLinear` computing

    y = frozen(x) + (alpha / r) B A x,          A: r x in, B: out x r, B = 0 at the start,

where `frozen` is the frozen layer's own linear module (full precision or bitsandbytes 4-/8-bit:
the update is added on top of what the quantised layer computes), and every other module with
weights (norms) is a `SharedModule` calling the frozen layer's module. The frozen modules are
reached by name through the frozen layer, never registered in the copy: the copy's parameters
(and its state dict, so the saved delta) are the factors A and B alone, and no full-precision copy
of a weight exists, nor its gradient or optimizer state. Because the frozen modules are looked up
on every call, replacing them (`ControlModel.dequantize`) is seen by the copy at once.

At initialisation B = 0, so the branch computes exactly what the frozen layer computes and the model
is the base bit for bit (y = frozen(x) + 0). The dense weight the branch stands for is
W_e = W_p + (alpha / r) B A; merging folds W_p + w (W_e - W_p) = W_p + w (alpha / r) B A
(`fold_low_rank`), and the weight-space dial scales B (s B A), the s = 0 end being the base exactly.

A and B are kept in float32 whatever the frozen layer's dtype (as PEFT keeps LoRA factors): the input
is cast to float32 for the update and the update cast back to the layer's output dtype.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

FACTOR_DTYPE = torch.float32


class _Frozen(nn.Module):
    """A module standing for a module of the frozen layer `root` (found by `name` on every call, and
    never registered here, so it adds no parameter or state-dict entry to the copy)."""

    def __init__(self, root: nn.Module, name: str):
        super().__init__()
        self.__dict__["_frozen_root"] = root
        self.frozen_name = name

    @property
    def frozen(self) -> nn.Module:
        """The frozen module this one stands for (the current one, e.g. after dequantisation)."""
        return self.__dict__["_frozen_root"].get_submodule(self.frozen_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_frozen_root" not in self.__dict__ or name == "frozen" or name.startswith("__"):
                raise
            return getattr(self.frozen, name)  # attributes read by the layer's code (weight, eps, ...)


class SharedModule(_Frozen):
    """A non-linear module of the copy (a norm) that is the frozen layer's own module: no copy, no training."""

    def forward(self, *args, **kwargs):
        return self.frozen(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"shares={self.frozen_name!r}"


class LowRankLinear(_Frozen):
    """y = frozen(x) + (alpha / r) B A x, with the frozen layer's linear module (plain or quantised)
    and trainable factors `lora_A` (r x in, Kaiming-uniform as in LoRA) and `lora_B` (out x r, zero)."""

    def __init__(self, root: nn.Module, name: str, in_features: int, out_features: int, rank: int, alpha: float,
                 device: torch.device | str | None = None, seed: int = 0):
        super().__init__(root, name)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        a = torch.empty(self.rank, in_features, dtype=FACTOR_DTYPE)
        # Seeded per layer and module, so building the model draws nothing from the global generator.
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.rank, dtype=FACTOR_DTYPE, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.frozen(x)
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A in float32: the copy's weight minus the frozen weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return (f"shares={self.frozen_name!r}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}")


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)


def _is_linear(module: nn.Module) -> bool:
    from .quantize import is_quantized_linear

    return type(module) is nn.Linear or is_quantized_linear(module)


def low_rank_copy(layer: nn.Module, index: int, slot: int, rank: int, alpha: float) -> nn.Module:
    """The trainable branch of decoder layer `index` as its frozen weights plus a low-rank update:
    the layer's structure with every linear module a `LowRankLinear` and every other module holding
    weights a `SharedModule` (both using `layer`'s own modules), caching keys/values in slot `slot`.
    Only the factors A and B are parameters of the result."""
    from .block import renumber_layer

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"copy rank {rank!r} must be a positive integer")
    own = [n for n, _ in layer.named_parameters(recurse=False)]
    if own:
        raise ValueError(f"a low-rank copy of {type(layer).__name__} cannot share its own parameters {own}; "
                         "use full copies (copy_rank=None)")
    memo: dict[int, nn.Module] = {}
    device = next((p.device for p in layer.parameters()), None)
    linear = 0
    for name, module in layer.named_modules():
        if not name or id(module) in memo:
            continue
        if any(name.startswith(other + ".") for other in _shared_names(memo, layer)):
            continue  # inside a module already shared as a whole
        if _is_linear(module):
            in_features, out_features = _linear_shape(module)
            memo[id(module)] = LowRankLinear(layer, name, in_features, out_features, rank, alpha, device,
                                             seed=1_000_003 * (index + 1) + linear)
            linear += 1
        elif any(True for _ in module.parameters(recurse=False)) or module._buffers:
            if any(True for _ in module.children()) and any(_is_linear(m) for m in module.modules()):
                raise ValueError(f"a low-rank copy of {type(layer).__name__} cannot share {name} "
                                 f"({type(module).__name__}): it holds parameters and linear layers; use full copies")
            memo[id(module)] = SharedModule(layer, name)
    if linear == 0:
        raise ValueError(f"a low-rank copy of {type(layer).__name__} found no linear layer to update; use full copies")
    clone = copy.deepcopy(layer, memo)
    renumber_layer(clone, index, slot)
    clone.train(layer.training)
    leftover = [n for n, _ in clone.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]
    if leftover:  # cannot happen for the layers above; a guard against a second copy of any weight
        raise ValueError(f"a low-rank copy of {type(layer).__name__} would copy {leftover[:5]}; use full copies")
    return clone


def _shared_names(memo: dict[int, nn.Module], layer: nn.Module) -> list[str]:
    return [m.frozen_name for m in memo.values() if isinstance(m, SharedModule)]


def is_low_rank(module: nn.Module) -> bool:
    """Whether `module` (a Control block's trainable branch) is a low-rank copy."""
    return any(isinstance(m, LowRankLinear) for m in module.modules())


@torch.no_grad()
def fold_low_rank(base_layer: nn.Module, expanded_layer: nn.Module, w: float) -> nn.Module:
    """W_p <- W_p + w (alpha / r) B A for every low-rank linear of `expanded_layer` (in place, computed
    in float32 and rounded once to W_p's dtype); returns `base_layer`. The copy shares every other
    weight with `base_layer`, so W_p + w (W_e - W_p) leaves them as they are. `base_layer` must be
    full precision (`ControlModel.dequantize` first)."""
    for module in expanded_layer.modules():
        if not isinstance(module, LowRankLinear):
            continue
        target = base_layer.get_submodule(module.frozen_name)
        if type(target) is not nn.Linear:
            raise TypeError(f"cannot fold a low-rank copy into {module.frozen_name} ({type(target).__name__}): "
                            "dequantise the frozen branch first")
        if w == 0.0:
            continue
        delta = module.delta_weight().to(target.weight.device) * float(w)
        target.weight.copy_((target.weight.float() + delta).to(target.weight.dtype))
    return base_layer


@torch.no_grad()
def dense_state_dict(expanded_layer: nn.Module) -> dict[str, torch.Tensor]:
    """The state a full copy would hold for this low-rank copy, keyed as a full copy's state dict:
    each linear's weight W_p + (alpha / r) B A (W_p dequantised on a quantised base; float32 sum
    rounded once to the layer's compute dtype) and bias, every shared module's own state. For
    consumers that expect full copies (e.g. serving the unmerged model)."""
    from .quantize import dequantized_weight, is_quantized_linear

    state: dict[str, torch.Tensor] = {}
    for name, module in expanded_layer.named_modules():
        if isinstance(module, LowRankLinear):
            frozen = module.frozen
            weight = dequantized_weight(frozen) if is_quantized_linear(frozen) else frozen.weight.detach()
            state[f"{name}.weight"] = (weight.float() + module.delta_weight().to(weight.device)).to(weight.dtype)
            if frozen.bias is not None:
                state[f"{name}.bias"] = frozen.bias.detach().to(weight.dtype).clone()
        elif isinstance(module, SharedModule):
            for key, value in module.frozen.state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
    return state


def factor_names(module: nn.Module) -> list[str]:
    """Names of the B factors in `module` (what the weight-space dial scales)."""
    return [f"{n}.lora_B" for n, m in module.named_modules() if isinstance(m, LowRankLinear)]


__all__ = ["LowRankLinear", "SharedModule", "low_rank_copy", "is_low_rank", "fold_low_rank", "dense_state_dict",
           "factor_names"]


def densify(model) -> int:
    """Replace every low-rank copy of a ControlModel by the full copy it stands for (in place): the
    decoder layer's structure with `dense_state_dict`'s weights, in the copy's own cache slot. For
    consumers built for full copies (serving the unmerged model). Returns how many were replaced."""
    from .block import ControlBlock, copy_layer

    replaced = 0
    for index, block in model.blocks.items():
        if not isinstance(block, ControlBlock) or not is_low_rank(block.expanded_layer):
            continue
        dense = copy_layer(block.base_layer, index, block.slot)
        missing, unexpected = dense.load_state_dict(dense_state_dict(block.expanded_layer), strict=False)
        if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
            raise RuntimeError(f"layer {index}: the dense copy does not match (missing {missing}, unexpected {unexpected})")
        block.expanded_layer = dense
        replaced += 1
    return replaced
