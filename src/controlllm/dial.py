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
            self._lora_ends(model)
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

    def _lora_ends(self, model: nn.Module) -> None:
        """The ends of a PEFT LoRA model: every B matrix is scaled by s (the update B A vanishes at
        0); DoRA magnitudes and `modules_to_save` copies are interpolated toward their values in the
        base (the column norms of the base weights, the original modules), so s = 0 is the base bit
        for bit. Adapters whose base values are not kept are refused."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
        from peft.utils.integrations import dequantize_module_weight

        for adapter, config in model.peft_config.items():
            peft_type = str(getattr(config.peft_type, "value", config.peft_type))
            if peft_type != "LORA":
                raise UsageError(f"adapter {adapter!r} is {peft_type}; only LoRA adapters (LoRA, DoRA) can be dialled")
            if getattr(config, "bias", "none") != "none":
                raise UsageError(f"adapter {adapter!r} trains the base model's biases (bias={config.bias!r}) in place, so "
                                 "the base is not kept and s = 0 cannot be it; only bias='none' adapters can be dialled")
            if getattr(config, "trainable_token_indices", None):
                raise UsageError(f"adapter {adapter!r} trains token embeddings in place (trainable_token_indices); "
                                 "such an adapter cannot be dialled back to the base exactly")
        self._dora: list[nn.Module] = []
        for prefix, module in model.named_modules():
            if isinstance(module, LoraLayer):
                for adapter, b in module.lora_B.items():
                    for name, p in b.named_parameters():
                        self._add(f"{prefix}.lora_B.{adapter}.{name}", p, None)
                for adapter, p in module.lora_embedding_B.items():
                    self._add(f"{prefix}.lora_embedding_B.{adapter}", p, None)
                for adapter, dora in module.lora_magnitude_vector.items():
                    weight = dequantize_module_weight(module.get_base_layer())
                    # The magnitude DoRA starts from, computed by DoRA itself with a zero update.
                    with torch.no_grad():
                        start = dora.get_weight_norm(weight=weight, lora_weight=torch.zeros((), dtype=weight.dtype,
                                                     device=weight.device), scaling=module.scaling[adapter])
                    if start.shape != dora.weight.shape:
                        raise UsageError(f"cannot dial the DoRA layer {prefix!r} ({type(dora).__name__}): its magnitude "
                                         f"{tuple(dora.weight.shape)} does not match the base norms {tuple(start.shape)}")
                    self._add(f"{prefix}.lora_magnitude_vector.{adapter}.weight", dora.weight, start)
                    self._dora.append(dora)
            elif isinstance(module, ModulesToSaveWrapper):
                original = dict(module.original_module.named_parameters())
                for adapter, copy_ in module.modules_to_save.items():
                    for name, p in copy_.named_parameters():
                        if name not in original or original[name].shape != p.shape:
                            raise UsageError(f"cannot dial {prefix}.modules_to_save.{adapter}: its parameter {name!r} "
                                             "has no counterpart of the same shape in the original module")
                        self._add(f"{prefix}.modules_to_save.{adapter}.{name}", p, original[name])
        if not any(k not in self._start for k in self._params):
            raise UsageError(f"{type(model).__name__} has no LoRA B matrices to scale; only LoRA adapters can be dialled")

    def _add(self, key: str, p: nn.Parameter, start: torch.Tensor | None) -> None:
        self._params[key] = p
        self._trained[key] = p.detach().clone()
        if start is not None:  # else scaled by s: its start is zero
            self._start[key] = start.detach().to(p.device, p.dtype).clone()

    def _control_weight_ends(self, model: ControlModel) -> None:
        from .lowrank import is_low_rank

        for index, block in model.blocks.items():
            if not isinstance(block, StackBlock) and is_low_rank(block.expanded_layer):
                # A low-rank copy is W_p + (alpha / r) B A: W_p + s (W_e - W_p) scales B (s B A), as a LoRA dial.
                for name, p in block.expanded_layer.named_parameters():
                    if name.endswith(".lora_B"):
                        self._add(f"{index}.{name}", p, None)
                continue
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
        else:  # torch.lerp is exact at both ends: the start at 0, the trained weights at 1
            for name, p in self._params.items():
                start = self._start.get(name)
                if start is None:  # a LoRA B matrix: s B
                    p.copy_(self._trained[name] if value == 1.0 else self._trained[name] * value)
                else:
                    p.copy_(torch.lerp(start, self._trained[name], value))
            for dora in getattr(self, "_dora", ()):
                dora._cache_clear()  # DoRA may cache the weight norm of the last update
        self.value = value
        return self.model

    def describe(self) -> dict:
        """What this dial turns, in words (for records and model cards)."""
        what = {
            ("control", "output"): "every interpolation weight scaled: w' = s w (stack copies: s x their contribution)",
            ("control", "weights"): "the copies' weights interpolated toward their starting point: W_0 + s (W - W_0)",
            ("lora", "output"): "the LoRA update scaled: s B A (DoRA magnitudes and modules_to_save copies "
                                "interpolated toward the base)",
            ("lora", "weights"): "the LoRA update scaled: s B A (DoRA magnitudes and modules_to_save copies "
                                 "interpolated toward the base)",
            ("weights", "output"): "WiSE-FT: theta_0 + s (theta - theta_0)",
            ("weights", "weights"): "WiSE-FT: theta_0 + s (theta - theta_0)",
        }[(self.kind, self.mode)]
        return {"kind": self.kind, "mode": self.mode, "value": self.value, "what": what}


# ---------------------------------------------------------------------------------- scoring
@dataclass
class DialPoint:
    """One dial value scored: the new skill's loss (`learn_*`), the kept data's loss (`keep_*`) and
    KL(base || dialled) on the kept data, per scored token in nats; bits/char per scored character.
    `gain` is the new skill's bits/char drop from the base (s = 0), `keep_increase` the kept data's
    bits/char increase. Plain texts are scored on every token, chats on their answer tokens (what
    SFT trains on), as `controlllm.evaluation.scoring` does for `eval`.

    When the keep data is split (`check` > 0), `kl`, `keep_*` and `keep_increase` are measured on
    the `choice_texts` used to choose, and `check_kl` / `check_keep_increase` on the `check_texts`
    left out of the choice. With a `confidence`, `kl_bound` / `keep_increase_bound` are one-sided
    upper bounds of `kl` / `keep_increase` from a per-text bootstrap of the choice texts; `choose`
    holds these bounds, not the point estimates, to the budget. `learn_tokens` / `learn_characters`
    and `keep_tokens` / `keep_characters` are what the means divide by (keep: the choice texts)."""

    value: float
    learn_nll: float
    learn_bpc: float
    keep_nll: float
    keep_bpc: float
    kl: float
    gain: float = 0.0
    keep_increase: float = 0.0
    kl_bound: float | None = None
    keep_increase_bound: float | None = None
    check_kl: float | None = None
    check_keep_increase: float | None = None
    choice_texts: int | None = None
    check_texts: int | None = None
    learn_tokens: int = 0
    learn_characters: int = 0
    keep_tokens: int = 0
    keep_characters: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# Resamples of the bootstrap bound; its quantile moves by well under 1% of the spread between runs.
BOOTSTRAP_SAMPLES = 2000


def _split(texts: int, check: float, seed: int) -> tuple[list[int], list[int]]:
    """(choice, check) text indices: a seeded shuffle, `check` of the texts (at least one) held out
    when there are two texts or more."""
    import random

    if isinstance(check, bool) or not isinstance(check, (int, float)) or not 0.0 <= check < 1.0:
        raise UsageError(f"check={check!r} is not allowed; use the share of keep texts held out of the choice, "
                         "in [0, 1) (0: choose on all of them)")
    order = list(range(texts))
    if check == 0 or texts < 2:
        return order, []
    random.Random(seed).shuffle(order)
    held = min(texts - 1, max(1, round(texts * check)))
    return sorted(order[held:]), sorted(order[:held])


def _upper_bound(numerator: torch.Tensor, denominator: torch.Tensor, confidence: float, seed: int) -> float:
    """One-sided `confidence` upper bound of sum(numerator) / sum(denominator), texts resampled."""
    n = len(numerator)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (BOOTSTRAP_SAMPLES, n), generator=g)
    counts = torch.zeros(BOOTSTRAP_SAMPLES, n, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones(BOOTSTRAP_SAMPLES, n, dtype=torch.float64))
    ratios = (counts @ numerator.double()) / (counts @ denominator.double())
    return float(torch.quantile(ratios, confidence))


def _tokens(data) -> torch.Tensor:
    counts = torch.zeros(data.texts, dtype=torch.float64)
    for owner, labels in zip(data.owner, data.labels):
        counts[owner] += sum(t != -100 for t in labels)
    return counts


def _score(dial: Dial, tokenizer, learn, keep, values: Sequence[float], batch_size: int, progress: bool,
           learn_values: Sequence[float]) -> dict[float, dict[str, torch.Tensor]]:
    """Per value, per text sums: the learn data's NLL (for `learn_values`), the keep data's NLL and
    KL(base || dialled). The base's distributions are computed once per keep batch at s = 0."""
    from tqdm.auto import tqdm

    from .evaluation import _device_of, _inference, _pad_id
    from .evaluation.scoring import log_probs, token_sums

    model = dial.model
    device, pad = _device_of(model), _pad_id(tokenizer)
    raw = {v: {"learn": torch.zeros(learn.texts, dtype=torch.float64), "keep": torch.zeros(keep.texts, dtype=torch.float64),
               "kl": torch.zeros(keep.texts, dtype=torch.float64)} for v in values}
    steps = len(values) * math.ceil(len(keep.windows) / batch_size) + \
        len(learn_values) * math.ceil(len(learn.windows) / batch_size)
    previous = dial.value
    try:
        with _inference(model), tqdm(total=steps, desc="dial", disable=not progress) as bar:
            for ids, mask, targets, owners in keep.batches(pad, batch_size, device):
                dial.set(0.0)
                base = log_probs(model, ids, mask)
                for v in values:
                    log_q = base if v == 0.0 else log_probs(dial.set(v), ids, mask)
                    nll, _, kl = token_sums(log_q, targets, None if v == 0.0 else base)
                    raw[v]["keep"].index_add_(0, owners, nll.double().cpu())
                    if kl is not None:
                        raw[v]["kl"].index_add_(0, owners, kl.double().cpu())
                    bar.update(1)
            for v in learn_values:
                dial.set(v)
                for ids, mask, targets, owners in learn.batches(pad, batch_size, device):
                    nll, _, _ = token_sums(log_probs(model, ids, mask), targets)
                    raw[v]["learn"].index_add_(0, owners, nll.double().cpu())
                    bar.update(1)
    finally:
        dial.set(previous)
    return raw


