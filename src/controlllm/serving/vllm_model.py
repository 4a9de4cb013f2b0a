"""vLLM model of a Control LLM, served unmerged: the frozen Llama layers, a trainable copy beside each
expanded one, and the interpolation h = h_p + s w (h_e - h_p) per layer or per token.

Imported by vLLM (through `controlllm.serving.vllm_plugin`) when a folder written by
`controlllm.serving.vllm_export` is served. Each copy is a vLLM `LlamaDecoderLayer` of its own at
`model.expanded_layers.<slot>`, so its attention has its own layer index (`slot`, past the base
layers) and therefore its own paged KV cache. The interpolators are the library's own modules
(`controlllm.interpolators`), so vLLM computes the merge with the same code as training.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.sequence import IntermediateTensors

from ..interpolators import build_interpolator
from .vllm_export import CONTROL_KEY, FORMAT_VERSION


def _layout(config) -> dict:
    layout = getattr(config, CONTROL_KEY, None)
    if not isinstance(layout, dict) or layout.get("format") != FORMAT_VERSION:
        raise ValueError(f"config.json has no `{CONTROL_KEY}` entry of format {FORMAT_VERSION} (got {layout!r}); "
                         "export the model with `controlllm serve-export`")
    layers, slots = list(layout["expanded_layers"]), list(layout["slots"])
    n = config.num_hidden_layers
    if len(layers) != len(slots) or any(not 0 <= i < n for i in layers) or any(s < n for s in slots) \
            or len(set(slots)) != len(slots):
        raise ValueError(f"`{CONTROL_KEY}` is inconsistent with num_hidden_layers={n}: layers {layers}, slots {slots}")
    if not 0.0 <= float(layout["dial"]) <= 1.0:
        raise ValueError(f"`{CONTROL_KEY}.dial`={layout['dial']!r} must be in [0, 1] (0: the base model, 1: the trained model)")
    return layout


def _copy_config(config, layers: list[int]):
    """The config the copies are built with: per-layer settings (`layer_types`) extended to the
    copies' slots, each copy taking the type of the layer it mirrors."""
    types = getattr(config, "layer_types", None)
    if not types:
        return config
    config = copy.copy(config)
    config.layer_types = list(types) + [types[i] for i in layers]
    return config


class ControlLlamaModel(LlamaModel):
    """vLLM's LlamaModel plus the copies and interpolators of the expanded layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        if get_pp_group().world_size > 1:
            raise ValueError(f"ControlLlamaForCausalLM runs on one pipeline stage; got pipeline_parallel_size="
                             f"{get_pp_group().world_size} (allowed: 1; tensor parallelism is unaffected)")
        config = vllm_config.model_config.hf_config
        layout = _layout(config)
        self.slot_of = dict(zip(layout["expanded_layers"], layout["slots"]))
        self.dial = float(layout["dial"])
        copy_config = _copy_config(config, layout["expanded_layers"])
        # ModuleDicts keyed by slot: the module names model.expanded_layers.<slot>... carry one integer,
        # the slot, which vLLM reads as the attention's layer index when it binds the KV caches.
        self.expanded_layers = nn.ModuleDict({
            str(slot): layer_type(vllm_config=vllm_config, prefix=f"{prefix}.expanded_layers.{slot}", config=copy_config)
            for slot in layout["slots"]
        })
        self.interpolators = nn.ModuleDict({
            str(slot): build_interpolator(layout["interpolation"], config.hidden_size, 0.0, bool(layout["gate_norm"]))
            for slot in layout["slots"]
        })

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None, inputs_embeds: torch.Tensor | None = None,
                **extra_layer_kwargs) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        # vLLM's layers return (sub-block output, residual) and add them in the next norm; None = already added.
        residual = None
        for index, layer in enumerate(self.layers):
            slot = self.slot_of.get(index)
            if slot is None:
                hidden, residual = layer(positions, hidden, residual, **extra_layer_kwargs)
                continue
            x = hidden if residual is None else hidden + residual
            # Each branch gets its own input tensor: the fused residual norm may write into its residual.
            out_p, res_p = layer(positions, x.clone(), None, **extra_layer_kwargs)
            out_e, res_e = self.expanded_layers[str(slot)](positions, x.clone(), None, **extra_layer_kwargs)
            h_p, h_e = res_p + out_p, res_e + out_e  # transformers' order: residual + sub-block output
            hidden, _ = self.interpolators[str(slot)](h_p, h_e, x, self.dial)
            residual = None
        if residual is None:
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class ControlLlamaForCausalLM(LlamaForCausalLM):
    """A Control LLM on a Llama base, served unmerged (architecture name in the exported config.json)."""

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        return ControlLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
