"""`ControlConfig`: which layers to expand, how to merge the branches, and how to align them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

CONFIG_NAME = "control_config.json"

EXPAND_TYPES = ("concat", "stack", "hybrid")
QUANTIZATIONS = ("4bit", "8bit")  # of the frozen branch (controlllm.quantize)
INTERPOLATIONS = ("lerp", "dlerp", "dlerp_in", "slerp")
ALIGNMENT_LOSSES = ("mse", "nmse", "cosine", "none")
LAYER_PLACEMENTS = ("even", "group_end")
# Drift measures a budget can constrain: both are scale-free (the same number means the same relative
# drift on every model); plain 'mse' grows with the model's hidden-state scale.
BUDGET_LOSSES = ("nmse", "cosine")

# Values that fields added after the first release take when a saved config predates them, so an old
# delta rebuilds exactly the model it was trained as.
LEGACY_DEFAULTS = {"layer_placement": "group_end", "gate_norm": False}


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"ControlConfig.{name}={value!r} must be a finite number")


def _allowed(field_name: str, value, allowed) -> ValueError:
    return ValueError(f"ControlConfig.{field_name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


@dataclass
class ControlConfig:
    """Configuration of a Control LLM expansion (Wei et al. 2025, arXiv 2501.10979).

    Layers: `expanded_layers` lists them explicitly; otherwise `num_expanded_layers` = k of the N
    decoder layers (default N // 4, the paper's 8 of 32) are spread evenly over the whole depth:
    layer round((j + 1) N / k) - 1 for j = 0..k-1, rounding halves up (N = 32, k = 8: 3, 7, ..., 31;
    the top layer is always included). `layer_placement="group_end"` is the rule of earlier
    releases, (i + 1) % (N // k) == 0, first k; configs saved before the field existed use it.

    Alignment: the term added to the LM loss is `alignment_weight` x the alignment loss (averaged
    over real tokens and layers), unless `alignment_budget` is set: then each expanded layer gets its
    own multiplier, adapted during training (dual ascent) so that the layer's running drift stays at
    or below the budget. See `controlllm.budget`.
    """

    expand_type: str = field(
        default="concat",
        metadata={"help": "'concat' (Control LLM: a trainable copy in parallel with each chosen block), "
                  "'stack' (LLaMA-Pro: an identity-initialised copy inserted after each chosen block), "
                  "'hybrid' (alternates stack and concat over the chosen blocks, starting with stack)."},
    )
    num_expanded_layers: int | None = field(
        default=None, metadata={"help": "How many layers to expand, spread evenly over the depth (default: N // 4). "
                                "Not together with `expanded_layers`."}
    )
    expanded_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit layer indices to expand (0-based). Not together with `num_expanded_layers`."}
    )
    layer_placement: str = field(
        default="even", metadata={"help": "How `num_expanded_layers` are placed: 'even' (round((j + 1) N / k) - 1, "
                                  "reaching the top layer) or 'group_end' (the rule of earlier releases)."}
    )
    interpolation: str = field(
        default="lerp",
        metadata={"help": "How branch outputs are merged: 'lerp' (one weight per layer), 'dlerp' (per token, "
                  "from both branch outputs), 'dlerp_in' (per token, from the block input), 'slerp' (spherical)."},
    )
    interpolation_init: float = field(
        default=0.0, metadata={"help": "Initial logit f of the interpolation weight; w = sigmoid(f) (0.0 -> 0.5)."}
    )
    train_interpolation: bool = field(
        default=False, metadata={"help": "Whether the interpolator's parameters are trained (default: w stays fixed)."}
    )
    gate_norm: bool = field(
        default=True, metadata={"help": "dlerp/dlerp_in: normalise the gate's input per token (RMS, over sqrt(dim)) so "
                                "one optimizer step moves the gate logit by O(lr), whatever the hidden-state scale."}
    )
    alignment_loss: str = field(
        default="nmse", metadata={"help": "Alignment (divergence) loss between branches: 'nmse' (squared difference over "
                  "the frozen branch's squared norm: scale-free), 'mse' (mean squared difference, as the paper; grows "
                  "with the model's hidden-state scale), 'cosine' or 'none'."}
    )
    alignment_weight: float = field(
        default=1.0, metadata={"help": "Factor alpha of the alignment loss added to the LM loss (ignored when "
                               "`alignment_budget` is set)."}
    )
    alignment_margin: float = field(
        default=0.0, metadata={"help": "Margin of the cosine alignment loss: relu(1 - margin - cos)."}
    )
    alignment_budget: float | None = field(
        default=None, metadata={"help": "Drift budget per expanded layer, in units of the alignment loss, which is also "
                                "the logged drift/{i} ('nmse': relative squared drift, e.g. 0.01 = 10% RMS deviation; "
                                "'cosine': 0.5 relu(1 - margin - cos)^2, e.g. 0.0005 = cos 0.968 at margin 0). A "
                                "per-layer multiplier replaces `alignment_weight` and is adapted to keep each layer's "
                                "running drift at or below it. None: the fixed weight."}
    )
    dial: float = field(
        default=1.0, metadata={"help": "Retention dial s in [0, 1], set after training (`controlllm.dial`): every "
                               "interpolation weight is used as s * w (per-token gates scaled per token), a stack "
                               "copy's contribution as s times its own. 1 = the trained model, 0 = the base model, "
                               "both bit for bit; merging folds at s * w."}
    )
    alignment_budget_lr: float = field(
        default=0.5, metadata={"help": "Step of the budget multipliers' dual ascent per optimizer step, per unit of "
                               "relative violation (drift / budget - 1)."}
    )
    quantize_base: str | None = field(
        default=None, metadata={"help": "Keep the frozen decoder layers in bitsandbytes '4bit' (nf4) or '8bit' (int8) "
                                "and build each trainable copy from the dequantised weights (`controlllm.quantize`); "
                                "the model then starts equal to the quantised base, not the full-precision one. "
                                "Embeddings and LM head stay full precision. Concat expansion only. None: no quantisation."}
    )

    copy_rank: int | None = field(
        default=None, metadata={"help": "Low-rank copies (`controlllm.lowrank`): each trainable copy is its frozen layer "
                                "(shared, never duplicated; quantised when `quantize_base` is set) plus a trainable "
                                "rank-r update (alpha / r) B A of every linear layer, B = 0 at the start, so no copy's "
                                "full weights or optimizer states exist. Concat expansion only. None: full copies."}
    )
    copy_alpha: float | None = field(
        default=None, metadata={"help": "Scale alpha of the low-rank copies' update (alpha / r) B A (default: 2 x "
                                "copy_rank, as LoRA r16 alpha 32). Only with `copy_rank`."}
    )

    def __post_init__(self):
        self._check_copy_rank()
        if self.expand_type not in EXPAND_TYPES:
            raise _allowed("expand_type", self.expand_type, EXPAND_TYPES)
        if self.interpolation not in INTERPOLATIONS:
            raise _allowed("interpolation", self.interpolation, INTERPOLATIONS)
        if self.alignment_loss not in ALIGNMENT_LOSSES:
            raise _allowed("alignment_loss", self.alignment_loss, ALIGNMENT_LOSSES)
        if self.layer_placement not in LAYER_PLACEMENTS:
            raise _allowed("layer_placement", self.layer_placement, LAYER_PLACEMENTS)
        if self.quantize_base is not None:
            if self.quantize_base not in QUANTIZATIONS:
                raise _allowed("quantize_base", self.quantize_base, (None, *QUANTIZATIONS))
            if self.expand_type != "concat":
                raise ValueError(
                    f"ControlConfig.quantize_base={self.quantize_base!r} works with expand_type='concat' (Control LLM) "
                    f"only, not {self.expand_type!r}: a stack copy starts from the frozen layer's full-precision weights "
                    "with its output projections zeroed and is merged as a new layer; use quantize_base=None for it"
                )
        if self.num_expanded_layers is not None and self.expanded_layers is not None:
            raise ValueError(
                "ControlConfig takes at most one of `num_expanded_layers` (a count, evenly spaced) and "
                f"`expanded_layers` (explicit indices); got num_expanded_layers={self.num_expanded_layers!r}, "
                f"expanded_layers={self.expanded_layers!r}"
            )
        if self.num_expanded_layers is not None:
            if isinstance(self.num_expanded_layers, bool) or not isinstance(self.num_expanded_layers, int) \
                    or self.num_expanded_layers < 1:
                raise ValueError(
                    f"ControlConfig.num_expanded_layers={self.num_expanded_layers!r} must be a positive integer"
                )
        if self.expanded_layers is not None:
            if isinstance(self.expanded_layers, (str, bytes)) or not hasattr(self.expanded_layers, "__iter__"):
                raise TypeError(f"ControlConfig.expanded_layers={self.expanded_layers!r} must be a list of layer indices")
            layers = list(self.expanded_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(
                    f"ControlConfig.expanded_layers={self.expanded_layers!r} must be a non-empty list of "
                    "non-negative layer indices"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"ControlConfig.expanded_layers={self.expanded_layers!r} contains duplicates")
            self.expanded_layers = sorted(layers)
        for name in ("train_interpolation", "gate_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ControlConfig.{name}={getattr(self, name)!r} must be True or False")
        for name in ("alignment_weight", "alignment_margin", "interpolation_init", "alignment_budget_lr", "dial"):
            _check_finite(name, getattr(self, name))
        if not 0.0 <= self.dial <= 1.0:
            raise ValueError(f"ControlConfig.dial={self.dial!r} must be in [0, 1] (0: the base model, 1: the trained model)")
        self.dial = float(self.dial)
        if self.alignment_weight < 0:
            raise ValueError(f"ControlConfig.alignment_weight={self.alignment_weight!r} must be >= 0")
        if not 0.0 <= self.alignment_margin < 2.0:
            raise ValueError(f"ControlConfig.alignment_margin={self.alignment_margin!r} must be in [0, 2)")
        if self.alignment_budget_lr <= 0:
            raise ValueError(f"ControlConfig.alignment_budget_lr={self.alignment_budget_lr!r} must be > 0")
        if self.alignment_budget is not None:
            _check_finite("alignment_budget", self.alignment_budget)
            if self.alignment_budget <= 0:
                raise ValueError(f"ControlConfig.alignment_budget={self.alignment_budget!r} must be > 0 (or None)")
            if self.alignment_loss not in BUDGET_LOSSES:
                raise ValueError(
                    f"ControlConfig.alignment_budget={self.alignment_budget!r} needs a scale-free alignment_loss, one "
                    f"of {', '.join(map(repr, BUDGET_LOSSES))}; got alignment_loss={self.alignment_loss!r}"
                )

    def _check_copy_rank(self) -> None:
        if self.copy_rank is not None:
            if isinstance(self.copy_rank, bool) or not isinstance(self.copy_rank, int) or self.copy_rank < 1:
                raise ValueError(f"ControlConfig.copy_rank={self.copy_rank!r} must be a positive integer (or None: full copies)")
            if self.expand_type != "concat":
                raise ValueError(
                    f"ControlConfig.copy_rank={self.copy_rank!r} works with expand_type='concat' (Control LLM) only, not "
                    f"{self.expand_type!r}: a stack copy starts as the identity, which a shared frozen layer is not; "
                    "use copy_rank=None for it"
                )
        if self.copy_alpha is not None:
            if self.copy_rank is None:
                raise ValueError(f"ControlConfig.copy_alpha={self.copy_alpha!r} scales low-rank copies: give copy_rank too")
            _check_finite("copy_alpha", self.copy_alpha)
            if self.copy_alpha <= 0:
                raise ValueError(f"ControlConfig.copy_alpha={self.copy_alpha!r} must be > 0 (or None: 2 x copy_rank)")
            self.copy_alpha = float(self.copy_alpha)

    def copy_scale_alpha(self) -> float | None:
        """The alpha of the low-rank copies' update (alpha / r) B A: `copy_alpha`, by default 2 x `copy_rank`;
        None for full copies."""
        if self.copy_rank is None:
            return None
        return self.copy_alpha if self.copy_alpha is not None else 2.0 * self.copy_rank

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The sorted indices of the layers to expand in a model with `num_layers` decoder layers."""
        if self.expanded_layers is not None:
            bad = [i for i in self.expanded_layers if i >= num_layers]
            if bad:
                raise ValueError(
                    f"ControlConfig.expanded_layers={self.expanded_layers!r}: indices {bad} are out of range for a "
                    f"model with {num_layers} decoder layers (allowed: 0..{num_layers - 1})"
                )
            return list(self.expanded_layers)
        k = self.num_expanded_layers if self.num_expanded_layers is not None else max(1, num_layers // 4)
        if k > num_layers:
            raise ValueError(
                f"ControlConfig.num_expanded_layers={k} is more than the model's {num_layers} decoder layers "
                f"(allowed: 1..{num_layers})"
            )
        if self.layer_placement == "group_end":
            split = num_layers // k
            return [i for i in range(num_layers) if (i + 1) % split == 0][:k]
        # (j + 1) N / k rounded half up, in integers: floor(((j + 1) 2N + k) / 2k). Distinct for k <= N.
        return [((j + 1) * 2 * num_layers + k) // (2 * k) - 1 for j in range(k)]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ControlConfig":
        """A named recipe (see `PRESETS`), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown Control preset {name!r}; allowed: {', '.join(map(repr, PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ControlConfig":
        """The config saved as `data`; fields it predates take their earlier behaviour (`LEGACY_DEFAULTS`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown ControlConfig fields {unknown}; allowed: {sorted(known)}")
        data = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in data}, **data}
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        """Write `control_config.json` (plus `extra` metadata under the key "base_model") to `directory`, atomically."""
        os.makedirs(directory, exist_ok=True)
        payload = {"control_config": self.to_dict(), **({"base_model": extra} if extra else {})}
        path = os.path.join(directory, CONFIG_NAME)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ControlConfig":
        """Read the config saved by `save_pretrained`."""
        return cls.from_dict(read_config_file(directory)["control_config"])


def read_config_file(directory: str | os.PathLike) -> dict:
    """The raw content of `directory/control_config.json`, with a clear error when it is missing."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {CONFIG_NAME} in {str(directory)!r}: not a saved Control LLM model")
    with open(path) as f:
        return json.load(f)


# Named recipes. The paper's two (Wei et al. 2025, with their release's defaults) and the one this
# library recommends; k = N // 4 expanded layers in each (the paper's 8 of 32) unless overridden.
PRESETS: dict[str, dict] = {
    # Continued pre-training in the paper: dlerp + cosine alignment, alpha 1, trainable gate.
    "paper-cpt": dict(interpolation="dlerp", alignment_loss="cosine", alignment_weight=1.0, train_interpolation=True,
                      gate_norm=False),
    # Continued SFT in the paper: lerp + mse, alpha 1, w = 0.5 frozen.
    "paper-csft": dict(interpolation="lerp", alignment_loss="mse", alignment_weight=1.0, train_interpolation=False),
    # The library's recommendation and ControlConfig's defaults: lerp with w = 0.5 fixed and the
    # scale-free nmse alignment at weight 1, the Control variant the retention benchmark chose on
    # validation (benchmarks/results/retention.md); a drift budget is opt-in (`alignment_budget`).
    "recommended": dict(interpolation="lerp", alignment_loss="nmse", alignment_weight=1.0, train_interpolation=False,
                        alignment_budget=None),
}
