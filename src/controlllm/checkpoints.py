"""Load whatever a run produced (Control delta, LoRA adapter, full model) or a plain base model."""

from __future__ import annotations

import json
import os

from .config import CONFIG_NAME
from .errors import CheckpointError


def resolve_run_folder(path: str | os.PathLike) -> str:
    """A run folder's `final/` if it has one, else the folder itself."""
    path = os.fspath(path)
    final = os.path.join(path, "final")
    return final if os.path.isdir(final) else path


def describe(path: str | os.PathLike | None) -> str:
    """Which kind of model `path` holds: 'base' (None, a model folder or .gguf), 'control', 'lora' or 'full'."""
    if path is None or str(path).endswith(".gguf"):
        return "base"
    folder = resolve_run_folder(path)
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return "control"
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return "lora"
    if os.path.isfile(os.path.join(folder, "run_config.json")):
        return "full"
    return "base"


def _is_unfinished_run(folder: str) -> bool:
    """A run folder (run_config.json) with no final/ and no loadable weights: training stopped early."""
    if not os.path.isfile(os.path.join(folder, "run_config.json")) or os.path.isdir(os.path.join(folder, "final")):
        return False
    return not any(os.path.isfile(os.path.join(folder, name))
                   for name in (CONFIG_NAME, "adapter_config.json", "config.json"))


def run_base(folder: str, base: str | None = None) -> str | None:
    """The base model a run was trained from (`base` overrides it)."""
    if base is not None:
        return base
    run_config = os.path.join(folder, "run_config.json")
    if os.path.isfile(run_config):
        try:
            with open(run_config) as f:
                return json.load(f).get("model")
        except (OSError, ValueError, AttributeError) as err:
            raise CheckpointError(f"cannot read {run_config}: {err}; pass the base model with --base") from err
    return None


def load_model(path: str | os.PathLike | None = None, base: str | None = None, dtype=None):
    """(model, tokenizer, kind) for `path`: None (the default base model), a model folder or .gguf,
    or a run folder / its `final/` (Control delta, LoRA adapter, or full weights).

    The base of a delta or adapter is read from the run's run_config.json unless `base` is given.
    """
    import torch

    from .assets import AssetError, load_pretrained

    dtype = dtype or torch.float32
    kind = describe(path)
    if path is not None and not os.path.exists(path):
        raise AssetError(f"model path {os.fspath(path)!r} does not exist")
    if path is not None and _is_unfinished_run(os.fspath(path)):
        raise CheckpointError(f"{os.fspath(path)!r} is a run folder without final/: the run did not finish; use --resume "
                              "with the same --output to complete it")
    if kind == "base":
        model, tokenizer = load_pretrained(path, dtype=dtype)
        return model, tokenizer, kind
    folder = resolve_run_folder(path)
    if kind == "full":
        model, tokenizer = load_pretrained(folder, dtype=dtype)
        return model, tokenizer, kind
    base_model, tokenizer = load_pretrained(run_base(folder, base), dtype=dtype)
    if kind == "control":
        from .model import ControlModel

        model = ControlModel.from_pretrained(base_model, folder)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, folder)
    return model, tokenizer, kind
