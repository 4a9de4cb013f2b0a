"""Export a Control run (or a plain model) as a folder vLLM serves unmerged with the controlllm plugin.

The folder is a Hugging Face model folder whose `config.json` names the plugin's architecture
(`Control` + the base architecture, e.g. `ControlQwen2ForCausalLM`) and carries the Control layer
layout under `control_llm`; one
safetensors file holds the frozen base weights under their usual names, each trainable copy under
`model.expanded_layers.<slot>.` and each interpolator under `model.interpolators.<slot>.`, where
`slot` (>= the base model's layer count) is the copy's own layer index, hence its own KV cache.
The tokenizer is saved beside them. Needs only torch and transformers, not vLLM.

    controlllm serve-export --model RUN --output DIR
    vllm serve DIR            # the plugin is found through the `vllm.general_plugins` entry point
    python -m controlllm.serving.vllm_serve DIR   # the same where the `vllm` script cannot start
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from ..block import ControlBlock, StackBlock
from ..errors import UsageError

ARCHITECTURE = "ControlLlamaForCausalLM"  # the Llama family's served architecture (see `served_architecture`)
ARCHITECTURE_PREFIX = "Control"
CONTROL_KEY = "control_llm"  # the config.json entry the plugin reads
FORMAT_VERSION = 2  # 2 adds `expand_types` (concat/stack per expanded layer) and `base_architecture`
READ_FORMATS = (1, 2)  # what the plugin reads: format 1 folders are concat-only Llama
WEIGHTS_FILE = "model.safetensors"
# transformers architectures whose vLLM model class the plugin extends, each checked token for token
# against transformers in tests/serving (`make test-serving`).
VLLM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Gemma3ForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM",
                      "GraniteForCausalLM")
# Architectures whose vLLM class always reads the output projection from the embeddings (no lm_head).
TIED_ONLY = ("Gemma2ForCausalLM",)


def served_architecture(base_architecture: str) -> str:
    """The architecture name a served folder carries for a base of `base_architecture`
    (e.g. `Qwen2ForCausalLM` -> `ControlQwen2ForCausalLM`), registered by the plugin."""
    return ARCHITECTURE_PREFIX + base_architecture


def base_architecture(model: nn.Module) -> str:
    """The transformers architecture of the model (of a ControlModel: of its base), e.g. `Qwen2ForCausalLM`."""
    base, config = _base_config(model)
    names = getattr(config, "architectures", None) or [type(base).__name__]
    return names[0]


def control_layout(model: nn.Module) -> dict:
    """The `control_llm` entry of the exported config: which layers are expanded, each copy's slot,
    whether it is a concat copy (beside the frozen layer, merged by the interpolation) or a stack copy
    (after it), how the branches are merged, the dial, and the base model's architecture. A plain
    model has no expanded layers."""
    from ..model import ControlModel

    architecture = base_architecture(model)
    if not isinstance(model, ControlModel):
        return {"format": FORMAT_VERSION, "base_architecture": architecture, "expanded_layers": [], "slots": [],
                "expand_types": [], "interpolation": None, "gate_norm": False, "dial": 1.0}
    blocks = model.blocks
    config = model.control_config
    layers = sorted(blocks)
    kinds = []
    for i in layers:
        if isinstance(blocks[i], ControlBlock):
            kinds.append("concat")
        elif isinstance(blocks[i], StackBlock):
            kinds.append("stack")
        else:
            raise UsageError(f"layer {i} of this run is a {type(blocks[i]).__name__}; the vLLM plugin serves "
                             f"ControlBlock (concat) and StackBlock (stack) layers")
    return {"format": FORMAT_VERSION, "base_architecture": architecture, "expanded_layers": layers,
            "slots": [blocks[i].slot for i in layers], "expand_types": kinds,
            "interpolation": config.interpolation if "concat" in kinds else None,
            "gate_norm": bool(config.gate_norm), "dial": float(config.dial)}


def serving_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors vLLM loads, named as the plugin's modules: frozen layers under their base names,
    copies (concat or stack) under `model.expanded_layers.<slot>.`, interpolators (concat only) under
    `model.interpolators.<slot>.`. The drift budget's buffers (training state) are left out."""
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
    unmerged: both branches, concat or stack, with the interpolation and the dial) or a plain
    transformers model (served by the same plugin with no expanded layer), of an architecture in
    `VLLM_ARCHITECTURES`. The folder's architecture is `served_architecture(base)`, e.g.
    `ControlQwen2ForCausalLM`: vLLM's own model class of the family, extended with the copies.
    `dtype` casts the weights (default: as they are). Returns the folder."""
    base, config = _base_config(model)
    architecture = base_architecture(model)
    if architecture not in VLLM_ARCHITECTURES:
        raise UsageError(f"the vLLM plugin serves {', '.join(VLLM_ARCHITECTURES)}; this model is a {architecture} "
                         f"(model_type={getattr(config, 'model_type', None)!r}): merge it (`controlllm merge`) and "
                         "serve the merged folder with plain `vllm serve` if vLLM has the family")
    if architecture in TIED_ONLY and not getattr(config, "tie_word_embeddings", True):
        raise UsageError(f"vLLM's {architecture} uses the input embeddings as the output projection; this model has "
                         "tie_word_embeddings=False (an lm_head of its own), which vLLM would not load: merge it and "
                         "serve it another way")
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
    payload["architectures"] = [served_architecture(architecture)]
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
    if run.kind == "control":
        from ..lowrank import densify

        densify(model)  # low-rank copies are served as the full copies they stand for (W_p + (alpha/r) B A)
    layout = control_layout(model)  # refuses what the plugin cannot serve before anything is written
    with out.staging() as folder:
        export_for_vllm(model.eval(), tokenizer, folder, dtype=dtype)
    architecture = served_architecture(layout["base_architecture"]) if layout.get("base_architecture") else ARCHITECTURE
    return {"output": os.fspath(output), "kind": run.kind, "architecture": architecture, CONTROL_KEY: layout}
