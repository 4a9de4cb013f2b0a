"""The retention dial: turn a trained model back toward its base after training, to a forgetting budget.

Every method has a dial s in [0, 1], with s = 0 the base model and s = 1 the trained model, both
bit for bit, so s = 0 is always a rollback and nothing needs retraining:

- Control (concat): every interpolation weight is used as s * w (per-token gates scaled per
  token), `ControlModel.set_dial` (mode "output", saved in the delta's config); or the copies'
  weights are interpolated toward their frozen originals, W_p + s (W_e - W_p) (mode "weights",
  the merged form's dial).
- stack (LLaMA-Pro): s times each copy's contribution ("output"), or the copies' weights
  interpolated toward their identity initialisation ("weights").
- full fine-tuning and freeze: WiSE-FT (Wortsman et al. 2022), theta_0 + s (theta - theta_0).
- LoRA: the adapter's update B A scaled by s (B scaled).

`Dial` sets a value in place (any value, any number of times); `dial_curve` scores a grid of
values on the new skill's data (the gain: its loss drop from the base) and on the data to keep
(KL to the base, and its loss increase); `choose` picks the value that gains most within a
forgetting budget. `controlllm dial` runs the three and writes the dialled model as a run folder.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .block import ControlBlock, StackBlock, make_identity
from .errors import UsageError, UserError
from .model import ControlModel

MODES = ("output", "weights")
# The default grid: s = 0 (the base, always within any budget) to 1 (the trained model).
DEFAULT_VALUES = tuple(round(0.1 * i, 1) for i in range(11))
LN2 = math.log(2.0)


class DialBudgetError(UserError, ValueError):
    """No dial value above 0 keeps the forgetting within the budget; the message names the closest."""


def _check_value(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise UsageError(f"dial value {value!r} is not allowed; use a number in [0, 1] (0: the base model, "
                         "1: the trained model)")
    return float(value)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class Dial:
    """A dial on a trained model, turned in place: `Dial(model, base=...).set(s)`.

    `model` is a `ControlModel`, a PEFT LoRA model, or a plain model trained in full (or in part,
    `freeze`); a plain model needs `base`: the model it was trained from (a module with the same
    parameter names, or its `named_parameters()` as a dict), whose weights are copied once.
    `mode` applies to Control models: "output" (scale the interpolation weights) or "weights"
    (interpolate the copies' weights toward their starting point). A new Dial starts at s = 1 (the
    model as given); `set` any value later, including 1 again, bit for bit.
    """

    def __init__(self, model: nn.Module, base: nn.Module | dict | None = None, mode: str = "output"):
        if mode not in MODES:
            raise UsageError(f"dial mode {mode!r} is not supported; allowed: {', '.join(map(repr, MODES))}")
        self.model = model
        self.mode = mode
        self.value = 1.0
        self._start: dict[str, torch.Tensor] = {}  # the s = 0 end, for parameters moved by weights
        self._trained: dict[str, torch.Tensor] = {}  # the s = 1 end
        self._params: dict[str, nn.Parameter] = {}
        if isinstance(model, ControlModel):
            self.kind = "control"
            if mode == "weights":
                self._control_weight_ends(model)
            elif model.dial != 1.0:
                self.value = model.dial
        elif _is_peft(model):
            self.kind = "lora"
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    self._params[name] = p
                    self._trained[name] = p.detach().clone()
            if not self._params:
                raise UsageError(f"{type(model).__name__} has no LoRA B matrices to scale; only LoRA adapters can be dialled")
        else:
            self.kind = "weights"
            if base is None:
                raise UsageError("dialling a model trained in full (WiSE-FT) needs its base model: pass base=")
            start = dict(base.named_parameters()) if isinstance(base, nn.Module) else dict(base)
            own = dict(model.named_parameters())
            if set(own) != set(start) or any(own[k].shape != start[k].shape for k in own):
                wrong = sorted(set(own) ^ set(start)) or [k for k in own if own[k].shape != start[k].shape]
                raise UsageError(f"the base model given to the dial does not match the trained model: {wrong[:5]}")
            for name, p in own.items():
                s0 = start[name].detach().to(p.device, p.dtype)
                if not torch.equal(s0, p.detach()):  # parameters training left alone stay as they are
                    self._params[name] = p
                    self._start[name] = s0.clone()
                    self._trained[name] = p.detach().clone()

    def _control_weight_ends(self, model: ControlModel) -> None:
        for index, block in model.blocks.items():
            if isinstance(block, StackBlock):
                start = dict(make_identity(copy.deepcopy(block.base_layer), type(block.base_layer).__name__)
                             .named_parameters())
            elif model.quantization is not None:  # the copies started from the dequantised weights
                from .quantize import dequantized_copy

                start = dict(dequantized_copy(block.base_layer).named_parameters())
            else:
                start = dict(block.base_layer.named_parameters())
            for name, p in block.expanded_layer.named_parameters():
                key = f"{index}.{name}"
                self._params[key] = p
                self._start[key] = start[name].detach().to(p.device, p.dtype).clone()
                self._trained[key] = p.detach().clone()

    @torch.no_grad()
    def set(self, value: float) -> nn.Module:
        """Turn the dial to `value` in [0, 1], in place; returns the model."""
        value = _check_value(value)
        if self.kind == "control" and self.mode == "output":
            self.model.set_dial(value)
        elif self.kind == "lora":
            for name, p in self._params.items():
                p.copy_(self._trained[name] if value == 1.0 else self._trained[name] * value)
        else:  # torch.lerp is exact at both ends: the start at 0, the trained weights at 1
            for name, p in self._params.items():
                p.copy_(torch.lerp(self._start[name], self._trained[name], value))
        self.value = value
        return self.model

    def describe(self) -> dict:
        """What this dial turns, in words (for records and model cards)."""
        what = {
            ("control", "output"): "every interpolation weight scaled: w' = s w (stack copies: s x their contribution)",
            ("control", "weights"): "the copies' weights interpolated toward their starting point: W_0 + s (W - W_0)",
            ("lora", "output"): "the LoRA update scaled: s B A",
            ("lora", "weights"): "the LoRA update scaled: s B A",
            ("weights", "output"): "WiSE-FT: theta_0 + s (theta - theta_0)",
            ("weights", "weights"): "WiSE-FT: theta_0 + s (theta - theta_0)",
        }[(self.kind, self.mode)]
        return {"kind": self.kind, "mode": self.mode, "value": self.value, "what": what}


# ---------------------------------------------------------------------------------- scoring
@dataclass
class DialPoint:
    """One dial value scored: the new skill's loss (`learn_*`), the kept data's loss (`keep_*`) and
    KL(base || dialled) on the kept data, per token in nats; bits/char where characters are known.
    `gain` is the new skill's bits/char drop from the base (s = 0), `keep_increase` the kept data's
    bits/char increase."""

    value: float
    learn_nll: float
    learn_bpc: float
    keep_nll: float
    keep_bpc: float
    kl: float
    gain: float = 0.0
    keep_increase: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _token_windows(tokenizer, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    from .evaluation import _windows

    texts = [t for t in texts if t]
    if not texts:
        raise UsageError("the dial needs at least one non-empty text in each of the learn and keep data")
    return sorted(_windows(tokenizer, texts, seq_len), key=len, reverse=True)


def _batches(tokenizer, windows: list[list[int]], batch_size: int, device):
    from .evaluation import _pad_id, _right_pad

    for start in range(0, len(windows), batch_size):
        chunk = windows[start: start + batch_size]
        ids, mask = _right_pad([w[:-1] for w in chunk], _pad_id(tokenizer), device)
        targets = torch.full(ids.shape, -100, dtype=torch.long, device=device)
        for row, w in enumerate(chunk):
            targets[row, : len(w) - 1] = torch.tensor(w[1:], device=device)
        yield ids, mask, targets


def _log_probs(model, ids, mask) -> torch.Tensor:
    from .evaluation import _logits

    return _logits(model, ids, mask).float().log_softmax(-1)


def dial_curve(dial: Dial, tokenizer, learn_texts: Sequence[str], keep_texts: Sequence[str],
               values: Sequence[float] = DEFAULT_VALUES, seq_len: int = 256, batch_size: int = 8,
               progress: bool = True) -> list[DialPoint]:
    """Score every dial value in `values` (s = 0 is always added: it is the base, the reference).

    The learn texts give the new skill's loss; the keep texts the loss and KL(base || dialled),
    the base's distributions computed once per batch at s = 0 and compared with every value.
    Texts are cut into windows of `seq_len` predicted tokens, each token predicted once. The dial
    is left where it was. Returns the points sorted by value.
    """
    from tqdm.auto import tqdm

    from .evaluation import _device_of, _inference

    values = sorted({0.0, *(_check_value(v) for v in values)})
    learn = _token_windows(tokenizer, learn_texts, seq_len)
    keep = _token_windows(tokenizer, keep_texts, seq_len)
    chars = {"learn": sum(len(t) for t in learn_texts if t), "keep": sum(len(t) for t in keep_texts if t)}
    model = dial.model
    device = _device_of(model)
    sums = {v: {"learn": 0.0, "keep": 0.0, "kl": 0.0} for v in values}
    counts = {"learn": 0, "keep": 0}
    steps = len(values) * (math.ceil(len(learn) / batch_size) + math.ceil(len(keep) / batch_size))
    previous = dial.value
    try:
        with _inference(model), tqdm(total=steps, desc="dial", disable=not progress) as bar:
            for ids, mask, targets in _batches(tokenizer, keep, batch_size, device):
                dial.set(0.0)
                base = _log_probs(model, ids, mask)
                real = targets != -100
                counts["keep"] += int(real.sum())
                for v in values:
                    log_q = base if v == 0.0 else _log_probs(dial.set(v), ids, mask)
                    sums[v]["keep"] += float(F.nll_loss(log_q[real], targets[real], reduction="sum"))
                    if v != 0.0:
                        sums[v]["kl"] += float((base.exp() * (base - log_q)).sum(-1)[real].sum())
                    bar.update(1)
            for v in values:
                dial.set(v)
                for ids, mask, targets in _batches(tokenizer, learn, batch_size, device):
                    real = targets != -100
                    if v == values[0]:
                        counts["learn"] += int(real.sum())
                    sums[v]["learn"] += float(F.nll_loss(_log_probs(model, ids, mask)[real], targets[real], reduction="sum"))
                    bar.update(1)
    finally:
        dial.set(previous)
    points = []
    for v in values:
        s = sums[v]
        points.append(DialPoint(value=v, learn_nll=s["learn"] / counts["learn"],
                                learn_bpc=s["learn"] / LN2 / chars["learn"], keep_nll=s["keep"] / counts["keep"],
                                keep_bpc=s["keep"] / LN2 / chars["keep"], kl=s["kl"] / counts["keep"]))
    base = points[0]
    for p in points:
        p.gain = base.learn_bpc - p.learn_bpc
        p.keep_increase = p.keep_bpc - base.keep_bpc
    return points


def _forgetting(point: DialPoint, max_kl: float | None, max_keep_increase: float | None) -> bool:
    ok = True
    if max_kl is not None:
        ok &= point.kl <= max_kl
    if max_keep_increase is not None:
        ok &= point.keep_increase <= max_keep_increase
    return ok


def _check_budget(max_kl, max_keep_increase) -> None:
    if max_kl is None and max_keep_increase is None:
        raise UsageError("give a forgetting budget: max_kl (KL to the base on the keep data, nats/token) or "
                         "max_keep_increase (the keep data's bits/char increase)")
    for name, value in (("max_kl", max_kl), ("max_keep_increase", max_keep_increase)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise UsageError(f"{name}={value!r} is not allowed; use a finite number >= 0")


def choose(points: Sequence[DialPoint], max_kl: float | None = None,
           max_keep_increase: float | None = None) -> DialPoint:
    """The point with the largest gain among those within the budget (ties: the smaller value).

    s = 0 (the base) is always within a budget; when it is the only one, or no point within the
    budget gains anything, a `DialBudgetError` names the closest point outside it.
    """
    _check_budget(max_kl, max_keep_increase)
    within = [p for p in points if _forgetting(p, max_kl, max_keep_increase)]
    best = max(within, key=lambda p: (p.gain, -p.value), default=None)
    if best is None or best.value == 0.0 or best.gain <= 0:
        outside = [p for p in points if p.value > 0 and not _forgetting(p, max_kl, max_keep_increase)]
        budget = " and ".join(f"{n} {v:g}" for n, v in (("KL", max_kl), ("keep bits/char increase", max_keep_increase))
                              if v is not None)
        closest = min(outside, key=lambda p: p.value, default=None)
        near = (f"; the closest is s = {closest.value:g} with KL {closest.kl:.4g} and keep increase "
                f"{closest.keep_increase:+.4g} (gain {closest.gain:+.4g})") if closest else ""
        raise DialBudgetError(f"no dial value above 0 gains anything within {budget}{near}. Loosen the budget, try "
                              "smaller values (--values), or roll back to the base with --value 0")
    return best


def search(dial: Dial, tokenizer, learn_texts: Sequence[str], keep_texts: Sequence[str],
           max_kl: float | None = None, max_keep_increase: float | None = None,
           values: Sequence[float] = DEFAULT_VALUES, refine: int = 3, **kwargs) -> tuple[DialPoint, list[DialPoint]]:
    """`dial_curve` on `values`, then `refine` bisections between the chosen value and the next
    larger one outside the budget; returns (the chosen point, every point scored, by value).
    The dial is left at the chosen value."""
    _check_budget(max_kl, max_keep_increase)
    points = dial_curve(dial, tokenizer, learn_texts, keep_texts, values, **kwargs)
    for _ in range(max(0, refine)):
        try:
            best = choose(points, max_kl, max_keep_increase)
        except DialBudgetError:
            best = points[0]
        above = [p for p in points if p.value > best.value]
        if not above or _forgetting(above[0], max_kl, max_keep_increase):
            break
        middle = round((best.value + above[0].value) / 2, 6)
        if middle in {p.value for p in points}:
            break
        new = dial_curve(dial, tokenizer, learn_texts, keep_texts, [middle], **kwargs)
        points = sorted([*points, new[1]], key=lambda p: p.value)
    best = choose(points, max_kl, max_keep_increase)
    dial.set(best.value)
    return best, points


__all__ = ["DEFAULT_VALUES", "Dial", "DialBudgetError", "DialPoint", "choose", "dial_curve", "search"]


# ------------------------------------------------------------------------------- run folders
DIAL_RECORD = "dial.json"
DIAL_TABLE = "dial.md"
DIAL_PLOT = "dial.png"


def read_eval_texts(path: str | os.PathLike, tokenizer, limit: int | None = None) -> list[str]:
    """Texts to score from a file: plain text (paragraphs), .jsonl with "text", or chats (.jsonl with
    "messages" or "prompt"/"response", rendered with the tokenizer's chat template)."""
    import json

    from .training.data import DataError, read_chat_records
    from .evaluation import load_texts

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path!r} does not exist or is not a file")
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            first = next((json.loads(line) for line in f if line.strip()), {})
        if isinstance(first, dict) and "text" not in first:
            chats = read_chat_records(path)
            texts = [tokenizer.apply_chat_template(c, tokenize=False) if getattr(tokenizer, "chat_template", None)
                     else "\n".join(m["content"] for m in c) for c in chats]
            return texts[:limit] if limit is not None else texts
    return load_texts(path, limit)


