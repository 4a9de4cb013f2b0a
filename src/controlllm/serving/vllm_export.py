"""Export a Control run (or a plain model) as a folder vLLM serves unmerged with the controlllm plugin.

The folder is a Hugging Face model folder whose `config.json` names the plugin's architecture
(`ControlLlamaForCausalLM`) and carries the Control layer layout under `control_llm`; one
safetensors file holds the frozen base weights under their usual names, each trainable copy under
`model.expanded_layers.<slot>.` and each interpolator under `model.interpolators.<slot>.`, where
`slot` (>= the base model's layer count) is the copy's own layer index, hence its own KV cache.
The tokenizer is saved beside them. Needs only torch and transformers, not vLLM.

    controlllm serve-export --model RUN --output DIR
    vllm serve DIR            # the plugin is found through the `vllm.general_plugins` entry point
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from ..block import ControlBlock, StackBlock
from ..errors import UsageError

ARCHITECTURE = "ControlLlamaForCausalLM"
CONTROL_KEY = "control_llm"  # the config.json entry the plugin reads
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# Model types whose decoder layer is vLLM's LlamaDecoderLayer unchanged (RMSNorm, rotary, SiLU MLP).
SUPPORTED_MODEL_TYPES = ("llama",)


def control_layout(model: nn.Module) -> dict:
    """The `control_llm` entry of the exported config: which layers are expanded, each copy's slot,
    and how the branches are merged. A plain model has no expanded layers."""
    from ..model import ControlModel

    if not isinstance(model, ControlModel):
        return {"format": FORMAT_VERSION, "expanded_layers": [], "slots": [], "interpolation": None,
                "gate_norm": False, "dial": 1.0}
    blocks = model.blocks
    stacked = sorted(i for i, b in blocks.items() if isinstance(b, StackBlock))
    if stacked:
        raise UsageError(f"the vLLM plugin serves concat expansion only; layers {stacked} of this run are stack "
                         f"(expand_type={model.control_config.expand_type!r}): serve its merge instead "
                         "(controlllm merge, then plain `vllm serve`)")
    config = model.control_config
    layers = sorted(blocks)
    assert all(isinstance(blocks[i], ControlBlock) for i in layers)
    return {"format": FORMAT_VERSION, "expanded_layers": layers, "slots": [blocks[i].slot for i in layers],
            "interpolation": config.interpolation, "gate_norm": config.gate_norm, "dial": config.dial}


def serving_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors vLLM loads, named as the plugin's modules: frozen layers under their base names,
    copies under `model.expanded_layers.<slot>.`, interpolators under `model.interpolators.<slot>.`.
    The drift budget's buffers (training state) are left out."""
    from ..model import ControlModel

    if not isinstance(model, ControlModel):
        return {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    layers_prefix = "model.layers."
    renames = {}
    for index, block in model.blocks.items():
        head = f"{layers_prefix}{index}."
        renames[head + "base_layer."] = head
        renames[head + "expanded_layer."] = f"model.expanded_layers.{block.slot}."
        renames[head + "interpolator."] = f"model.interpolators.{block.slot}."
    state = {}
    for name, tensor in model.base_model.state_dict().items():
        if name.endswith((".budget_multiplier", ".running_drift")):
            continue
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        else:
            if any(name.startswith(f"{layers_prefix}{i}.") for i in model.blocks):
                raise AssertionError(f"unexpected tensor {name} in an expanded layer")
        state[name] = tensor.detach().contiguous()
    return state


def _base_config(model: nn.Module):
    from ..model import ControlModel

    base = model.base_model if isinstance(model, ControlModel) else model
    return base, base.config


def export_for_vllm(model: nn.Module, tokenizer, output: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
    """Write the folder `vllm serve` loads with the controlllm plugin, for a `ControlModel` (served
    unmerged: both branches and the interpolation, with the dial) or a plain transformers Llama model
    (served by the same plugin with no expanded layer). `dtype` casts the weights (default: as they
    are). Returns the folder."""
    base, config = _base_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"the vLLM plugin serves Llama-family models (model_type {', '.join(SUPPORTED_MODEL_TYPES)}); "
                         f"this model has model_type={model_type!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UsageError(f"vLLM's Llama layer supports hidden_act='silu' only; this model has {config.hidden_act!r}")
    layout = control_layout(model)
    state = serving_state_dict(model)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings: vLLM ties them again
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    weight_dtype = next(v.dtype for k, v in state.items() if k.endswith("embed_tokens.weight"))
    output = os.fspath(output)
    os.makedirs(output, exist_ok=True)
    save_file({k: v.to("cpu").contiguous() for k, v in state.items()}, os.path.join(output, WEIGHTS_FILE),
              metadata={"format": "pt"})
    payload = config.to_dict()
    payload["architectures"] = [ARCHITECTURE]
    payload[CONTROL_KEY] = layout
    payload["dtype"] = str(weight_dtype).removeprefix("torch.")
    payload.pop("torch_dtype", None)
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return output


def export_run_for_vllm(path: str | os.PathLike, output: str | os.PathLike, base: str | None = None,
                        dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """Open a run (a Control delta, full weights; dialled or not) or a model folder with
    `controlllm.runs.open_run` and export it with `export_for_vllm` through the one output writer
    (`controlllm.runs.Output`: refused before loading when `output` is a file, the run or its base,
    or a non-empty folder without `overwrite`; written into a staging folder and renamed). A run on a
    quantised base is written with its frozen branch dequantised (exact: the weights its copies were
    trained against). Returns what was written (the folder and the layout)."""
    from ..runs import Output, open_run

    run = open_run(path, base=base)
    if run.kind == "lora":
        raise UsageError(f"--model {os.fspath(path)!r} holds a LoRA adapter; vLLM serves LoRA adapters natively "
                         "(vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER), or `controlllm merge` it first; "
                         "this export is for Control runs and plain models")
    out = Output(output, overwrite=overwrite, protect=run.protected)
    model, tokenizer = run.model(dequantize=True)
    layout = control_layout(model)  # refuses what the plugin cannot serve before anything is written
    with out.staging() as folder:
        export_for_vllm(model.eval(), tokenizer, folder, dtype=dtype)
    return {"output": os.fspath(output), "kind": run.kind, "architecture": ARCHITECTURE, CONTROL_KEY: layout}
