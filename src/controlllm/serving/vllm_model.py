"""vLLM models of a Control LLM, served unmerged, on vLLM's own model class of each family.

Imported by vLLM (through `controlllm.serving.vllm_plugin`) when a folder written by
`controlllm.serving.vllm_export` is served. Its architecture is `Control<Base>` (e.g.
`ControlQwen2ForCausalLM`); the class of that name is made here on demand, as a subclass of the
base architecture's vLLM class found through vLLM's model registry, so every family runs vLLM's own
decoder layers, embeddings, norms and weight loading.

Each expanded layer `i` keeps the family's frozen layer at `model.layers.<i>`; its trainable copy is a
second decoder layer of the same class at `model.expanded_layers.<slot>`, so its attention has its own
layer index (`slot`, past the base layers) and therefore its own paged KV cache; a concat layer's
interpolator (the library's own module, `controlllm.interpolators`) is at `model.interpolators.<slot>`.
The frozen layer's class is extended (a subclass made here) so that calling it runs the Control block
of `controlllm.block`:

- concat: h = h_p + s w (h_e - h_p), both branches on the block input (`ControlBlock`);
- stack: the copy runs on the frozen layer's output, h = h_p + s (copy(h_p) - h_p) (`StackBlock`).

The family's model forward runs unchanged.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group

from ..interpolators import build_interpolator
from .vllm_export import ARCHITECTURE_PREFIX, CONTROL_KEY, READ_FORMATS


def _layout(config) -> dict:
    layout = getattr(config, CONTROL_KEY, None)
    if not isinstance(layout, dict) or layout.get("format") not in READ_FORMATS:
        raise ValueError(f"config.json has no `{CONTROL_KEY}` entry of format {' or '.join(map(str, READ_FORMATS))} "
                         f"(got {layout!r}); export the model with `controlllm serve-export`")
    layout = dict(layout)
    layers, slots = list(layout["expanded_layers"]), list(layout["slots"])
    kinds = list(layout.get("expand_types") or ["concat"] * len(layers))  # format 1: concat only
    layout["expand_types"] = kinds
    n = config.num_hidden_layers
    if len(layers) != len(slots) or len(kinds) != len(layers) or any(not 0 <= i < n for i in layers) \
            or any(s < n for s in slots) or len(set(slots)) != len(slots):
        raise ValueError(f"`{CONTROL_KEY}` is inconsistent with num_hidden_layers={n}: layers {layers}, slots {slots}, "
                         f"expand_types {kinds}")
    if any(k not in ("concat", "stack") for k in kinds):
        raise ValueError(f"`{CONTROL_KEY}.expand_types`={kinds!r}: each must be 'concat' or 'stack'")
    if not 0.0 <= float(layout["dial"]) <= 1.0:
        raise ValueError(f"`{CONTROL_KEY}.dial`={layout['dial']!r} must be in [0, 1] (0: the base model, 1: the trained model)")
    return layout


def _copy_config(config, layers: list[int]):
    """The config the copies are built with: per-layer settings (`layer_types`) extended to the
    copies' slots, each copy taking the type of the layer it mirrors (e.g. Gemma-3's sliding or
    full attention and its rotary base)."""
    types = getattr(config, "layer_types", None)
    if not types:
        return config
    config = copy.copy(config)
    config.layer_types = list(types) + [types[i] for i in layers]
    return config


def build_layer_like(layer: nn.Module, vllm_config: VllmConfig, config, prefix: str) -> nn.Module:
    """A new decoder layer of `layer`'s class, built as the family's model builds its own (the
    constructor's arguments read from its signature: `vllm_config`, `config`, `cache_config`,
    `quant_config`, `prefix`), under module name `prefix`, with per-layer settings from `config`."""
    cls = type(layer)
    while getattr(cls, "_control_site_class", False):  # a frozen layer already extended: its family class
        cls = cls.__mro__[2]
    params = inspect.signature(cls.__init__).parameters
    available = {"vllm_config": vllm_config, "config": config, "cache_config": vllm_config.cache_config,
                 "quant_config": vllm_config.quant_config, "prefix": prefix}
    kwargs = {name: value for name, value in available.items() if name in params}
    missing = [name for name, p in params.items() if name != "self" and p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in kwargs]
    if missing or "prefix" not in kwargs:
        raise TypeError(f"cannot build a copy of {cls.__name__}: its constructor asks for {missing or 'no prefix'}")
    return cls(**kwargs)


@dataclass(eq=False)
class ControlSite:
    """What an expanded layer adds to its frozen layer: the copy, the interpolator (concat only),
    the kind ('concat' or 'stack') and the dial."""

    copy: nn.Module
    interpolator: nn.Module | None
    kind: str
    dial: float


def _merged(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """A layer's full output: vLLM layers return (sub-block output, residual), added by the next norm;
    added here in transformers' order (residual + sub-block output)."""
    return hidden if residual is None else residual + hidden