def load_dial(path: str | os.PathLike, base: str | None = None, mode: str = "output") -> tuple[Dial, Any, str]:
    """(a Dial on the trained model of run `path`, its tokenizer, the run's kind). The base of a
    full / freeze run (its `model`, or `base`) is loaded to be the dial's s = 0 end."""
    from .checkpoints import load_as_base, load_model, resolve_run_folder, run_base

    model, tokenizer, kind = load_model(path, base=base)
    if kind == "base":
        raise UsageError(f"--model {os.fspath(path)!r} is a base model, not a trained run: there is nothing to dial")
    model.eval()
    start = None
    if kind == "full":
        start, _, _ = load_as_base(run_base(resolve_run_folder(path), base))
    return Dial(model, base=start, mode=mode), tokenizer, kind


def _run_config(path: str | os.PathLike) -> dict:
    import json

    from .checkpoints import resolve_run_folder
    from .errors import CheckpointError

    for folder in (resolve_run_folder(path), os.fspath(path)):
        candidate = os.path.join(folder, "run_config.json")
        if os.path.isfile(candidate):
            try:
                with open(candidate) as f:
                    return json.load(f)
            except ValueError as err:
                raise CheckpointError(f"cannot read {candidate}: {err}") from err
    return {}


def _table(points: list[DialPoint], chosen: float | None) -> list[str]:
    lines = ["| s | gain (bits/char) | KL to base | keep bits/char change | learn bits/char | keep bits/char |",
             "|---|---|---|---|---|---|"]
    for p in points:
        mark = " **(chosen)**" if chosen is not None and p.value == chosen else ""
        lines.append(f"| {p.value:g}{mark} | {p.gain:+.4f} | {p.kl:.4f} | {p.keep_increase:+.4f} | {p.learn_bpc:.4f} | "
                     f"{p.keep_bpc:.4f} |")
    return lines


