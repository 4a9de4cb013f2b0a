"""Runs: the one place that turns a folder into the model it describes, and the one writer of outputs.

A *run folder* is what `controlllm train` writes (`run_config.json`, checkpoints, `metrics.jsonl`
and `final/`), or what `dial` or `merge` wrote. `open_run(path)` reads it and returns a `Run`:

- `run.kind`: 'base' (a model folder, a .gguf file, or None for the default model), 'control' (a
  Control delta: concat, stack or hybrid), 'lora' (a LoRA/QLoRA adapter) or 'full' (full or
  freeze weights);
- `run.model()`: the exact model the folder describes, dialled or not (unmerged: the model `eval`,
  `generate` and `chat` use);
- `run.open_dial(mode)`: a `controlllm.dial.Dial` on the trained stage, at this folder's value;
- `run.base_model()`: the model the run was trained from (an earlier stage folded, as recorded);
- `run.merged()`: the run as a plain transformers model (what `merge`, `export`, `serve-export`
  of a non-Control run and a next stage's frozen base use), folded by the one rule below.

Every command reads runs through this module; none re-derives what a folder is.

**The fold rule.** A Control copy is folded into its frozen layer as W_p + s w (W_e - W_p), where
s is the run's dial and w the layer's weight at s = 1: sigmoid of the interpolation logit for
lerp and slerp, and for dlerp / dlerp_in the mean per-token gate measured on the run's eval data
when training finished (recorded in `run_config.json` under "fold"; sigmoid(b) when the run had
no eval data). The weight is decided once, when the run finishes (or when `merge
--calibration-data` measures it anew, recorded in the merged folder), and only read afterwards:
opening a run never reads training or evaluation data. A later stage records the weights its
base was folded with ("base_fold" in its lineage) and is always rebuilt onto that very base.

**The dial.** A dial value is always relative to the trained stage: s = 1 is the trained run and
s = 0 its base, for every method. A dialled run folder holds the dialled model as its kind saves
itself (a Control delta with s in its config, a LoRA adapter, full weights: any tool that loads
the folder gets the dialled model) and the dial as its record's "dial" entry and as an entry of
the last stage of its lineage, naming the trained run it came from. Dialling a dialled folder
again starts from that trained run, so the new value replaces the old one (it does not compose).

**Outputs.** `Output` is the one writer of output folders and files: every output is checked
before any model loads (not a file where a folder goes, not the source run or its base, not a
non-empty folder unless `overwrite`), written into a staging folder or file beside it, and put in
place by a rename, so a killed command leaves the old output or none, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

from .config import CONFIG_NAME
from .errors import CheckpointError, UsageError

RUN_CONFIG = "run_config.json"
FINAL = "final"
KINDS = ("base", "control", "lora", "full")
# How a run whose record predates recorded fold weights had its base folded: dlerp/dlerp_in layers with
# sigmoid(b), the rule of earlier releases, so it is rebuilt onto the base it was trained on.
LEGACY_FOLD = {"calibration_data": None, "layers": None}


# ------------------------------------------------------------------------------------- writing
def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename, so a reader
    (or a run killed mid-write) sees the old content or the new one, never an empty or half file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def replace_dir(new: str, target: str) -> None:
    """Put the complete folder `new` in place of `target`: the old `target` is renamed aside first and
    deleted only once `new` is in place (a failed rename puts it back), so there is always one."""
    old = target.rstrip(os.sep) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(target):
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if os.path.isdir(old) and not os.path.exists(target):
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


class Output:
    """One output of a command, a folder (`kind='folder'`) or a file (`kind='file'`).

    Created before any model loads, it refuses, each with one line naming `flag` and the path:
    a path under a file; a file where a folder goes or a folder where a file goes; the source run,
    its base or any folder holding them (`protect`); an existing non-empty folder or an existing
    file unless `overwrite`. `with output.staging() as tmp:` yields a staging folder (or file path)
    beside the target; when the block ends without an error the staging is put in place by a
    rename (an existing target is replaced only then), else it is removed.
    """

    def __init__(self, path: str | os.PathLike, *, kind: str = "folder", overwrite: bool = False,
                 protect: tuple | list = (), flag: str = "--output"):
        if kind not in ("folder", "file"):
            raise ValueError(f"Output kind {kind!r}; allowed: 'folder', 'file'")
        self.path = os.fspath(path)
        self.kind = kind
        self.flag = flag
        if not self.path:
            raise UsageError(f"{flag} is empty; give a path")
        real = _real(self.path)
        parent = os.path.dirname(real)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
        if parent and not os.path.isdir(parent):
            raise UsageError(f"{flag} {self.path!r} is under {parent!r}, which is a file, not a folder")
        for source in protect:
            if source is None or str(source).endswith(".gguf") and not os.path.exists(source):
                continue
            if _contains(real, _real(source)):
                what = "is" if real == _real(source) else "holds"
                raise UsageError(f"{flag} {self.path!r} {what} the model this command reads ({os.fspath(source)!r}); "
                                 "writing there would replace it: choose another path")
        if kind == "folder" and os.path.isfile(real):
            raise UsageError(f"{flag} {self.path!r} is a file; give a folder path (new, empty, or with --overwrite)")
        if kind == "file" and os.path.isdir(real):
            raise UsageError(f"{flag} {self.path!r} is a folder; give a file path")
        exists = os.path.isfile(real) if kind == "file" else (os.path.isdir(real) and bool(os.listdir(real)))
        if exists and not overwrite:
            what = "file exists" if kind == "file" else "folder is not empty"
            raise UsageError(f"{flag} {self.path!r}: the {what}; pass --overwrite to replace it, or choose a new path")

    @contextmanager
    def staging(self):
        """Yield the staging path; put it in place when the block succeeds, remove it otherwise."""
        target = os.path.abspath(self.path)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        name = os.path.basename(target.rstrip(os.sep))
        if self.kind == "folder":
            tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.staging-")
            try:
                yield tmp
                replace_dir(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            stem, ext = os.path.splitext(name)  # the staging file keeps the extension writers check
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{stem}.", suffix=f".tmp{ext}")
            os.close(fd)
            try:
                yield tmp
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

    def write_text(self, text: str) -> str:
        """Write a text file output in one step; returns its path."""
        with self.staging() as tmp:
            with open(tmp, "w") as f:
                f.write(text)
        return self.path


# ------------------------------------------------------------------------------------- reading
def resolve_run_folder(path: str | os.PathLike) -> str:
    """A run folder's `final/` if it has one, else the folder itself."""
    path = os.fspath(path)
    final = os.path.join(path, FINAL)
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
    if os.path.isfile(os.path.join(folder, RUN_CONFIG)):
        return "full"
    return "base"


