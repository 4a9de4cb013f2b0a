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


def read_run_config(folder: str | os.PathLike) -> dict:
    """The content of `folder/run_config.json` ({} when there is none), with a `CheckpointError` naming
    the file when it is unreadable or not a JSON object."""
    path = os.path.join(os.fspath(folder), "run_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the run record {path}: {err} (the file is damaged; restore it, or pass "
                              "the base model with --base where the command takes one)") from err
    if not isinstance(saved, dict):
        raise CheckpointError(f"the run record {path} holds {type(saved).__name__}, not a JSON object")
    return saved


def run_base(folder: str, base: str | None = None) -> str | None:
    """The base model a run was trained from (`base` overrides it)."""
    if base is not None:
        return base
    return read_run_config(folder).get("model")


# How a run whose record predates recorded fold weights had its base folded: dlerp/dlerp_in layers with
# sigmoid(b), the rule of earlier releases, so it is rebuilt onto the base it was trained on.
LEGACY_FOLD = {"calibration_data": None, "layers": None}


def measure_fold_weights(model, tokenizer, path: str | os.PathLike, calibration_data: str | None = None) -> str | None:
    """Measure the weight each dlerp/dlerp_in layer of `model` (the ControlModel of the run at `path`)
    is folded with, as `controlllm merge` does: the mean per-token weight
    (`ControlModel.measure_merge_weights`) on `calibration_data`, else on the run's eval data, read
    in the run's format (task, seq_len, max_eval_samples). Returns the data used, or None when nothing
    was measured (no dynamic layer, or no data: the fold then uses sigmoid(b)). The rule for every
    fold of a run: `controlllm merge` and a later stage's frozen base (`load_as_base`)."""
    from .errors import UsageError
    from .merge import calibration_batches

    if calibration_data is not None and not os.path.isfile(calibration_data):
        raise UsageError(f"--calibration-data {calibration_data!r} does not exist or is not a file")
    if not any(b.interpolator.dynamic for b in model.control_blocks.values()):
        return None
    run = read_run_config(resolve_run_folder(path)) if path is not None else {}
    data = calibration_data or run.get("eval_data")
    if data is None:
        return None
    if not os.path.isfile(data):
        raise CheckpointError(f"the eval data of the run {os.fspath(path)!r}, {data!r}, on which the weights of its "
                              "dlerp/dlerp_in layers are measured for the fold, does not exist or is not a file; "
                              "restore it (controlllm merge also takes --calibration-data)")
    batches = calibration_batches(data, tokenizer, task=run.get("task", "cpt"), seq_len=run.get("seq_len", 256),
                                  max_sequences=run.get("max_eval_samples", 64))
    model.measure_merge_weights(batches, source=data)
    return data


def fold_record(model, calibration_data: str | None) -> dict:
    """What a fold of `model` (a ControlModel) uses, for a run's record or merge_weights.json:
    {"calibration_data": the data measured on or None, "layers": {layer: {"interpolation", "weight", "source"}}}."""
    return {"calibration_data": calibration_data,
            "layers": {str(i): entry for i, entry in model.merge_weights().items()}}


def _apply_fold_record(model, record: dict, path) -> str | None:
    """Give each dynamic layer of `model` the weight `record` holds for it (LEGACY_FOLD: none, sigmoid(b))."""
    layers = record.get("layers")
    if layers is None:
        return None
    for i, block in model.control_blocks.items():
        if not block.interpolator.dynamic:
            continue
        entry = layers.get(str(i))
        if not isinstance(entry, dict) or not isinstance(entry.get("weight"), (int, float)):
            raise CheckpointError(f"the recorded fold of {os.fspath(path)!r} has no weight for its dlerp/dlerp_in layer "
                                  f"{i} (recorded layers: {sorted(layers)})")
        block.measured_weight = float(entry["weight"])
        block.measured_on = f"{record.get('calibration_data')} (recorded when the later stage was trained)"
    return record.get("calibration_data")


def recorded_base_fold(folder: str | os.PathLike) -> dict | None:
    """How the base of the run in `folder` was folded when the run was trained: the fold record of the
    last stage of its lineage; LEGACY_FOLD for a record that predates it; None when there is no record
    (a base folded now is measured)."""
    saved = read_run_config(folder)
    if not saved:
        return None
    stages = (saved.get("lineage") or {}).get("stages") or []
    if stages and isinstance(stages[-1], dict) and "base_fold" in stages[-1]:
        return stages[-1]["base_fold"]
    return LEGACY_FOLD


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
    # The base of a run may itself be a run (a multi-stage run): it is loaded and folded first, as it
    # was when this run was trained.
    base_model, tokenizer, _ = load_run_base(folder, base, dtype=dtype)
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


def fold_run(path: str | os.PathLike | None = None, dtype=None, fold: dict | None = None):
    """(model, tokenizer, kind, fold record): `load_as_base`, and how a Control delta was folded
    (`fold_record`; None for other kinds).

    With `fold=None` the dlerp/dlerp_in layers of a Control delta are folded with the weights
    `measure_fold_weights` measures on the run's eval data, exactly as `controlllm merge` does
    (sigmoid(b) when the run has none). A record given as `fold` (one returned before, e.g. saved in a
    later stage's lineage; `LEGACY_FOLD`: sigmoid(b)) is used instead, so a later stage is rebuilt onto
    the very base it was trained on.
    """
    model, tokenizer, kind = load_model(path, dtype=dtype)
    record = None
    if kind == "control":
        calibration = measure_fold_weights(model, tokenizer, path) if fold is None else _apply_fold_record(model, fold, path)
        record = fold_record(model, calibration)
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
    return model, tokenizer, kind, record


def load_as_base(path: str | os.PathLike | None = None, dtype=None):
    """(model, tokenizer, kind) with the model a plain transformers model: a model folder or .gguf
    as it is, a finished run folded into plain weights (a Control delta merged with
    `merge_and_unload`, its dlerp/dlerp_in layers with the weights measured on the run's eval data
    as `controlllm merge` does; a LoRA adapter merged; full weights as they are).

    This is how a later stage of a multi-stage run starts from an earlier stage's result: the
    earlier stage's copies are folded into the weights the new stage freezes (`fold_run` also
    returns the fold weights, which the new stage records in its lineage). A Control run trained
    on a quantised base is folded into its dequantised base (a full-precision model of the weights
    it was trained against); a later stage may quantise it again.
    """
    return fold_run(path, dtype=dtype)[:3]


def load_run_base(folder: str | os.PathLike, base: str | None = None, dtype=None):
    """(model, tokenizer, kind): the base the run in `folder` was trained on, rebuilt: its recorded base
    (or `base`), folded with the weights recorded when the run was trained when that base is itself a
    run (`recorded_base_fold`)."""
    return fold_run(run_base(os.fspath(folder), base), dtype=dtype, fold=recorded_base_fold(folder))[:3]


def run_stages(path: str | os.PathLike | None) -> tuple[str | None, list[dict]]:
    """(the original base model, the stages before) of a run that starts from `path`: ([], path)
    for a model folder or None; the run's recorded lineage for a finished run folder."""
    if describe(path) == "base":
        return (None if path is None else os.fspath(path)), []
    saved = read_run_config(resolve_run_folder(path))
    lineage = saved.get("lineage")
    if lineage:
        return lineage["base_model"], list(lineage["stages"])
    # A run written before lineage was recorded: one stage on top of its own base.
    keys = ("output", "method", "task", "data", "max_steps", "lr", "preset")
    return saved.get("model"), [{k: saved.get(k) for k in keys}]
