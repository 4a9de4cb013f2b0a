"""Watching a run: one compact console line per log record instead of the Trainer's raw dicts.

The per-layer values a Control run logs (`w/{i}`, `w_std/{i}`, `drift/{i}`, `multiplier/{i}`)
are summarised on the console by their mean over layers; every value, per layer, still goes to
`metrics.jsonl` and to TensorBoard, and `controlllm plot` draws them.
"""

from __future__ import annotations

import re

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

_PER_LAYER = re.compile(r"^(w|w_std|drift|multiplier)/(\d+)$")


def per_layer(logs: dict, name: str) -> dict[int, float]:
    """{layer index: value} of the per-layer metric `name` ('w', 'w_std', 'drift', 'multiplier') in a record."""
    found = {}
    for key, value in logs.items():
        match = _PER_LAYER.match(key)
        if match and match.group(1) == name and isinstance(value, (int, float)):
            found[int(match.group(2))] = float(value)
    return found


def _number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def format_record(logs: dict, step: int, max_steps: int | None = None) -> str | None:
    """One human-readable line for a Trainer log record, or None for records with nothing to show.

    Training records: `step 20/100 | loss 2.871 | lm 2.861 | align 0.0021 | w 0.50 | drift 3.1e-04 |
    grad 1.9 | lr 9.5e-05` (w, drift and multiplier are means over the expanded layers; `w` also
    accepts the older `w_mean`). Evaluation records: `step 50/100 | eval loss 2.95 | ppl 19.1`.
    The end-of-training summary: `done | 100 steps in 312 s | train loss 2.95`.
    """
    where = f"step {step}/{max_steps}" if max_steps else f"step {step}"
    parts = [where]
    if "train_runtime" in logs:
        text = f"done | {step} steps in {logs['train_runtime']:.0f} s"
        if "train_loss" in logs:
            text += f" | train loss {_number(float(logs['train_loss']))}"
        return text
    if "eval_loss" in logs:
        parts.append(f"eval loss {_number(float(logs['eval_loss']))}")
        if "eval_perplexity" in logs:
            parts.append(f"ppl {_number(float(logs['eval_perplexity']), 3)}")
        return " | ".join(parts)
    if "loss" not in logs:
        return None
    parts.append(f"loss {_number(float(logs['loss']))}")
    if "lm_loss" in logs:
        parts.append(f"lm {_number(float(logs['lm_loss']))}")
    if "alignment_loss" in logs:
        parts.append(f"align {_number(float(logs['alignment_loss']), 2)}")
    weights = per_layer(logs, "w")
    if weights:
        parts.append(f"w {sum(weights.values()) / len(weights):.2f}")
    elif "w_mean" in logs:
        parts.append(f"w {float(logs['w_mean']):.2f}")
    for name, label in (("drift", "drift"), ("multiplier", "mult")):
        values = per_layer(logs, name)
        if values:
            parts.append(f"{label} {_number(sum(values.values()) / len(values), 2)}")
    if "grad_norm" in logs and logs["grad_norm"] is not None:
        parts.append(f"grad {_number(float(logs['grad_norm']), 2)}")
    if "learning_rate" in logs:
        parts.append(f"lr {float(logs['learning_rate']):.1e}")
    return " | ".join(parts)


class CompactProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with each log record written above it as one `format_record` line."""

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        # The Trainer writes the checkpoint right after this step: say so, since writing can take a while.
        if control.should_save and self.training_bar is not None:
            self.training_bar.set_postfix_str(f"writing checkpoint-{state.global_step}", refresh=True)

    def on_save(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.set_postfix_str("", refresh=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_record(logs, state.global_step, state.max_steps)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


def use_compact_console(trainer, progress: bool = True) -> None:
    """Replace the Trainer's console output (raw dicts) by a progress bar with compact lines;
    `progress=False` prints nothing (metrics.jsonl and TensorBoard still get every record)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(CompactProgressCallback())


__all__ = ["CompactProgressCallback", "format_record", "per_layer", "use_compact_console"]