def read_run_config(folder: str | os.PathLike) -> dict:
    """The content of `folder/run_config.json` ({} when there is none), with a `CheckpointError` naming
    the file when it is unreadable or not a JSON object."""
    path = os.path.join(os.fspath(folder), RUN_CONFIG)
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


def _is_unfinished_run(folder: str) -> bool:
    """A run folder (run_config.json) with no final/ and no loadable weights: training stopped early."""
    if not os.path.isfile(os.path.join(folder, RUN_CONFIG)) or os.path.isdir(os.path.join(folder, FINAL)):
        return False
    return not any(os.path.isfile(os.path.join(folder, name))
                   for name in (CONFIG_NAME, "adapter_config.json", "config.json"))


def fold_record(model, calibration_data: str | None = None) -> dict:
    """How `model` (a ControlModel) is folded now, for a record: {"calibration_data", "dial", "layers":
    {layer: {"interpolation", "weight" (the absolute weight folded with), "weight_at_1", "source"}}}."""
    layers = {}
    for i, entry in model.merge_weights().items():
        block = model.control_blocks[i]
        at_1 = block.measured_weight if block.interpolator.dynamic and block.measured_weight is not None \
            else block.interpolator.nominal_weight()
        layers[str(i)] = {**entry, "weight_at_1": at_1}
    return {"calibration_data": calibration_data, "dial": model.dial, "layers": layers}