def _points(raw: dict, learn, keep, check: float, confidence: float | None, seed: int) -> list[DialPoint]:
    if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
                                   or not 0.5 <= confidence < 1.0):
        raise UsageError(f"confidence={confidence!r} is not allowed; use None (no bound) or a number in [0.5, 1)")
    choice, held = _split(keep.texts, check, seed)
    learn_tokens, keep_tokens = _tokens(learn), _tokens(keep)
    learn_chars = float(sum(learn.characters))
    keep_chars = torch.tensor(keep.characters, dtype=torch.float64)
    base = raw[0.0]
    points = []
    for v in sorted(raw):
        r = raw[v]
        increase = (r["keep"] - base["keep"]) / LN2  # bits, per text
        c = torch.tensor(choice)
        point = DialPoint(value=v, learn_nll=float(r["learn"].sum() / learn_tokens.sum()),
                          learn_bpc=float(r["learn"].sum()) / LN2 / learn_chars,
                          keep_nll=float(r["keep"][c].sum() / keep_tokens[c].sum()),
                          keep_bpc=float(r["keep"][c].sum()) / LN2 / float(keep_chars[c].sum()),
                          kl=float(r["kl"][c].sum() / keep_tokens[c].sum()),
                          keep_increase=float(increase[c].sum() / keep_chars[c].sum()),
                          choice_texts=len(choice), learn_tokens=int(learn_tokens.sum()),
                          learn_characters=int(learn_chars), keep_tokens=int(keep_tokens[c].sum()),
                          keep_characters=int(keep_chars[c].sum()))
        point.gain = (float(base["learn"].sum()) - float(r["learn"].sum())) / LN2 / learn_chars
        if confidence is not None:
            point.kl_bound = 0.0 if v == 0.0 else _upper_bound(r["kl"][c], keep_tokens[c], confidence, seed)
            point.keep_increase_bound = 0.0 if v == 0.0 else _upper_bound(increase[c], keep_chars[c], confidence, seed)
        if held:
            h = torch.tensor(held)
            point.check_texts = len(held)
            point.check_kl = float(r["kl"][h].sum() / keep_tokens[h].sum())
            point.check_keep_increase = float(increase[h].sum() / keep_chars[h].sum())
        points.append(point)
    return points


