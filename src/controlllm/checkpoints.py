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


def run_quantization(folder: str) -> str | None:
    """The `quantize_base` a run was trained with ('4bit', '8bit' or None), from its run_config.json."""
    run_config = os.path.join(folder, "run_config.json")
    if not os.path.isfile(run_config):
        return None
    try:
        with open(run_config) as f:
            return json.load(f).get("quantize_base")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"cannot read {run_config}: {err}") from err


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
    # The base of a run may itself be a run (a multi-stage run): it is loaded and folded first.
    base_model, tokenizer, _ = load_as_base(run_base(folder, base), dtype=dtype)
    if kind == "control":
        from .model import ControlModel

        model = ControlModel.from_pretrained(base_model, folder)
    else:
        from peft import PeftModel

        quantization = run_quantization(folder)
        if quantization is not None:  # QLoRA: the adapter goes onto the quantised base it was trained on
            from .quantize import quantize_model

            quantize_model(base_model, quantization)
        model = PeftModel.from_pretrained(base_model, folder)
    return model, tokenizer, kind


def load_as_base(path: str | os.PathLike | None = None, dtype=None):
    """(model, tokenizer, kind) with the model a plain transformers model: a model folder or .gguf
    as it is, a finished run folded into plain weights (a Control delta merged with
    `merge_and_unload`, a LoRA adapter merged, full weights as they are).

    This is how a later stage of a multi-stage run starts from an earlier stage's result: the
    earlier stage's copies are folded into the weights the new stage freezes. A Control run trained
    on a quantised base is folded into its dequantised base (a full-precision model of the weights
    it was trained against); a later stage may quantise it again.
    """
    model, tokenizer, kind = load_model(path, dtype=dtype)
    if kind == "control":
        model = model.merge_and_unload(dequantize=True)  # dequantises only a quantised base
    elif kind == "lora":
        if run_quantization(resolve_run_folder(path)) is not None:
            raise CheckpointError(
                f"{os.fspath(path)!r} is a LoRA run on a quantised base (QLoRA): merging it would re-quantise the "
                "adapter into the 4/8-bit weights, so it cannot be the base of a next stage; use it with eval, "
                "generate or dial"
            )
        model = model.merge_and_unload()
    return model, tokenizer, kind


def run_stages(path: str | os.PathLike | None) -> tuple[str | None, list[dict]]:
    """(the original base model, the stages before) of a run that starts from `path`: ([], path)
    for a model folder or None; the run's recorded lineage for a finished run folder."""
    if describe(path) == "base":
        return (None if path is None else os.fspath(path)), []
    config_path = os.path.join(resolve_run_folder(path), "run_config.json")
    with open(config_path) as f:
        saved = json.load(f)
    lineage = saved.get("lineage")
    if lineage:
        return lineage["base_model"], list(lineage["stages"])
    # A run written before lineage was recorded: one stage on top of its own base.
    keys = ("output", "method", "task", "data", "max_steps", "lr", "preset")
    return saved.get("model"), [{k: saved.get(k) for k in keys}]
