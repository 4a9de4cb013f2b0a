"""`ControlConfig`: which layers to expand, how to merge the branches, and how to align them."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

CONFIG_NAME = "control_config.json"

EXPAND_TYPES = ("concat", "stack", "hybrid")
INTERPOLATIONS = ("lerp", "dlerp", "dlerp_in", "slerp")
ALIGNMENT_LOSSES = ("mse", "nmse", "cosine", "none")


def _allowed(field_name: str, value, allowed) -> ValueError:
    return ValueError(f"ControlConfig.{field_name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


@dataclass
class ControlConfig:
    """Configuration of a Control LLM expansion (Wei et al. 2025, arXiv 2501.10979).

    Exactly one of `num_expanded_layers` / `expanded_layers` selects the layers. With N decoder
    layers and k = `num_expanded_layers`, layer i is expanded when (i + 1) % (N // k) == 0 (the last
    layer of each group of N // k); when N is not divisible by k only the first k such layers are
    taken, so the count is always exactly k.
    """

    expand_type: str = field(
        default="concat",
        metadata={"help": "'concat' (Control LLM: a trainable copy in parallel with each chosen block), "
                  "'stack' (LLaMA-Pro: an identity-initialised copy inserted after each chosen block), "
                  "'hybrid' (alternates stack and concat over the chosen blocks, starting with stack)."},
    )
    num_expanded_layers: int | None = field(
        default=8, metadata={"help": "How many layers to expand, evenly spaced. Not together with `expanded_layers`."}
    )
    expanded_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit layer indices to expand (0-based). Not together with `num_expanded_layers`."}
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
        default=True, metadata={"help": "Whether the interpolator's parameters are trained."}
    )
    alignment_loss: str = field(
        default="mse", metadata={"help": "Alignment (divergence) loss between branches: 'mse' (mean squared difference, "
                  "as the paper), 'nmse' (squared difference over the frozen branch's squared norm: scale-free), "
                  "'cosine' or 'none'."}
    )
    alignment_weight: float = field(
        default=1.0, metadata={"help": "Factor alpha of the alignment loss added to the LM loss."}
    )
    alignment_margin: float = field(
        default=0.0, metadata={"help": "Margin of the cosine alignment loss: relu(1 - margin - cos)."}
    )

    def __post_init__(self):
        if self.expand_type not in EXPAND_TYPES:
            raise _allowed("expand_type", self.expand_type, EXPAND_TYPES)
        if self.interpolation not in INTERPOLATIONS:
            raise _allowed("interpolation", self.interpolation, INTERPOLATIONS)
        if self.alignment_loss not in ALIGNMENT_LOSSES:
            raise _allowed("alignment_loss", self.alignment_loss, ALIGNMENT_LOSSES)
        if (self.num_expanded_layers is None) == (self.expanded_layers is None):
            raise ValueError(
                "ControlConfig needs exactly one of `num_expanded_layers` (a count, evenly spaced) and "
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
            layers = list(self.expanded_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(
                    f"ControlConfig.expanded_layers={self.expanded_layers!r} must be a non-empty list of "
                    "non-negative layer indices"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"ControlConfig.expanded_layers={self.expanded_layers!r} contains duplicates")
            self.expanded_layers = sorted(layers)
        for name in ("alignment_weight", "alignment_margin", "interpolation_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"ControlConfig.{name}={value!r} must be a finite number")
        if self.alignment_weight < 0:
            raise ValueError(f"ControlConfig.alignment_weight={self.alignment_weight!r} must be >= 0")
        if not 0.0 <= self.alignment_margin < 2.0:
            raise ValueError(f"ControlConfig.alignment_margin={self.alignment_margin!r} must be in [0, 2)")

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
        k = self.num_expanded_layers
        if k > num_layers:
            raise ValueError(
                f"ControlConfig.num_expanded_layers={k} is more than the model's {num_layers} decoder layers "
                f"(allowed: 1..{num_layers})"
            )
        split = num_layers // k
        return [i for i in range(num_layers) if (i + 1) % split == 0][:k]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ControlConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown ControlConfig fields {unknown}; allowed: {sorted(known)}")
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
