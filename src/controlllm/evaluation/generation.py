"""Generation benchmarks: greedy answers (exact match on the last number, GSM8K-style) and chrF."""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .benchmarks import GenItem
from .common import _accepts, _device_of, _encode, _inference, _logits, _max_length, _pad_id, _right_pad  # noqa: F401
from .multiple_choice import _stderr


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string ("1,000.50" -> "1000.5", "$18." -> "18"), or None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_last_number(text: str) -> str | None:
    """The last number written in `text`, normalised with `normalize_number`, or None."""
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def exact_match(prediction: str, gold: str) -> bool:
    """Whether the last number in `prediction` equals the number `gold` (after normalisation)."""
    answer, target = extract_last_number(prediction), normalize_number(gold)
    return answer is not None and answer == target


def _cut_at_stop(text: str, stop: Iterable[str]) -> str:
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def _greedy(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: int | None, pad: int) -> torch.Tensor:
    """Greedy continuation of left-padded rows; uses `model.generate` when the model has it."""
    if hasattr(model, "generate"):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad, eos_token_id=eos)[:, ids.shape[1]:]
    # Without generate: recompute the whole sequence each step; positions skip the left padding.
    positions = _accepts(model, "position_ids")
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new_tokens):
        kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if positions else {}
        nxt = _logits(model, ids, mask, **kwargs)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        if eos is not None:
            done |= nxt == eos
        # Tokens after a row's EOS are discarded, so their mask value does not matter.
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(done.all()):
            break
    return torch.stack(new, 1)


def generate_answers(
    model: Any,
    tokenizer,
    items: Sequence[GenItem],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int | None = None,
    add_special_tokens: bool = False,
    progress: bool = True,
) -> dict:
    """Greedy answers to generation items, scored by exact match of the last number.

    Prompts are left-padded into batches of `batch_size` (cut on the left to leave room for
    `max_new_tokens`); each output is cut at the item's first stop string. Returns `exact_match`,
    `exact_match_stderr`, `n` and `predictions` (per item: `id`, `output`, `extracted`, `gold`,
    `correct`).
    """
    if not items:
        raise ValueError("no items to answer; load some with load_generation_benchmark")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must both be >= 1")
    room = _max_length(model, max_length) - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in {room + max_new_tokens} tokens")
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    encoded = [_encode(tokenizer, it.prompt, add_special_tokens)[-room:] for it in items]
    order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(items)
    device = _device_of(model)
    with _inference(model), tqdm(total=len(items), desc="generate", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, width - len(encoded[i]):] = 1
            new = _greedy(model, ids.to(device), mask.to(device), max_new_tokens, eos, pad)
            for row, i in enumerate(chunk):
                tokens = new[row].tolist()
                if eos is not None and eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                outputs[i] = _cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), items[i].stop)
            bar.update(len(chunk))
    predictions = []
    for item, out in zip(items, outputs):
        predictions.append({"id": item.id, "output": out, "extracted": extract_last_number(out), "gold": item.answer,
                            "correct": exact_match(out, item.answer)})
    n = len(items)
    em = sum(p["correct"] for p in predictions) / n
    return {"exact_match": em, "exact_match_stderr": _stderr(em, n), "n": n, "predictions": predictions}


def chrf(hypotheses: Sequence[str], references: Sequence[str], char_order: int = 6, beta: float = 2.0) -> float:
    """Corpus-level chrF (Popović 2015) on a 0-100 scale, as sacreBLEU's default CHRF.

    Character n-grams of orders 1..`char_order` with whitespace removed; n-gram counts are
    summed over the corpus, precision and recall averaged over the orders present in both
    sides, then combined as an F-beta score.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references; they must match")
    stats = [[0, 0, 0] for _ in range(char_order)]
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, char_order + 1):
            h = Counter(hyp[i: i + n] for i in range(len(hyp) - n + 1))
            r = Counter(ref[i: i + n] for i in range(len(ref) - n + 1))
            stats[n - 1][0] += sum(h.values())
            stats[n - 1][1] += sum(r.values())
            stats[n - 1][2] += sum((h & r).values())
    present = [(m / nh, m / nr) for nh, nr, m in stats if nh > 0 and nr > 0]
    if not present:
        return 0.0
    precision = sum(p for p, _ in present) / len(present)
    recall = sum(r for _, r in present) / len(present)
    if precision + recall == 0:
        return 0.0
    factor = beta ** 2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


# ----------------------------------------------------------------------------------------------
# Task runner
# ----------------------------------------------------------------------------------------------
