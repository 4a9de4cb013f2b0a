"""The options of a training run: `TrainConfig`, the one source of `controlllm train`'s flags.

Kept apart from the training loop (no torch or transformers import) so the CLI builds its parser,
and `--help` answers, without loading the training stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import ControlConfig

METHODS = ("control", "full", "lora", "stack", "freeze")
TASKS = ("cpt", "sft")
# The learning rate a run gets when --lr is not given: what validation chose in the frontier benchmark
# (SmolLM2-135M, docs/results.md) per method and task. Control in SFT: 3e-4, the paper-csft family's
# choice, where the recommended family's validation tied 5e-5 and 1e-3 (5e-5 learned little on a
# newcomer's FAQ data). LoRA in CPT chose the top of its grid (3e-3).
DEFAULT_LR = {("full", "cpt"): 1e-4, ("full", "sft"): 3e-5, ("control", "cpt"): 1e-3, ("control", "sft"): 3e-4,
              ("lora", "cpt"): 3e-3, ("lora", "sft"): 1e-3, ("stack", "cpt"): 1e-3, ("stack", "sft"): 3e-4,
              ("freeze", "cpt"): 3e-4, ("freeze", "sft"): 1e-4}


def default_expanded_count(num_layers: int) -> int:
    """How many of `num_layers` layers a run expands when not told: N / 4, halves rounded up (8 of
    SmolLM2's 30 layers, the paper's 8 of 32)."""
    return max(1, int(num_layers / 4 + 0.5))


@dataclass
class TrainConfig:
    """Arguments of a training run (the CLI's flags, same names)."""

    data: str | None = field(default=None, metadata={"help": "Training data: .txt / .jsonl (cpt) or chat .jsonl (sft)."})
    output: str = field(default="runs/control", metadata={"help": "Run folder: checkpoints, metrics.jsonl, final/."})
    model: str | None = field(default=None, metadata={"help": "Model folder or .gguf file; default SmolLM2-135M-Instruct."})
    task: str = field(default="cpt", metadata={"help": "'cpt' (raw text, packed) or 'sft' (chat, assistant-only loss)."})
    method: str = field(default="control", metadata={"help": "'control', 'full', 'lora', 'stack' or 'freeze'."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data of the same format, for eval loss."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per device per step."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence (cpt block size / sft truncation)."})
    lr: float | None = field(default=None, metadata={
        "help": "Peak learning rate (linear warmup, cosine decay); default: per method and task, the rates the "
                "frontier benchmark's validation chose (training.options.DEFAULT_LR); `controlllm compare` chooses "
                "on your data."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps used for warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    preset: str | None = field(default=None, metadata={
        "help": "Control recipe to start from: 'recommended', 'paper-cpt' or 'paper-csft' (flags below override it; "
                "default: ControlConfig's defaults)."})
    num_expanded_layers: int | None = field(default=None, metadata={"help": "Layers to expand (control/stack/freeze); default N / 4 rounded (8 of 30, 8 of 32)."})
    expanded_layers: list[int] | None = field(default=None, metadata={"help": "Explicit layer indices instead of a count."})
    layer_placement: str | None = field(default=None, metadata={"help": "'even' (over the whole depth) or 'group_end'."})
    interpolation: str | None = field(default=None, metadata={"help": "'lerp', 'dlerp', 'dlerp_in' or 'slerp'."})
    interpolation_init: float | None = field(default=None, metadata={"help": "Initial interpolation logit (0 -> w = 0.5)."})
    train_interpolation: bool | None = field(default=None, metadata={"help": "Train the interpolation weights."})
    gate_norm: bool | None = field(default=None, metadata={"help": "Normalise the dlerp gate's input per token."})
    interpolation_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the interpolators' parameters (default: --lr)."})
    alignment_loss: str | None = field(default=None, metadata={
        "help": "'nmse' (scale-free: over the frozen branch's squared norm), 'mse' (as the paper), 'cosine' or 'none'."})
    alignment_weight: float | None = field(default=None, metadata={"help": "Weight of the alignment loss (no budget)."})
    alignment_margin: float | None = field(default=None, metadata={"help": "Margin of the cosine alignment loss."})
    alignment_budget: float | None = field(default=None, metadata={
        "help": "Per-layer drift budget in units of the alignment loss, the logged drift/{i} (nmse: e.g. 0.01; cosine: "
                "0.5 (1 - margin - cos)^2, e.g. 0.0005); replaces the fixed weight by adapted multipliers."})
    alignment_budget_lr: float | None = field(default=None, metadata={"help": "Dual-ascent step of the budget multipliers."})
    mix_data: str | None = field(default=None, metadata={
        "help": "General data mixed into training, any method: its examples are interleaved with the training data "
                "(kept in the order of the run without mixing) up to --mix-ratio of the trained tokens; text mixes into "
                "SFT as documents."})
    mix_ratio: float = field(default=0.1, metadata={"help": "Share of trained (label) tokens taken from --mix-data."})
    keep_data: str | None = field(default=None, metadata={
        "help": "After training, dial the run back (controlllm dial) to the budget below on this data of what to keep; "
                "the new skill is measured on --eval-data; the dialled model goes to OUTPUT/dialled."})
    max_kl: float | None = field(default=None, metadata={"help": "Dial budget: KL to the base on --keep-data (nats/token)."})
    max_keep_increase: float | None = field(default=None, metadata={
        "help": "Dial budget: bits/char increase on --keep-data."})
    quantize_base: str | None = field(default=None, metadata={
        "help": "Keep the frozen base in bitsandbytes '4bit' (nf4) or '8bit' (int8): method control (each copy built "
                "from the dequantised weights) or lora (QLoRA). Embeddings and LM head stay full precision."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (method lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (method lora)."})
    copy_rank: int | None = field(default=None, metadata={
        "help": "Low-rank copies (method control): each copy is its frozen layer, shared (and quantised with "
                "--quantize-base), plus a trainable rank-r update of its linear layers; no full copy is made. "
                "Default: full copies."})
    copy_alpha: float | None = field(default=None, metadata={
        "help": "Scale alpha of the low-rank copies' update (alpha / r) B A; default 2 x --copy-rank."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept while training."})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "Keep the checkpoints (weights and optimizer state) once the run has finished; without it they are "
                "removed when final/ is written, and a finished run is continued as a new stage (--model RUN)."})
    logging_steps: int = field(default=5, metadata={"help": "Log every N steps."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation and data order."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete checkpoint in --output."})
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16 autocast."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    max_eval_samples: int | None = field(default=64, metadata={"help": "Cap on eval sequences."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not supported; allowed: {', '.join(METHODS)}")
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is not supported; allowed: {', '.join(TASKS)}")
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "save_steps", "logging_steps", "lora_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.lr is None and self.method in METHODS and self.task in TASKS:
            self.lr = DEFAULT_LR[(self.method, self.task)]
        for name in ("lr", "interpolation_lr"):
            value = getattr(self, name)
            if name == "lr" or value is not None:
                if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")
        if self.num_expanded_layers is not None and self.expanded_layers is not None:
            raise ValueError("give either --num-expanded-layers or --expanded-layers, not both")
        if isinstance(self.mix_ratio, bool) or not isinstance(self.mix_ratio, (int, float)) \
                or not 0.0 < self.mix_ratio < 1.0:
            raise ValueError(f"--mix-ratio must be a number in (0, 1), got {self.mix_ratio!r}")
        budget = [n for n in ("max_kl", "max_keep_increase") if getattr(self, n) is not None]
        for name in budget:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name == "max_kl" and value == 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number "
                                 f"{'> 0' if name == 'max_kl' else '>= 0'}, got {value!r} (a budget of KL 0 is the base "
                                 "model itself: to roll back, dial the run with --value 0)")
        if self.keep_data is not None and (not budget or self.eval_data is None):
            raise ValueError("--keep-data dials the run after training: it needs --max-kl or --max-keep-increase, and "
                             "--eval-data (the new skill's held-out data)")
        if budget and self.keep_data is None:
            raise ValueError(f"--{budget[0].replace('_', '-')} is a dial budget: give --keep-data with it")
        if self.quantize_base is not None and self.method in ("full", "freeze"):
            raise ValueError(f"--quantize-base {self.quantize_base} keeps the base frozen in {self.quantize_base}; method "
                             f"{self.method!r} trains the base's own weights. Use it with --method control or lora")
        if self.copy_rank is not None and self.method != "control":
            raise ValueError(f"--copy-rank {self.copy_rank} makes low-rank Control copies: use it with --method control, "
                             f"not {self.method!r}")
        # Validate the Control options early (named errors before anything loads).
        self.control_config(num_layers=None)

    def control_config(self, num_layers: int | None) -> ControlConfig:
        """The ControlConfig of this run for a model with `num_layers` layers: the preset (or
        ControlConfig's defaults), overridden by every Control flag that was given."""
        from ..config import PRESETS

        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not supported; allowed: {', '.join(PRESETS)}")
        values = dict(PRESETS[self.preset]) if self.preset else {}
        for name in CONTROL_FIELDS:
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        if self.expanded_layers is None and self.num_expanded_layers is None:
            values["num_expanded_layers"] = default_expanded_count(num_layers or 4)
        return ControlConfig(expand_type="stack" if self.method == "stack" else "concat", **values)


# TrainConfig fields passed on to ControlConfig when given.
CONTROL_FIELDS = ("num_expanded_layers", "expanded_layers", "layer_placement", "interpolation", "interpolation_init",
                  "train_interpolation", "gate_norm", "alignment_loss", "alignment_weight", "alignment_margin",
                  "alignment_budget", "alignment_budget_lr", "quantize_base", "copy_rank", "copy_alpha")
