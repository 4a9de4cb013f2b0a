"""Serving trained models outside transformers: vLLM (unmerged, exact) and GGUF export."""
