"""Serving a trained model outside this library: GGUF export for llama.cpp / Ollama."""

from .export import DTYPES, SUPPORTED_ARCHITECTURES, ExportError, export_gguf

__all__ = ["DTYPES", "SUPPORTED_ARCHITECTURES", "ExportError", "export_gguf"]
