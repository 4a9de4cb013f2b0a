"""Serving trained models outside this library: GGUF export for llama.cpp / Ollama, and the vLLM
plugin that serves a Control run unmerged (`vllm_plugin`, `vllm_export`)."""

from .export import DTYPES, SUPPORTED_ARCHITECTURES, ExportError, export_gguf

__all__ = ["DTYPES", "SUPPORTED_ARCHITECTURES", "ExportError", "export_gguf"]
