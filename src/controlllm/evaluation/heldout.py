"""Held-out loss and KL to a reference (the base), on text or chats, through `controlllm.evaluation.scoring`, and
plain-text files read as documents."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Sequence

import torch

from .benchmarks import _take
from .common import _device_of, _inference, _logits, _pad_id  # noqa: F401


def heldout_loss(
    model: Any, tokenizer, texts: Sequence[Any], seq_len: int = 256, batch_size: int = 8, progress: bool = True
) -> dict:
    """Language-modelling loss on held-out texts or chats (`controlllm.evaluation.scoring`, the dial's scorer).

    Plain texts are scored on every token from the first (after a BOS, or EOS if there is no
    BOS); chats, rendered and labelled as SFT training does, on their answer tokens only. Rows
    are cut into windows of `seq_len` predicted tokens; windows never span two texts. Returns
    `nll` (mean token negative log-likelihood in nats), `ppl` = exp(nll), `bpc` (bits per
    character: summed NLL / ln 2 / characters scored: the whole texts, or the answers of chats),
    `tokens` and `characters`.
    """
    from .scoring import score_texts

    scores = score_texts(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, progress=progress,
                         desc="held-out loss")
    nll = scores.mean_nll
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "bpc": scores.bpc, "tokens": sum(scores.tokens),
            "characters": sum(scores.characters)}


def _reference_fn(model: Any, reference: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(reference, str):
        if reference != "base":
            raise ValueError(f"reference={reference!r} is not allowed; use 'base', a model or a callable")
        if not hasattr(model, "disable_control"):
            raise ValueError(f"reference='base' needs a model with disable_control(); {type(model).__name__} has none")

        def base(ids, mask):
            with model.disable_control():
                return _logits(model, ids, mask)

        return base
    if not callable(reference):
        raise TypeError(f"reference must be 'base', a model or a callable, not {type(reference).__name__}")
    return lambda ids, mask: _logits(reference, ids, mask)


def kl_to_reference(
    model: Any,
    reference: Any,
    tokenizer,
    texts: Sequence[Any],
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean KL(reference || model) of the next-token distributions, in nats, computed in fp32.

    The same positions and windows as `heldout_loss` (and the dial's KL, one implementation in
    `controlllm.evaluation.scoring`): every position that predicts a scored token, i.e. every text token of
    plain texts, the answer tokens of chats; never padding, nor the position after a text's last
    token. `reference` is another model, a callable `(input_ids, attention_mask) -> logits`, or
    the string "base": the same `model` inside `model.disable_control()`, so the frozen base needs
    no second copy of the weights.
    """
    from .scoring import score_texts

    ref = _reference_fn(model, reference)
    ref_training = getattr(reference, "training", False) if isinstance(reference, torch.nn.Module) else False
    if ref_training:
        reference.eval()
    try:
        scores = score_texts(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, reference=ref,
                             progress=progress, desc="KL to reference")
    finally:
        if ref_training:
            reference.train()
    return scores.mean_kl


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def load_texts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Texts from a file: one per line of a `.jsonl` file (its "text" field), else the
    paragraphs of a plain-text file (separated by blank lines). Keeps the first `limit`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no text file at {path!r}")
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            texts = [json.loads(line)["text"] for line in handle if line.strip()]
        else:
            texts = [p.strip() for p in re.split(r"\n\s*\n", handle.read()) if p.strip()]
    return _take(texts, limit)