def apply_fold(model, record: dict | None, what: str) -> None:
    """Give each dynamic (dlerp / dlerp_in) layer of `model` the fold weight `record` holds.

    A record written by this release ("weight_at_1") sets the weight at s = 1, folded at the
    model's dial as s times it; an earlier release's record ("weight" only, a later stage's
    lineage) sets the absolute weight verbatim; `LEGACY_FOLD` or None leaves sigmoid(b)."""
    layers = (record or {}).get("layers")
    if layers is None:
        return
    for i, block in model.control_blocks.items():
        if not block.interpolator.dynamic:
            continue
        entry = layers.get(str(i))
        if not isinstance(entry, dict) or not isinstance(entry.get("weight_at_1", entry.get("weight")), (int, float)):
            raise CheckpointError(f"the recorded fold of {what} has no weight for its dlerp/dlerp_in layer {i} "
                                  f"(recorded layers: {sorted(layers)})")
        source = record.get("calibration_data")
        if "weight_at_1" in entry:
            block.measured_weight = float(entry["weight_at_1"])
            block.measured_on = f"{source} (recorded when the run finished)" if source else "the run's record"
            block.fold_weight = None
        else:
            block.fold_weight = float(entry["weight"])
            block.measured_on = f"{source} (recorded when the later stage was trained)"


def _load_pretrained(path, dtype):
    from .assets import AssetError, load_pretrained

    if path is not None and not os.path.exists(path):
        raise AssetError(f"model path {os.fspath(path)!r} does not exist; give a local model folder (config.json and "
                         "weights), a .gguf file, or a run folder (models are not downloaded from a hub)")
    return load_pretrained(path, dtype=dtype)