class _ControlSiteLayer:
    """Mixin placed before a family's decoder layer class: calling the layer runs the Control block.

    Two layer conventions: most families' layers take and return `(hidden, residual)`, added by the next
    fused norm (`_residual` True); some (Granite) take and return the full hidden state."""

    _control_site_class = True
    _residual = True

    def forward(self, positions, hidden_states, *args, **kwargs):
        site: ControlSite = self.__dict__["control_site"]
        frozen = super().forward
        if self._residual:
            residual, rest = (args[0], args[1:]) if args else (kwargs.pop("residual", None), ())
            x = _merged(hidden_states, residual)

            def run(layer, inputs):
                return _merged(*layer(positions, inputs, None, *rest, **kwargs))
        else:
            x = hidden_states

            def run(layer, inputs):
                return layer(positions, inputs, *args, **kwargs)

        # Each branch gets its own input tensor: a fused residual norm may write into its residual.
        h_p = run(frozen, x.clone())
        if site.kind == "stack":
            h_e = run(site.copy, h_p.clone())
            h = h_e if site.dial == 1.0 else torch.lerp(h_p, h_e, site.dial)
        else:
            h_e = run(site.copy, x.clone())
            h, _ = site.interpolator(h_p, h_e, x, site.dial)
        if not self._residual:
            return h
        # (0, h): the next layer's fused norm adds them, h + 0 == h exactly, and the model's final
        # norm always gets a residual.
        return torch.zeros_like(h), h


@functools.cache
def _control_site_class(layer_cls: type) -> type:
    residual = "residual" in inspect.signature(layer_cls.forward).parameters
    return type(f"ControlSite{layer_cls.__name__}", (_ControlSiteLayer, layer_cls),
                {"__module__": __name__, "_residual": residual})


def attach_control(model: nn.Module, vllm_config: VllmConfig, prefix: str = "model") -> None:
    """Add the copies and interpolators of the layout in the config to `model` (a family's vLLM
    decoder stack with `layers`), and make each expanded frozen layer run its Control block."""
    if get_pp_group().world_size > 1:
        raise ValueError(f"the Control model runs on one pipeline stage; got pipeline_parallel_size="
                         f"{get_pp_group().world_size} (allowed: 1; tensor parallelism is unaffected)")
    config = vllm_config.model_config.hf_config
    layout = _layout(config)
    layers, slots, kinds = layout["expanded_layers"], layout["slots"], layout["expand_types"]
    copy_config = _copy_config(config, layers)
    # ModuleDicts keyed by slot: the module names model.expanded_layers.<slot>... carry one integer,
    # the slot, which vLLM reads as the attention's layer index when it binds the KV caches.
    model.expanded_layers = nn.ModuleDict({
        str(slot): build_layer_like(model.layers[index], vllm_config, copy_config, f"{prefix}.expanded_layers.{slot}")
        for index, slot in zip(layers, slots)
    })
    model.interpolators = nn.ModuleDict({
        str(slot): build_interpolator(layout["interpolation"], config.hidden_size, 0.0, bool(layout["gate_norm"]))
        for slot, kind in zip(slots, kinds) if kind == "concat"
    })
    for index, slot, kind in zip(layers, slots, kinds):
        frozen = model.layers[index]
        frozen.__class__ = _control_site_class(type(frozen))
        # A plain attribute (not a registered module): the copy's weights stay under expanded_layers only.
        frozen.__dict__["control_site"] = ControlSite(
            model.expanded_layers[str(slot)], model.interpolators[str(slot)] if kind == "concat" else None,
            kind, float(layout["dial"]))


@functools.cache
def control_class(base_architecture: str) -> type[nn.Module]:
    """`Control<base_architecture>`: vLLM's model class for `base_architecture` (from vLLM's model
    registry) with the Control layers of the served folder attached after it is built."""
    from vllm import ModelRegistry

    base_cls = ModelRegistry._try_load_model_cls(base_architecture)
    if base_cls is None:
        raise ValueError(f"vLLM has no model class for architecture {base_architecture!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        base_cls.__init__(self, vllm_config=vllm_config, prefix=prefix)
        if not isinstance(getattr(self, "model", None), nn.Module) or not hasattr(self.model, "layers"):
            raise ValueError(f"{base_cls.__name__} has no `model.layers` decoder stack to attach Control layers to")
        attach_control(self.model, vllm_config, prefix=f"{prefix}.model" if prefix else "model")

    name = ARCHITECTURE_PREFIX + base_architecture
    return type(name, (base_cls,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                    "__doc__": f"A Control LLM on a {base_architecture} base, served unmerged."})


def __getattr__(name: str):
    """`Control<Arch>` classes, made on first use (vLLM's registry imports them by name)."""
    if name.startswith(ARCHITECTURE_PREFIX) and name.endswith("ForCausalLM"):
        return control_class(name[len(ARCHITECTURE_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
