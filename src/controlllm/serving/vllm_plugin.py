"""The controlllm plugin for vLLM: registers the unmerged Control Llama model with vLLM's registry.

vLLM calls `register()` in every process it starts (entry point group `vllm.general_plugins`,
declared in pyproject.toml). Registration is lazy, by "module:Class" name, so vLLM imports the
model code only when a served folder asks for the architecture (see `controlllm.serving.vllm_export`).
"""

from __future__ import annotations

from .vllm_export import ARCHITECTURE

MODEL_CLASS = "controlllm.serving.vllm_model:ControlLlamaForCausalLM"


def register() -> None:
    """Make `ControlLlamaForCausalLM` known to vLLM (safe to call more than once)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
