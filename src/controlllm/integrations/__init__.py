"""Integrations with other training libraries (optional dependencies, imported on demand)."""