def save_dialled(dial: Dial, tokenizer, source: str | os.PathLike, output: str | os.PathLike, record: dict) -> str:
    """Write the dialled model as a run folder that `eval`, `generate`, `chat`, `merge` and
    `train --model` accept: the model as its kind saves itself (Control delta with its dial, LoRA
    adapter, full weights), the tokenizer, `run_config.json` (the source run's, with `dial`
    added), `dial.json` and the model card. Written under a temporary name and renamed."""
    import json
    import shutil

    from .model_card import write_model_card

    output = os.fspath(output)
    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dial.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    run = dict(_run_config(source))
    run.setdefault("model", None)
    run["output"] = output
    run["dial"] = {"source": os.fspath(source), **record}
    with open(os.path.join(tmp, "run_config.json"), "w") as f:
        json.dump(run, f, indent=2)
    with open(os.path.join(tmp, DIAL_RECORD), "w") as f:
        json.dump(run["dial"], f, indent=2)
    write_model_card(tmp, run, run.get("final_metrics"))
    if os.path.isdir(output):
        old = output.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
    return output


def run_dial(model: str | os.PathLike, output: str | os.PathLike, learn_data: str | None = None,
             keep_data: str | None = None, max_kl: float | None = None, max_keep_increase: float | None = None,
             value: float | None = None, values: Sequence[float] = DEFAULT_VALUES, mode: str = "output",
             refine: int = 3, base: str | None = None, seq_len: int = 256, batch_size: int = 8,
             limit: int | None = 64, progress: bool = True) -> dict:
    """What `controlllm dial` does: score the dial of run `model` on `learn_data` (the new skill's
    held-out data) and `keep_data` (what to keep), choose the value that gains most within the
    budget (`max_kl` and/or `max_keep_increase`), or take `value` as given (s = 0: roll back to the
    base), and write the dialled model to `output` with a table (dial.md), its data (dial.json) and a
    plot (dial.png). Returns the record written to dial.json."""
    from .plots import plot_dial_curve

    if value is not None:
        value = _check_value(value)
    else:
        if learn_data is None or keep_data is None:
            raise UsageError("--learn-data and --keep-data are needed to choose a dial value (or give --value)")
        _check_budget(max_kl, max_keep_increase)
    values = [_check_value(v) for v in values]
    if os.path.abspath(os.fspath(output)) == os.path.abspath(os.fspath(model)):
        raise UsageError(f"--output {os.fspath(output)!r} is the run being dialled; choose another folder")
    dial, tokenizer, kind = load_dial(model, base=base, mode=mode)
    learn = read_eval_texts(learn_data, tokenizer, limit) if learn_data else None
    keep = read_eval_texts(keep_data, tokenizer, limit) if keep_data else None
    points: list[DialPoint] = []
    if value is None:
        chosen, points = search(dial, tokenizer, learn, keep, max_kl, max_keep_increase, values, refine,
                                seq_len=seq_len, batch_size=batch_size, progress=progress)
    elif learn is not None and keep is not None:
        points = dial_curve(dial, tokenizer, learn, keep, [value], seq_len=seq_len, batch_size=batch_size,
                            progress=progress)
        chosen = next(p for p in points if p.value == value)
    else:
        chosen = None
    dial.set(value if value is not None else chosen.value)
    budget = {"max_kl": max_kl, "max_keep_increase": max_keep_increase}
    record = {**dial.describe(), "run_kind": kind, "budget": budget if value is None else None,
              "chosen": chosen.to_dict() if chosen is not None else None,
              "learn_data": learn_data, "keep_data": keep_data, "seq_len": seq_len, "texts_limit": limit,
              "points": [p.to_dict() for p in points]}
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(output))), exist_ok=True)
    save_dialled(dial, tokenizer, model, output, record)
    if points:
        lines = [f"# Retention dial of `{os.fspath(model)}`", "",
                 f"Dial: {record['what']} (run kind `{kind}`, mode `{mode}`). Gain: drop of the new data's bits/char "
                 f"from the base (s = 0) on `{learn_data}`; forgetting on `{keep_data}`: KL(base || dialled) per token "
                 "(nats) and the bits/char change.", ""]
        if value is None:
            limits = ", ".join(f"{k} <= {v:g}" for k, v in budget.items() if v is not None)
            lines += [f"Budget: {limits}. Chosen: s = {chosen.value:g} (gain {chosen.gain:+.4f}, KL {chosen.kl:.4f}).", ""]
        else:
            lines += [f"Set by hand: s = {value:g}.", ""]
        lines += _table(points, chosen.value if chosen else None)
        with open(os.path.join(output, DIAL_TABLE), "w") as f:
            f.write("\n".join(lines) + "\n")
        plot_dial_curve([p.to_dict() for p in points], chosen.value if chosen else None,
                        os.path.join(output, DIAL_PLOT), budget=budget if value is None else None)
    return record


__all__ += ["load_dial", "read_eval_texts", "run_dial", "save_dialled"]
