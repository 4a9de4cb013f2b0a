"""The main job: teach SmolLM2-135M-Instruct Spanish with Control LLM and show what it kept.

Continued pre-training on the Reina-Valera 1909 Bible (public domain, Debian's
sword-text-sparv), then the retention dial chosen on validation texts for a stated forgetting
budget (`DEMO_MAX_KL`), then a table of the base, the trained and the dialled model: held-out
Spanish bits per character (the new skill), held-out general English bits per character
(fortunes, BSD licence), ARC-Easy accuracy and KL divergence from the base model on English text
(what it kept).
"""

from __future__ import annotations

import json
import os
import time

import torch

from .assets import LICENCES, fetch_bible, fetch_fortunes, load_pretrained
from .evaluation import heldout_loss, kl_to_reference, load_benchmark, score_multiple_choice
from .runs import load_model
from .dial import DialBudgetError, run_dial
from .training.train import TrainConfig, train

HELDOUT_EVERY = 25  # every 25th chapter is held out
# The demo's forgetting budget: the dialled model's KL to the base on English validation text.
DEMO_MAX_KL = 0.05


def spanish_chapters() -> tuple[list[str], list[str]]:
    """(training chapters, held-out chapters) of RV1909, each chapter one document."""
    chapters: dict[str, list[str]] = {}
    for ref, text in fetch_bible("sparv"):
        chapter = ref.rsplit(":", 1)[0]
        if text.strip():
            chapters.setdefault(chapter, []).append(text.strip())
    docs = [" ".join(verses) for verses in chapters.values()]
    train_docs = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != 0]
    heldout = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == 0]
    return train_docs, heldout


def english_texts(n: int) -> list[str]:
    """n general-English held-out texts: fortunes of at least 200 characters, in file order."""
    return [t for t in fetch_fortunes("fortunes") if len(t) >= 200][:n]


def measure(model, tokenizer, spanish: list[str], english: list[str], arc, reference=None, progress: bool = True) -> dict:
    """The demo's metrics for one model (each measurement shows a progress bar unless `progress=False`)."""
    result = {
        "spanish_bpc": heldout_loss(model, tokenizer, spanish, seq_len=256, batch_size=8, progress=progress)["bpc"],
        "english_bpc": heldout_loss(model, tokenizer, english, seq_len=256, batch_size=8, progress=progress)["bpc"],
    }
    mc = score_multiple_choice(model, tokenizer, arc, batch_size=16, progress=progress, desc="ARC-Easy")
    result["arc_easy_acc"] = mc["acc"]
    result["arc_easy_acc_stderr"] = mc["acc_stderr"]
    result["english_kl_to_base"] = (
        0.0 if reference is None else kl_to_reference(model, reference, tokenizer, english, seq_len=256, progress=progress)
    )
    return result


def _sample(model, tokenizer, prompt: str, n: int = 24) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def format_table(before: dict, after: dict, dialled: dict | None = None, dial_value: float | None = None) -> str:
    """The demo's markdown table: base, trained and (when given) dialled, with the changes from the base."""
    rows = [
        ("new skill: Spanish held-out bits/char (lower is better)", "spanish_bpc", "{:.3f}"),
        ("kept: English held-out bits/char (lower is better)", "english_bpc", "{:.3f}"),
        ("kept: ARC-Easy accuracy", "arc_easy_acc", "{:.3f}"),
        ("kept: KL to base on English text (nats/token)", "english_kl_to_base", "{:.4f}"),
    ]
    if dialled is None:
        lines = ["| metric | base | Control LLM | change |", "|---|---|---|---|"]
    else:
        lines = [f"| metric | base | Control LLM | change | dialled (s = {dial_value:g}) | change |",
                 "|---|---|---|---|---|---|"]
    for label, key, fmt in rows:
        b, a = before[key], after[key]
        line = f"| {label} | {fmt.format(b)} | {fmt.format(a)} | {a - b:+.4f} |"
        if dialled is not None:
            d = dialled[key]
            line += f" {fmt.format(d)} | {d - b:+.4f} |"
        lines.append(line)
    return "\n".join(lines)


