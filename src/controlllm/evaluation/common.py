"""What every kind of evaluation shares: running a model (any object returning logits) in inference
mode, padding, and encoding contexts and continuations as lm-evaluation-harness does."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch


def _device_of(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor) or logits.shape[:2] != input_ids.shape:
        raise TypeError(
            f"{type(model).__name__} returned {type(out).__name__}; expected logits of shape "
            f"(batch, seq, vocab) = {tuple(input_ids.shape)} + (vocab,), directly or as `.logits`"
        )
    return logits


@contextlib.contextmanager
def _inference(model: Any):
    """Eval mode (no dropout) and no autograd; restores the training flag afterwards."""
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _prefix_token_id(tokenizer) -> int:
    # As lm-evaluation-harness: BOS when the tokenizer has one, else EOS, starts an empty context.
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token, needed to score text from its first token")


def _max_length(model: Any, max_length: int | None) -> int:
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} is too small; allowed: >= 2")
        return max_length
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    # lm-evaluation-harness: trailing spaces of the context move to the continuation; the
    # continuation tokens are the tail of the tokenised whole, so merges across the seam count.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if context == "":
        return [_prefix_token_id(tokenizer)], _encode(tokenizer, continuation, add_special_tokens)
    whole = _encode(tokenizer, context + continuation, add_special_tokens)
    ctx = _encode(tokenizer, context, add_special_tokens)
    return ctx, whole[len(ctx):]


def _encode_request(tokenizer, context: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """`_encode_pair`, refusing a continuation that encodes to no tokens."""
    ctx_ids, cont_ids = _encode_pair(tokenizer, context, continuation, add_special_tokens)
    if not cont_ids:
        raise ValueError(f"continuation {continuation!r} after context {context[-40:]!r} encodes to no tokens; "
                         "nothing to score")
    return ctx_ids, cont_ids


def _accepts(model: Any, name: str) -> bool:
    try:
        params = inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