@dataclass
class Run:
    """A run folder (or model folder) opened: see the module's docstring. Models are loaded on
    request, each call a fresh copy."""

    path: str | None
    kind: str
    folder: str | None = None  # where the weights are (the run's final/, or the folder itself)
    record: dict = field(default_factory=dict)
    base: str | None = None  # the base given instead of the recorded one
    dtype: object = None
    last_fold: dict | None = None  # how merged() last folded a Control run (`fold_record`)

    # ---------------------------------------------------------------- what the run says of itself
    @property
    def base_path(self) -> str | None:
        """The model this run was trained from: a model folder, or an earlier stage's run folder."""
        return self.base if self.base is not None else self.record.get("model")

    @property
    def lineage(self) -> dict:
        """{"base_model": the original base, "stages": [...]}: every stage in order, this one last (a
        base model: no stages)."""
        if self.kind == "base":
            return {"base_model": self.path, "stages": []}
        lineage = self.record.get("lineage")
        if lineage:
            lineage = {"base_model": lineage["base_model"], "stages": list(lineage["stages"])}
        else:  # a run written before lineage was recorded: one stage on top of its own base
            keys = ("output", "method", "task", "data", "max_steps", "lr", "preset")
            lineage = {"base_model": self.record.get("model"), "stages": [{k: self.record.get(k) for k in keys}]}
        dial = self.dial_record
        if dial and lineage["stages"]:  # the dial is part of what this stage is
            lineage["stages"][-1] = {**lineage["stages"][-1],
                                     "dial": {"value": dial.get("value"), "mode": dial.get("mode"), "folder": self.path}}
        return lineage

    @property
    def base_fold(self) -> dict | None:
        """How this run's base was folded when it was trained (its lineage's last stage); LEGACY_FOLD
        for a record that predates it."""
        stages = (self.record.get("lineage") or {}).get("stages") or []
        if stages and isinstance(stages[-1], dict) and "base_fold" in stages[-1]:
            return stages[-1]["base_fold"]
        return LEGACY_FOLD

    @property
    def quantization(self) -> str | None:
        """'4bit' / '8bit' when the run's frozen base is quantised, else None."""
        return self.record.get("quantize_base")

    @property
    def dial_record(self) -> dict | None:
        """The record's dial entry (a dialled run), or None."""
        return self.record.get("dial")

    @property
    def protected(self) -> list[str]:
        """Paths an output of a command reading this run must never replace: the run, its weights and
        every model of its lineage."""
        paths = [self.path, self.folder, self.base_path, self.lineage.get("base_model")]
        paths += [s.get("output") for s in self.lineage["stages"][:-1] if isinstance(s, dict)]
        return [p for p in paths if p]

    # ---------------------------------------------------------------- models
    def base_model(self, dtype=None):
        """(model, tokenizer): the plain model this run was trained from; an earlier stage folded with
        the weights recorded when this run was trained."""
        dtype = dtype or self.dtype
        path = self.base_path
        if describe(path) == "base":
            return _load_pretrained(path, dtype)
        earlier = open_run(path, dtype=dtype)
        return earlier.merged(fold=self.base_fold)

    def model(self, dequantize: bool = False, base_model=None):
        """(model, tokenizer): the exact model this folder describes, in evaluation mode (a dialled
        folder: the dialled model). `dequantize=True` gives a run on a quantised base
        its dequantised frozen branch (exact: what the copies were trained against). `base_model`:
        the run's base already loaded by the caller (e.g. lm-evaluation-harness with its own dtype);
        only for a run of one stage, whose base is a plain model folder (tokenizer then None)."""
        import torch

        dtype = self.dtype or torch.float32
        if self.kind == "base":
            model, tokenizer = _load_pretrained(self.path, dtype)
            return model.eval(), tokenizer
        if self.kind == "full":
            model, tokenizer = _load_pretrained(self.folder, dtype)
            return model.eval(), tokenizer
        if base_model is None:
            base_model, tokenizer = self.base_model(dtype)
        elif describe(self.base_path) != "base":
            raise UsageError(f"{self.path!r} is a later stage: its base is an earlier stage folded into plain weights, "
                             "which the caller cannot load as a model folder; open the run without a base model")
        else:
            tokenizer = None
        if self.kind == "control":
            from .model import ControlModel

            model = ControlModel.from_pretrained(base_model, self.folder)
            apply_fold(model, self.record.get("fold"), repr(self.path))
            if dequantize:
                model.dequantize()
        else:
            from peft import PeftModel

            if self.quantization is not None:  # QLoRA: the adapter goes onto the quantised base it was trained on
                from .quantize import dequantize_model, quantize_model

                quantize_model(base_model, self.quantization)
                if dequantize:  # the weights the adapter was trained against, in full precision
                    dequantize_model(base_model)
            model = PeftModel.from_pretrained(base_model, self.folder)
        return model.eval(), tokenizer

    def open_dial(self, mode: str = "output"):
        """(Dial, tokenizer): the trained stage's model under a dial in `mode`, set to this folder's
        value (1 for a trained run). A dialled folder is dialled again from the trained run it came
        from (its record's dial "source"), so a value is always relative to the trained stage; a
        Control delta dialled by its interpolation weights needs no source (its copies are the
        trained ones)."""
        from .dial import Dial

        if self.kind == "base":
            raise UsageError(f"--model {self.path!r} is a base model, not a trained run: there is nothing to dial")
        recorded = self.dial_record or {}
        output_only = self.kind == "control" and recorded.get("mode", "output") == "output" and mode == "output"
        if recorded and not output_only:
            source = recorded.get("source")
            if source is None or not os.path.exists(source):
                raise UsageError(f"{self.path!r} was dialled from the trained run {source!r}, which is not there: a dial "
                                 "value is relative to the trained stage, so dialling again needs it (restore it, or "
                                 "train a new stage on this folder with --model)")
            source_run = open_run(source, base=self.base, dtype=self.dtype)
            if source_run.dial_record:  # a chain written by an earlier release: follow it to the trained run
                return source_run.open_dial(mode)
            dial, tokenizer = source_run.open_dial(mode)
            if recorded.get("mode", "output") == mode:
                dial.set(float(recorded["value"]))
            return dial, tokenizer
        model, tokenizer = self.model()
        if self.kind == "control" and model.dial != 1.0 and mode == "weights":
            raise UsageError(f"{self.path!r} holds a Control delta dialled by its interpolation weights "
                             f"(s = {model.dial:g}); dial it with mode 'output'")
        start = self.base_model()[0] if self.kind == "full" else None
        dial = Dial(model, base=start, mode=mode)  # starts at the model's own value (a Control delta's config.dial)
        return dial, tokenizer

    def merged(self, fold: dict | None = None, dtype=None):
        """(plain model, tokenizer): the run as an ordinary transformers model of its base's class.

        Control: every copy folded by the fold rule (the module's docstring) at the run's dial, on a
        dequantised base when it was quantised; `fold` (a later stage's recorded base_fold) replaces
        the run's own record. LoRA / QLoRA: the adapter merged into the (dequantised) base. Full: the
        weights. Base: the model."""
        if dtype is not None:
            self.dtype = dtype
        model, tokenizer = self.model(dequantize=True)
        self.last_fold = None
        if self.kind == "control":
            if fold is not None:
                apply_fold(model, fold, repr(self.path))
            self.last_fold = fold_record(model, (fold or self.record.get("fold") or {}).get("calibration_data"))
            model = model.merge_and_unload(dequantize=True)
        elif self.kind == "lora":
            model = model.merge_and_unload()
        return model.eval(), tokenizer

    def reference(self):
        """What `kl:` evaluation compares this run's model with: the base it was trained on
        ('base' for a Control model, whose blocks can be turned off; a callable for LoRA; the base
        model for full weights). None for a base model."""
        if self.kind == "control":
            return "base"
        if self.kind == "full":
            return self.base_model()[0].eval()
        return None


