"""Where a causal LM keeps its decoder layers: the one structural fact every part of the library needs,
in a module that imports nothing of the library (so the method's modules import it without a circle)."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, found by structure (`model.model.layers`).

    Raises a ValueError naming the class when the model is not a decoder-only causal LM laid out
    that way.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; Control LLM expands decoder-only causal LMs")
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise ValueError(
            f"{name} is not a causal language model (no output embeddings / LM head); expected e.g. "
            "LlamaForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{name} has no decoder layers at `model.model.layers` (an nn.ModuleList); Control LLM supports "
            "decoder-only causal LMs laid out like Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi3, OLMo2, Granite"
        )
    return layers
