"""A run documents itself: the model card (README.md) written into `final/` and carried into merged folders.

The card says what the folder holds (a Control delta, a LoRA adapter or full weights), from which
base model (with the fingerprint of its frozen expanded layers), with which Control config, on which
data (paths, sizes, sha256), with which settings and stages, and the last evaluation results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from .config import CONFIG_NAME

CARD_NAME = "README.md"
# Training settings shown in the card, in this order (the rest stay in run_config.json).
SETTINGS = ("task", "method", "max_steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup_ratio",
            "weight_decay", "bf16", "gradient_checkpointing", "seed")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_rows(run_config: dict) -> list[str]:
    rows = []
    for key, label in (("data", "training"), ("eval_data", "evaluation")):
        path = run_config.get(key)
        if not path:
            continue
        if os.path.isfile(path):
            size = os.path.getsize(path)
            rows.append(f"| {label} | `{path}` | {size:,d} bytes | `{_sha256(path)[:16]}` |")
        else:
            rows.append(f"| {label} | `{path}` | (not found when the card was written) | |")
    return rows


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "`" + json.dumps(v) + "`" if isinstance(v, (list, dict)) else str(v)


def _table(mapping: dict, header=("setting", "value")) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in mapping.items()]
    return lines


def _stages_of_run(run_dir: str | None) -> list | None:
    # A multi-stage driver lists its stages in the run folder's run_config.json.
    path = os.path.join(run_dir or "", "run_config.json")
    if run_dir and os.path.isfile(path):
        with open(path) as f:
            try:
                saved = json.load(f)
                return saved.get("stages") or (saved.get("lineage") or {}).get("stages")
            except (json.JSONDecodeError, AttributeError):
                return None
    return None


def _last_evaluation(run_config: dict, metrics: dict | None) -> dict:
    if metrics:
        return dict(metrics)
    path = os.path.join(run_config.get("output") or "", "metrics.jsonl")
    last = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if any(k.startswith("eval_") for k in record):
                    last = record
    return last


def build_model_card(folder: str | os.PathLike, run_config: dict, metrics: dict | None = None,
                     holds: str | None = None) -> str:
    """The model card of the saved run in `folder`: markdown with a YAML header, from `run_config` (a
    TrainConfig as a dict; a `stages` list is shown as the stages of a multi-stage run), the files in
    `folder` (control_config.json gives the Control config and the base fingerprint) and `metrics`
    (the last evaluation; default: the last evaluation record of the run's metrics.jsonl). `holds`
    says what the folder holds when it is not the run's own files: 'merged' (a plain model folder) or
    'gguf' (a GGUF file)."""
    folder = os.fspath(folder)
    control = None
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            control = json.load(f)
    base = run_config.get("model") or "SmolLM2-135M-Instruct (the default model)"
    method = run_config.get("method", "control")
    kind = {"control": "a Control LLM delta", "stack": "a Control LLM delta (stack expansion)",
            "lora": "a LoRA adapter", "full": "full model weights", "freeze": "full model weights"}.get(method, method)
    dialled = run_config.get("dial") or {}
    at = f", dialled to s = {dialled['value']:g}" if dialled.get("value") is not None else ""
    trained = f"`controlllm train` ({run_config.get('task', 'cpt')}, method `{method}`{at})"
    if holds == "merged":
        what = (f"This folder holds a plain transformers model: {kind} trained with {trained} folded into the base "
                "model below (`controlllm merge`). It loads and serves like the base model, at its cost.")
    elif holds == "gguf":
        what = (f"This GGUF file holds {kind} trained with {trained}, folded into the base model below "
                "(`controlllm export`): a whole model for llama.cpp and Ollama.")
    else:
        what = (f"This folder holds {kind} trained with {trained} on top of the base model below; the base model "
                "itself is not included.")
    lines = ["---", "library_name: controlllm", f"base_model: {json.dumps(str(base))}",
             f"tags: [controlllm, control-llm, {run_config.get('task', 'cpt')}]", "---", "",
             f"# {os.path.basename(os.path.abspath(run_config.get('output') or folder))}", "", what, "",
             "## Base model", "", f"- path: `{base}`"]
    if control and control.get("base_model"):
        meta = control["base_model"]
        lines += [f"- {k}: `{meta[k]}`" for k in ("class", "model_type", "num_hidden_layers", "hidden_size", "vocab_size")
                  if k in meta]
        if meta.get("frozen_model_sha256"):
            lines.append(f"- fingerprint (sha256 of the whole frozen model): `{meta['frozen_model_sha256']}`; loading "
                         "the delta onto another base fails with an error")
        elif meta.get("frozen_sha256"):  # a delta of an earlier release
            lines.append(f"- fingerprint (sha256 of the frozen expanded layers): `{meta['frozen_sha256']}`; loading "
                         "the delta onto another base fails with an error")
    if control and control.get("control_config"):
        lines += ["", "## Control config", "", *_table(control["control_config"], ("field", "value"))]
    data = _data_rows(run_config)
    if data:
        lines += ["", "## Data", "", "| split | file | size | sha256 (first 16) |", "|---|---|---|---|", *data]
    settings = {k: run_config[k] for k in SETTINGS if k in run_config}
    if settings:
        lines += ["", "## Training settings", "", *_table(settings)]
    lineage = run_config.get("lineage") or {}
    stages = run_config.get("stages") or lineage.get("stages") or _stages_of_run(run_config.get("output"))
    if lineage.get("base_model") and len(lineage.get("stages") or []) > 1:
        lines += ["", f"Multi-stage run: stage 1 started from `{lineage['base_model']}`; each later stage froze the "
                  "previous stage's result, folded into plain weights."]
    if stages:
        lines += ["", "## Stages", ""]
        keys = sorted({k for s in stages if isinstance(s, dict) for k in s})
        lines += ["| stage | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for n, stage in enumerate(stages, 1):
            stage = stage if isinstance(stage, dict) else {"description": stage}
            lines.append(f"| {n} | " + " | ".join(_value(stage[k]) if k in stage else "" for k in keys) + " |")
    dial = run_config.get("dial")
    if dial:
        lines += ["", "## Retention dial", "",
                  f"This model is `{dial.get('source')}` turned back toward its base with `controlllm dial`: "
                  f"{dial.get('what')}, at s = {dial.get('value'):g} (s = 0 is the base model, s = 1 the trained run)."]
        chosen, budget = dial.get("chosen"), {k: v for k, v in (dial.get("budget") or {}).items() if v is not None}
        if budget:
            lines.append(f"Chosen as the value that gains most within {', '.join(f'{k} <= {v:g}' for k, v in budget.items())} "
                         f"on `{dial.get('keep_data')}` (new skill measured on `{dial.get('learn_data')}`).")
        if chosen:
            lines += ["", "Measured on this dialled model (s = " + f"{chosen['value']:g}):", "",
                      *_table({k: chosen[k] for k in ("value", "gain", "kl", "keep_increase", "learn_bpc", "keep_bpc")},
                              ("measure of the dialled model", "value"))]
        else:
            lines += ["", "The dialled model was not measured (the value was set by hand without data)."]
        if dial.get("points"):
            lines += ["", "Every value scored: `dial.md` (table), `dial.json`, `dial.png` (gain against forgetting)."]
        lines += ["", f"Roll back to the base: `controlllm dial --model {dial.get('source')} --value 0 --output ...`."]
    evaluation = {k: v for k, v in _last_evaluation(run_config, metrics).items() if k != "step"}
    lines += ["", "## Last evaluation of the trained run (s = 1, before the dial)" if dialled else "## Last evaluation", ""]
    lines += _table(evaluation, ("metric", "value")) if evaluation else ["No evaluation was run (no `--eval-data`)."]
    # The card is written into a temporary folder renamed at the end: name the run folder instead.
    where = run_config.get("output") or folder
    lines += ["", "## Use", "", "```bash", f"controlllm generate --model {where} --prompt \"...\""]
    if control:
        lines.append(f"controlllm merge --model {where} --output merged/   # a plain transformers model folder")
    lines.append("```")
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | os.PathLike, run_config: dict, metrics: dict | None = None) -> str:
    """Write `folder/README.md` (see `build_model_card`), atomically; returns its path."""
    path = os.path.join(os.fspath(folder), CARD_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(build_model_card(folder, run_config, metrics))
    os.replace(tmp, path)
    return path


def merged_card_text(run, fidelity: dict | None = None, holds: str = "merged") -> str:
    """The card of a run folded into plain weights (`controlllm.runs.Run`): what the merged folder or
    GGUF file is, from which run, with the merge's fidelity when measured. A base model: ''."""
    if run.kind == "base":
        return ""
    card = build_model_card(run.folder, run.record, None, holds=holds)
    if fidelity:
        lines = ["", "## Merge", "", "Folded by the run's recorded fold rule (`controlllm.runs`). Fidelity: KL of the "
                 "merged model's next-token distribution from the unmerged run's, on the check data:", "",
                 *_table(fidelity, ("measure", "value"))]
        card += "\n".join(lines) + "\n"
    return card


def write_merged_card(folder: str | os.PathLike, run, fidelity: dict | None = None) -> str:
    """Write the merged folder's README.md (`merged_card_text`); returns its path."""
    path = os.path.join(os.fspath(folder), CARD_NAME)
    with open(path, "w") as f:
        f.write(merged_card_text(run, fidelity))
    return path


__all__ = ["build_model_card", "merged_card_text", "write_merged_card", "write_model_card"]
