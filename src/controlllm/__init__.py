"""controlllm: Control LLM (Wei et al. 2025) for any transformers causal LM.

Freeze a pretrained model, run trainable copies of some decoder blocks beside the originals,
merge each pair with an interpolator and align them, so the model learns something new and
keeps what it knew.

The public names are imported on first use, so `controlllm --help` answers without loading torch.
"""

from . import quiet  # noqa: F401  (drops bitsandbytes' import-time message; imports no torch)

__version__ = "0.1.0"

_PUBLIC = {
    "ControlConfig": "config",
    "ControlModel": "model",
    "ControlModelOutput": "model",
    "get_control_model": "model",
    "merge_fidelity": "merge",
    "Dial": "dial",
    "open_run": "runs",
    "Run": "runs",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'controlllm' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
