"""The controlllm plugin for vLLM: registers the unmerged Control models with vLLM's registry.

vLLM calls `register()` in every process it starts (entry point group `vllm.general_plugins`,
declared in pyproject.toml). Registration is lazy, by "module:Class" name, so vLLM imports the
model code only when a served folder asks for one of the architectures (`Control<Base>`, one per
family in `controlllm.serving.vllm_export.VLLM_ARCHITECTURES`; see `controlllm.serving.vllm_model`).
"""

from __future__ import annotations

from .vllm_export import VLLM_ARCHITECTURES, served_architecture

MODEL_MODULE = "controlllm.serving.vllm_model"


def register() -> None:
    """Make `Control<Base>` known to vLLM for every base in `VLLM_ARCHITECTURES` (safe to call more
    than once)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for base in VLLM_ARCHITECTURES:
        name = served_architecture(base)
        if name not in supported:
            ModelRegistry.register_model(name, f"{MODEL_MODULE}:{name}")