def _prepare(tokenizer, learn_data, keep_data, seq_len: int):
    from .evaluation.scoring import prepare

    for name, data in (("learn", learn_data), ("keep", keep_data)):
        if data is None or isinstance(data, (str, bytes)) or not len(data):
            raise UsageError(f"the dial needs {name} data: a non-empty list of texts or chats, not {data!r:.40}")
    return prepare(tokenizer, learn_data, seq_len), prepare(tokenizer, keep_data, seq_len)


def dial_curve(dial: Dial, tokenizer, learn_texts: Sequence[Any], keep_texts: Sequence[Any],
               values: Sequence[float] = DEFAULT_VALUES, seq_len: int = 256, batch_size: int = 8,
               progress: bool = True, check: float = 0.0, confidence: float | None = None,
               seed: int = 0) -> list[DialPoint]:
    """Score every dial value in `values` (s = 0 is always added: it is the base, the reference).

    The learn data gives the new skill's loss; the keep data the loss and KL(base || dialled), the
    base's distributions computed once per batch at s = 0 and compared with every value. Each is a
    list of plain texts (every token scored) or of chats (lists of {role, content} messages,
    rendered and labelled as SFT training does: only the answer tokens are scored), cut into
    windows of `seq_len` predicted tokens, each scored token predicted once: the same scoring as
    `eval`'s `heldout:` and `kl:` tasks (`controlllm.evaluation.scoring`). `check` holds that share of the
    keep texts out (see `DialPoint`); `confidence` adds bootstrap upper bounds. The dial is left
    where it was. Returns the points sorted by value.
    """
    values = sorted({0.0, *(_check_value(v) for v in values)})
    learn, keep = _prepare(tokenizer, learn_texts, keep_texts, seq_len)
    raw = _score(dial, tokenizer, learn, keep, values, batch_size, progress, values)
    return _points(raw, learn, keep, check, confidence, seed)