def run_demo(output: str = "runs/demo", max_steps: int | None = None, quick: bool = False) -> dict:
    """Run the whole demo and print the before/after table; results also go to output/demo.{json,md}."""
    start = time.time()
    steps = max_steps or (4 if quick else 90)
    n_eval = 8 if quick else 32
    os.makedirs(output, exist_ok=True)
    print("[1/5] loading SmolLM2-135M-Instruct and the corpora (RV1909 Spanish, English fortunes, ARC-Easy)")
    model, tokenizer = load_pretrained(None)
    train_docs, heldout = spanish_chapters()
    data_path = os.path.join(output, "train_es.txt")
    with open(data_path, "w") as f:
        f.write("\n\n".join(train_docs))
    spanish = heldout[:n_eval]
    english = english_texts(n_eval)
    arc = load_benchmark("arc_easy", limit=20 if quick else 100)

    print("[2/5] measuring the base model")
    model.eval()
    before = measure(model, tokenizer, spanish, english, arc)
    prompt = "En el principio"
    before_sample = _sample(model, tokenizer, prompt)

    print(f"[3/5] Control LLM continued pre-training on Spanish: {steps} steps of 4 x 128 tokens")
    cfg = TrainConfig(data=data_path, output=os.path.join(output, "run"), task="cpt", method="control",
                      max_steps=steps, batch_size=4, seq_len=128, lr=5e-4, num_expanded_layers=8,
                      preset="recommended",
                      save_steps=max(steps // 2, 1), logging_steps=5, resume=True)
    result = train(cfg, model=model, tokenizer=tokenizer)
    control = result.model

    print("[4/5] measuring the trained model")
    control.eval()
    after = measure(control, tokenizer, spanish, english, arc, reference="base")
    after_sample = _sample(control, tokenizer, prompt)

    # The dial is chosen on validation texts kept apart from the ones the table is measured on.
    print(f"[5/5] dialling the run back to KL <= {DEMO_MAX_KL} on English validation text (controlllm dial)")
    learn_path, keep_path = os.path.join(output, "dial_learn_es.txt"), os.path.join(output, "dial_keep_en.txt")
    learn_texts = heldout[n_eval: n_eval + (2 if quick else 8)]
    with open(learn_path, "w") as f:  # a smoke run scores the first 800 characters of two chapters
        f.write("\n\n".join(t[:800] for t in learn_texts) if quick else "\n\n".join(learn_texts))
    with open(keep_path, "w") as f:
        f.write("\n\n".join(english_texts(n_eval + (4 if quick else 24))[n_eval:]))
    try:
        dial = run_dial(cfg.output, os.path.join(output, "dialled"), learn_data=learn_path, keep_data=keep_path,
                        max_kl=DEMO_MAX_KL, values=(0.5, 1.0) if quick else (0.25, 0.5, 0.75, 1.0),
                        refine=1 if quick else 2)
    except DialBudgetError as err:  # nothing learned within the budget: the rollback is the answer
        print(f"note: {err}; rolling back to the base (s = 0)")
        dial = run_dial(cfg.output, os.path.join(output, "dialled"), value=0.0)
    dialled_model, _, _ = load_model(os.path.join(output, "dialled"))
    dialled_model.eval()
    dialled = measure(dialled_model, tokenizer, spanish, english, arc, reference="base")
    seconds = time.time() - start

    table = format_table(before, after, dialled, dial["value"])
    report = {
        "before": before, "after": after, "steps": steps, "tokens_trained": steps * 4 * 128,
        "trainable_parameters": result.trainable_parameters, "total_parameters": result.total_parameters,
        "expanded_layers": sorted(control.blocks), "seconds": round(seconds, 1),
        "samples": {"prompt": prompt, "base": before_sample, "control": after_sample},
        "dialled": dialled, "dial": {"max_kl": DEMO_MAX_KL, "value": dial["value"], "chosen_on_validation": dial["chosen"]},
        "data": {"train_chapters": len(train_docs), "heldout_spanish_texts": len(spanish),
                 "english_texts": len(english), "arc_easy_items": len(arc)},
        "licences": {"sparv": LICENCES.get("sparv"), "fortunes": LICENCES.get("fortunes")},
    }
    with open(os.path.join(output, "demo.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output, "demo.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    print()
    print(f"'{prompt}' -> base: {before_sample!r}")
    print(f"'{prompt}' -> Control LLM: {after_sample!r}")
    print(f"trained {result.trainable_parameters:,d} of {result.total_parameters:,d} parameters "
          f"({len(control.blocks)} expanded layers) in {result.seconds:.0f} s; demo total {seconds:.0f} s")
    print(f"delta saved in {result.final}; dialled model (s = {dial['value']:g}) in {output}/dialled; "
          f"results in {output}/demo.json")
    return report