def open_run(path: str | os.PathLike | None = None, base: str | None = None, dtype=None) -> Run:
    """Open a run folder (or its final/), a dialled or merged folder, a model folder or a .gguf file
    (None: the default model); nothing is loaded until a model is asked for. `base` replaces the
    recorded base model of a delta or adapter."""
    if path is not None:
        path = os.fspath(path)
        if not os.path.exists(path):
            from .assets import AssetError

            raise AssetError(f"model path {path!r} does not exist; give a run folder, a model folder (config.json and "
                             "weights) or a .gguf file (models are not downloaded from a hub)")
        if _is_unfinished_run(path):
            raise CheckpointError(f"{path!r} is a run folder without final/: the run did not finish; use --resume "
                                  "with the same --output to complete it")
    kind = describe(path)
    if kind == "base":
        return Run(path=path, kind=kind, dtype=dtype)
    folder = resolve_run_folder(path)
    record = read_run_config(folder) or read_run_config(path)
    return Run(path=path, kind=kind, folder=folder, record=record, base=base, dtype=dtype)


def load_model(path: str | os.PathLike | None = None, base: str | None = None, dtype=None):
    """(model, tokenizer, kind): `open_run(path).model()` in one call."""
    run = open_run(path, base=base, dtype=dtype)
    model, tokenizer = run.model()
    return model, tokenizer, run.kind


def load_as_base(path: str | os.PathLike | None = None, dtype=None):
    """(plain model, tokenizer, kind): `open_run(path).merged()`, the model a next stage freezes."""
    run = open_run(path, dtype=dtype)
    model, tokenizer = run.merged()
    return model, tokenizer, run.kind


__all__ = ["FINAL", "KINDS", "LEGACY_FOLD", "Output", "RUN_CONFIG", "Run", "apply_fold", "describe", "fold_record",
           "load_as_base", "load_model", "open_run", "read_run_config", "replace_dir", "resolve_run_folder",
           "write_text_atomic"]