@dataclass
class DialTextScores:
    """`dial_text_scores`' result: per dial value (rows, in `values`' order, s = 0 first) and per text
    (columns, in the order given), the learn data's NLL, the keep data's NLL and KL(base || dialled),
    all summed over each text's scored tokens (nats); the texts' scored tokens and characters."""

    values: list
    learn_nll: torch.Tensor
    keep_nll: torch.Tensor
    kl: torch.Tensor
    learn_tokens: torch.Tensor
    keep_tokens: torch.Tensor
    learn_characters: list
    keep_characters: list


def dial_text_scores(dial: Dial, tokenizer, learn_texts: Sequence[Any], keep_texts: Sequence[Any],
                     values: Sequence[float] = DEFAULT_VALUES, seq_len: int = 256, batch_size: int = 8,
                     progress: bool = False) -> DialTextScores:
    """`dial_curve`'s scores kept per text instead of summed into points, for callers that group or
    resample texts themselves (`controlllm.compare`): one pass over the data, the dial set once per
    value for the learn data and once per value and keep batch, however the caller groups the texts
    later. s = 0 is always added. The dial is left where it was."""
    values = sorted({0.0, *(_check_value(v) for v in values)})
    learn, keep = _prepare(tokenizer, learn_texts, keep_texts, seq_len)
    raw = _score(dial, tokenizer, learn, keep, values, batch_size, progress, values)
    return DialTextScores(values, *(torch.stack([raw[v][k] for v in values]) for k in ("learn", "keep", "kl")),
                          _tokens(learn), _tokens(keep), list(learn.characters), list(keep.characters))


def _bounded(point: DialPoint, name: str) -> float:
    bound = getattr(point, f"{name}_bound")
    return getattr(point, name) if bound is None else bound


def _forgetting(point: DialPoint, max_kl: float | None, max_keep_increase: float | None) -> bool:
    ok = True
    if max_kl is not None:
        ok &= _bounded(point, "kl") <= max_kl
    if max_keep_increase is not None:
        ok &= _bounded(point, "keep_increase") <= max_keep_increase
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

    A point is within the budget when its forgetting, or its upper bound where the point has one
    (`kl_bound`, `keep_increase_bound`), is at most the budget. s = 0 (the base) is always within
    a budget; when it is the only one, or no point within the budget gains anything, a
    `DialBudgetError` names the closest point outside it.
    """
    _check_budget(max_kl, max_keep_increase)
    within = [p for p in points if _forgetting(p, max_kl, max_keep_increase)]
    best = max(within, key=lambda p: (p.gain, -p.value), default=None)
    if best is None or best.value == 0.0 or best.gain <= 0:
        outside = [p for p in points if p.value > 0 and not _forgetting(p, max_kl, max_keep_increase)]
        budget = " and ".join(f"{n} {v:g}" for n, v in (("KL", max_kl), ("keep bits/char increase", max_keep_increase))
                              if v is not None)
        closest = min(outside, key=lambda p: p.value, default=None)
        near = ""
        if closest:
            bound = (f" (upper bounds {_bounded(closest, 'kl'):.4g} and {_bounded(closest, 'keep_increase'):+.4g})"
                     if closest.kl_bound is not None else "")
            near = (f"; the closest is s = {closest.value:g} with KL {closest.kl:.4g} and keep increase "
                    f"{closest.keep_increase:+.4g}{bound} (gain {closest.gain:+.4g})")
        raise DialBudgetError(f"no dial value above 0 gains anything within {budget}{near}. Loosen the budget, try "
                              "smaller values (--values), or roll back to the base with --value 0")
    return best


def search(dial: Dial, tokenizer, learn_texts: Sequence[Any], keep_texts: Sequence[Any],
           max_kl: float | None = None, max_keep_increase: float | None = None,
           values: Sequence[float] = DEFAULT_VALUES, refine: int = 3, seq_len: int = 256, batch_size: int = 8,
           progress: bool = True, check: float = 0.5, confidence: float | None = 0.95,
           seed: int = 0) -> tuple[DialPoint, list[DialPoint]]:
    """Choose the dial value that gains most within the budget, with a budget that holds out of sample.

    The keep texts are split (seeded): `check` of them are held out of the choice and report the
    chosen value's forgetting on data it was not chosen on (`check_kl`, `check_keep_increase`);
    on the rest, the budget is held by a one-sided `confidence` bootstrap upper bound per value
    (None: the point estimate). s = 1 (the trained model) is scored first: when it is within the
    budget and gains, it is chosen and nothing else is scored. Otherwise `values` are scored, then
    `refine` bisections between the chosen value and the next larger one outside the budget.
    Returns (the chosen point, every point scored, by value); the dial is left at the chosen
    value. `search_report` turns the result into the record `controlllm dial` writes.
    """
    _check_budget(max_kl, max_keep_increase)
    values = sorted({0.0, *(_check_value(v) for v in values)})
    learn, keep = _prepare(tokenizer, learn_texts, keep_texts, seq_len)
    raw: dict[float, dict] = {}

    def add(new: Sequence[float]) -> list[DialPoint]:
        # Every call scores s = 0 on the keep data (each batch's KL reference); the learn data once.
        new = sorted({v for v in {0.0, *new} if v not in raw})
        scored = _score(dial, tokenizer, learn, keep, sorted({0.0, *new}), batch_size, progress, new)
        raw.update({v: scored[v] for v in new})
        return _points(raw, learn, keep, check, confidence, seed)

    points = add([1.0])
    trained = points[-1]
    if not (_forgetting(trained, max_kl, max_keep_increase) and trained.gain > 0):
        points = add(values)
        for _ in range(max(0, refine)):
            try:
                best = choose(points, max_kl, max_keep_increase)
            except DialBudgetError:
                best = points[0]
            above = [p for p in points if p.value > best.value]
            if not above or _forgetting(above[0], max_kl, max_keep_increase):
                break
            middle = round((best.value + above[0].value) / 2, 6)
            if middle in raw:
                break
            points = add([middle])
    elif progress:
        import sys

        print(f"dial: the trained model (s = 1) is already within the budget ({_budget_words(max_kl, max_keep_increase)}"
              f"; KL {trained.kl:.4g}, bound {_bounded(trained, 'kl'):.4g}): keeping it, no search needed",
              file=sys.stderr)
    best = choose(points, max_kl, max_keep_increase)
    dial.set(best.value)
    return best, points


def _budget_words(max_kl: float | None, max_keep_increase: float | None) -> str:
    return ", ".join(f"{k} <= {v:g}" for k, v in (("KL", max_kl), ("keep bits/char increase", max_keep_increase))
                     if v is not None)


def search_report(best: DialPoint, points: Sequence[DialPoint], max_kl: float | None = None,
                  max_keep_increase: float | None = None) -> dict:
    """What a search's choice promises, for the dial's record: whether the trained model (s = 1)
    was already within the budget (then nothing else was scored), the bounds the choice was held
    to, and the chosen value's forgetting on the keep texts held out of the choice, with whether
    it is within the budget there and, if not, by how much it is over."""
    trained_fits = best.value == 1.0
    report: dict[str, Any] = {
        "trained_fits": trained_fits,
        "values_scored": len(points),
        "choice_texts": best.choice_texts,
        "bound": {"kl": best.kl_bound, "keep_increase": best.keep_increase_bound},
        "held_out": None,
    }
    if best.check_texts:
        over = {}
        if max_kl is not None and best.check_kl > max_kl:
            over["kl"] = best.check_kl - max_kl
        if max_keep_increase is not None and best.check_keep_increase > max_keep_increase:
            over["keep_increase"] = best.check_keep_increase - max_keep_increase
        report["held_out"] = {"texts": best.check_texts, "kl": best.check_kl,
                              "keep_increase": best.check_keep_increase, "within_budget": not over, "over_by": over}
    notes = []
    if trained_fits:
        notes.append(f"the trained model (s = 1) is within the budget ({_budget_words(max_kl, max_keep_increase)}); "
                     "no smaller value was needed")
    held = report["held_out"]
    if held is not None:
        notes.append(f"on {held['texts']} keep texts held out of the choice, s = {best.value:g} has KL {held['kl']:.4g} "
                     f"and keep bits/char change {held['keep_increase']:+.4g}: "
                     + ("within the budget" if held["within_budget"] else
                        "over the budget by " + ", ".join(f"{k} {v:.3g}" for k, v in held["over_by"].items())))
    else:
        notes.append("no keep text was held out of the choice (one text only, or check=0): the forgetting is "
                     "measured on the texts it was chosen on")
    report["note"] = "; ".join(notes)
    return report


__all__ = ["DEFAULT_VALUES", "Dial", "DialBudgetError", "DialPoint", "DialTextScores", "choose", "dial_curve",
           "dial_text_scores", "search", "search_report"]


# ------------------------------------------------------------------------------- run folders
DIAL_RECORD = "dial.json"
DIAL_TABLE = "dial.md"
DIAL_PLOT = "dial.png"


def read_eval_texts(path: str | os.PathLike, tokenizer=None, limit: int | None = None) -> list[str] | list[list[dict]]:
    """What the dial scores from a file (`controlllm.evaluation.scoring.read_scoring_data`): plain texts (a text
    file's paragraphs, or a .jsonl of "text" records), or chats (a .jsonl of "messages" or
    "prompt"/"response" records) left as message lists, so that the dial renders and labels them
    as SFT training does and scores their answer tokens. `tokenizer` is not needed (kept for callers)."""
    from .evaluation.scoring import read_scoring_data

    return read_scoring_data(path, limit)


def load_dial(path: str | os.PathLike, base: str | None = None, mode: str = "output") -> tuple[Dial, Any, str]:
    """(a Dial on the trained stage of run `path`, set to its recorded value; its tokenizer; the run's
    kind), through `controlllm.runs.open_run`."""
    from .runs import open_run

    run = open_run(path, base=base)
    dial, tokenizer = run.open_dial(mode)
    return dial, tokenizer, run.kind


def _table(points: list[DialPoint], chosen: float | None) -> list[str]:
    lines = ["| s | gain (bits/char) | KL to base | KL bound | KL held out | keep bits/char change | learn bits/char | "
             "keep bits/char |", "|---|---|---|---|---|---|---|---|"]

    def number(x, fmt=".4f"):
        return "" if x is None else format(x, fmt)

    for p in points:
        mark = " **(chosen)**" if chosen is not None and p.value == chosen else ""
        held = p.check_kl if p.check_texts else None
        lines.append(f"| {p.value:g}{mark} | {p.gain:+.4f} | {p.kl:.4f} | {number(p.kl_bound)} | {number(held)} | "
                     f"{p.keep_increase:+.4f} | {p.learn_bpc:.4f} | {p.keep_bpc:.4f} |")
    return lines


def save_dialled(dial: Dial, tokenizer, run, folder: str | os.PathLike, record: dict) -> str:
    """Write the dialled run into `folder` (a staging folder of `controlllm.runs.Output`): the dialled
    model as its kind saves itself (a Control delta with s in its config or its copies' weights
    moved, a LoRA adapter, full weights), so any tool loading the folder gets the dialled model; the
    tokenizer; `run_config.json` (the trained run's record with the dial entry added, naming the
    trained run as its source, so that dialling this folder again starts from it); `dial.json`; and
    the model card, which labels the dialled model's own measurements apart from the trained run's."""
    import json

    from .model_card import write_model_card
    from .runs import RUN_CONFIG, write_text_atomic

    folder = os.fspath(folder)
    dial.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    source = dict(run.record)
    earlier = source.pop("dial", None)
    trained = (earlier or {}).get("source") or run.path  # always the trained stage, never a dialled folder
    entry = {"source": os.path.abspath(trained) if trained else trained, "stores": "dialled", **record}
    saved = {**source, "dial": entry}
    write_text_atomic(os.path.join(folder, RUN_CONFIG), json.dumps(saved, indent=2))
    write_text_atomic(os.path.join(folder, DIAL_RECORD), json.dumps(entry, indent=2))
    write_model_card(folder, saved, None)
    return folder


def run_dial(model: str | os.PathLike, output: str | os.PathLike, learn_data: str | None = None,
             keep_data: str | None = None, max_kl: float | None = None, max_keep_increase: float | None = None,
             value: float | None = None, values: Sequence[float] = DEFAULT_VALUES, mode: str = "output",
             refine: int = 3, base: str | None = None, seq_len: int = 256, batch_size: int = 8,
             limit: int | None = 64, progress: bool = True, overwrite: bool = False, check: float = 0.5,
             confidence: float | None = 0.95) -> dict:
    """What `controlllm dial` does: score the dial of run `model` on `learn_data` (the new skill's
    held-out data) and `keep_data` (what to keep), choose the value that gains most within the
    budget (`max_kl` and/or `max_keep_increase`), or take `value` as given (s = 0: roll back to the
    base), and write the dialled run to `output` (refused before anything loads when it is a file,
    the run itself or its base, or a non-empty folder without `overwrite`) with a table (dial.md),
    its data (dial.json) and a plot (dial.png). A value is relative to the trained stage: dialling a
    dialled run sets a new value. The choice holds `check` of the keep texts out and compares the
    budget with a one-sided `confidence` bootstrap bound on the rest (`search`); the record's "search"
    entry reports the chosen value's forgetting on the held-out texts. Returns the record written to
    dial.json."""
    from .plots import plot_dial_curve
    from .runs import Output, open_run

    if value is not None:
        value = _check_value(value)
    else:
        if learn_data is None or keep_data is None:
            raise UsageError("--learn-data and --keep-data are needed to choose a dial value (or give --value)")
        _check_budget(max_kl, max_keep_increase)
    if mode not in MODES:
        raise UsageError(f"dial mode {mode!r} is not supported; allowed: {', '.join(map(repr, MODES))}")
    values = [_check_value(v) for v in values]
    for flag, number in (("--seq-len", seq_len), ("--batch-size", batch_size)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise UsageError(f"{flag} must be a positive integer, got {number!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--limit must be a positive integer, got {limit!r}")
    for flag, path in (("--learn-data", learn_data), ("--keep-data", keep_data)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag} {os.fspath(path)!r} does not exist or is not a file")
    run = open_run(model, base=base)
    if run.kind == "base":
        raise UsageError(f"--model {os.fspath(model)!r} is a base model, not a trained run: there is nothing to dial")
    out = Output(output, overwrite=overwrite, protect=run.protected)
    dial, tokenizer = run.open_dial(mode)
    kind = run.kind
    learn = read_eval_texts(learn_data, tokenizer, limit) if learn_data else None
    keep = read_eval_texts(keep_data, tokenizer, limit) if keep_data else None
    points: list[DialPoint] = []
    if value is None:
        chosen, points = search(dial, tokenizer, learn, keep, max_kl, max_keep_increase, values, refine,
                                seq_len=seq_len, batch_size=batch_size, progress=progress, check=check,
                                confidence=confidence)
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
    if value is None:
        record["search"] = search_report(chosen, points, max_kl, max_keep_increase)
    with out.staging() as folder:
        save_dialled(dial, tokenizer, run, folder, record)
        if points:
            lines = [f"# Retention dial of `{os.fspath(model)}`", "",
                     f"Dial: {record['what']} (run kind `{kind}`, mode `{mode}`). Gain: drop of the new data's bits/char "
                     f"from the base (s = 0) on `{learn_data}`; forgetting on `{keep_data}`: KL(base || dialled) per token "
                     "(nats) and the bits/char change.", ""]
            if value is None:
                limits = ", ".join(f"{k} <= {v:g}" for k, v in budget.items() if v is not None)
                lines += [f"Budget: {limits}. Chosen: s = {chosen.value:g} (gain {chosen.gain:+.4f}, KL {chosen.kl:.4f}).",
                          ""]
                note = record["search"].get("note")
                if note:
                    lines += [f"{note[0].upper()}{note[1:]}.", ""]
            else:
                lines += [f"Set by hand: s = {value:g}.", ""]
            lines += _table(points, chosen.value if chosen else None)
            with open(os.path.join(folder, DIAL_TABLE), "w") as f:
                f.write("\n".join(lines) + "\n")
            plot_dial_curve([p.to_dict() for p in points], chosen.value if chosen else None,
                            os.path.join(folder, DIAL_PLOT), budget=budget if value is None else None)
    return record


__all__ += ["load_dial", "read_eval_texts", "run_dial", "save_dialled"]
