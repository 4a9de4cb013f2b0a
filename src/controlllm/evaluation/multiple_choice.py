"""Multiple choice: log-likelihoods of continuations (`acc` / `acc_norm` as lm-evaluation-harness
computes them), with requests packed into shared rows where the model allows."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .benchmarks import MCItem
from .common import _accepts, _device_of, _encode_request, _inference, _logits, _max_length, _pad_id, _prefix_token_id, _right_pad  # noqa: F401


def _score_continuation(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """Summed fp32 log-probability of `cont` under `logits` (one row per token of `cont`), and
    whether every token is the greedy choice."""
    logprobs = logits.float().log_softmax(-1)
    target = torch.tensor(cont, device=logprobs.device)
    total = logprobs.gather(-1, target[:, None]).sum().item()
    return float(total), bool((logprobs.argmax(-1) == target).all().item())


# ----------------------------------------------------------------------------------------------
# Log-likelihood and multiple choice
# ----------------------------------------------------------------------------------------------


def loglikelihood(
    model: Any,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = False,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """Log-probability of each continuation given its context, as lm-evaluation-harness computes it.

    Returns, per (context, continuation) request and in request order, the summed fp32
    log-probability of the continuation tokens and whether they are all the greedy choice.
    Requests are sorted by length, right-padded into batches of `batch_size` and run with one
    forward per batch; inputs longer than `max_length` (default: the model's context size) are
    cut on the left.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed; use an integer >= 1")
    limit = _max_length(model, max_length)
    encoded = []
    for ctx, cont in requests:
        ctx_ids, cont_ids = _encode_request(tokenizer, ctx, cont, add_special_tokens)
        full = (ctx_ids + cont_ids)[-(limit + 1):]
        encoded.append((full[:-1], cont_ids[-len(full) + 1:] if len(cont_ids) >= len(full) else cont_ids))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    device, pad = _device_of(model), _pad_id(tokenizer)
    with _inference(model), tqdm(total=len(encoded), desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            ids, mask = _right_pad([encoded[i][0] for i in chunk], pad, device)
            logits = _logits(model, ids, mask)
            for row, i in enumerate(chunk):
                inp, cont = encoded[i]
                results[i] = _score_continuation(logits[row, len(inp) - len(cont): len(inp)], cont)
            bar.update(len(chunk))
    return results  # type: ignore[return-value]


def _packable(model: Any, longest: int, limit: int) -> bool:
    """Whether choices can share one context pass: a torch model with a config whose attention
    takes a custom 4D mask (eager or sdpa), accepts `position_ids`, and no sliding window shorter
    than the packed rows."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or longest > limit:
        return False
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa") or not _accepts(model, "position_ids"):
        return False
    window = getattr(config, "sliding_window", None)
    return not (isinstance(window, int) and 0 < window < longest)


def _packed_rows(model: Any, rows: list[tuple[list[int], list[list[int]]]], batch_size: int, pad: int,
                 progress: bool, desc: str) -> list[list[tuple[float, bool]]]:
    """Score every row (context ids, [continuation ids, ...]) with one forward pass per row.

    A row is laid out as context + each continuation but its last token; a 4D mask lets each
    continuation see the context and itself only, and position ids restart after the context for
    every continuation, so each continuation is scored exactly as if it followed the context alone.
    """
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    layouts = []
    for ctx, conts in rows:
        ids, pos, seg = list(ctx), list(range(len(ctx))), [0] * len(ctx)
        targets = []  # per continuation: (positions whose logits predict it, its token ids)
        for j, cont in enumerate(conts, start=1):
            start = len(ids)
            ids += cont[:-1]
            pos += range(len(ctx), len(ctx) + len(cont) - 1)
            seg += [j] * (len(cont) - 1)
            targets.append(([len(ctx) - 1] + list(range(start, start + len(cont) - 1)), cont))
        layouts.append((ids, pos, seg, targets))
    order = sorted(range(len(rows)), key=lambda i: -len(layouts[i][0]))
    results: list[list[tuple[float, bool]] | None] = [None] * len(rows)
    with _inference(model), tqdm(total=len(rows), desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            width = max(len(layouts[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            pos = torch.zeros((len(chunk), width), dtype=torch.long)
            seg = torch.full((len(chunk), width), -1, dtype=torch.long)
            for r, i in enumerate(chunk):
                n = len(layouts[i][0])
                ids[r, :n], pos[r, :n], seg[r, :n] = (torch.tensor(x, dtype=torch.long) for x in layouts[i][:3])
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
            allowed = (causal & same & (seg[:, None, :] >= 0)) | torch.eye(width, dtype=torch.bool)
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            logits = _logits(model, ids.to(device), mask[:, None].to(device), position_ids=pos.to(device))
            for r, i in enumerate(chunk):
                results[i] = [_score_continuation(logits[r, where], cont) for where, cont in layouts[i][3]]
            bar.update(len(chunk))
    return results  # type: ignore[return-value]


def _stderr(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def _argmax(values: Sequence[float]) -> int:
    # First maximum wins ties, as numpy.argmax in lm-evaluation-harness.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _packed_choice_scores(model: Any, tokenizer, items: Sequence[MCItem], batch_size: int, max_length: int | None,
                          add_special_tokens: bool, progress: bool, desc: str) -> list[list[float]] | None:
    """Choice log-likelihoods per item with shared contexts, or None when the model cannot take packed rows."""
    rows: list[tuple[list[int], list[list[int]]]] = []
    owners: list[list[tuple[int, int]]] = []  # per item: (row, index in row) for each choice
    for item in items:
        where, by_context = [], {}
        for ctx, cont in item.requests():
            ctx_ids, cont_ids = _encode_request(tokenizer, ctx, cont, add_special_tokens)
            key = tuple(ctx_ids)
            if key not in by_context:
                by_context[key] = len(rows)
                rows.append((ctx_ids, []))
            row = by_context[key]
            where.append((row, len(rows[row][1])))
            rows[row][1].append(cont_ids)
        owners.append(where)
    packed = [len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in rows]
    unpacked = sum(len(ctx) + len(c) - 1 for ctx, conts in rows for c in conts)
    # A 4D mask costs more per token than a causal one: pack only when it saves a third of the tokens.
    if unpacked < 1.5 * sum(packed) or not _packable(model, max(packed), _max_length(model, max_length)):
        return None
    scores = _packed_rows(model, rows, batch_size, _pad_id(tokenizer), progress, desc)
    return [[scores[r][j][0] for r, j in where] for where in owners]


def score_multiple_choice(
    model: Any,
    tokenizer,
    items: Sequence[MCItem],
    batch_size: int = 16,
    progress: bool = True,
    max_length: int | None = None,
    add_special_tokens: bool = False,
    desc: str = "multiple choice",
    share_context: bool = True,
) -> dict:
    """Accuracy on multiple-choice items by comparing choice log-likelihoods.

    With `share_context` (the default) the choices of an item that share their context are scored
    in one row (the context is run once; a 4D mask keeps the choices apart) when the model allows
    it (see `_packable`); otherwise, and for models that do not, every choice is its own request
    as in lm-evaluation-harness. Both give the same log-likelihoods up to float rounding.

    Returns `acc` (argmax of the summed log-likelihood), `acc_norm` (argmax of log-likelihood
    divided by the number of characters of the choice, as lm-evaluation-harness), their
    standard errors sqrt(p (1 - p) / (n - 1)), `n`, and `predictions`: one dict per item with
    `id`, `gold`, `pred`, `pred_norm`, `loglikelihoods`, for paired comparisons between models.
    """
    if not items:
        raise ValueError("no items to score; load some with load_benchmark")
    per_item = _packed_choice_scores(model, tokenizer, items, batch_size, max_length, add_special_tokens,
                                     progress, desc) if share_context else None
    if per_item is None:
        requests, owners = [], []
        for k, item in enumerate(items):
            for req in item.requests():
                requests.append(req)
                owners.append(k)
        scores = loglikelihood(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                               add_special_tokens=add_special_tokens, progress=progress, desc=desc)
        per_item = [[] for _ in items]
        for k, (ll, _) in zip(owners, scores):
            per_item[k].append(ll)
    predictions, hits, hits_norm = [], 0, 0
    for item, lls in zip(items, per_item):
        pred = _argmax(lls)
        pred_norm = _argmax([ll / max(len(choice), 1) for ll, choice in zip(lls, item.choices)])
        hits += pred == item.gold
        hits_norm += pred_norm == item.gold
        predictions.append({"id": item.id, "gold": item.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls})
    n = len(items)
    acc, acc_norm = hits / n, hits_norm / n
    return {"acc": acc, "acc_stderr": _stderr(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": _stderr(acc_norm, n), "n": n, "predictions": predictions}


# ----------------------------------------------------------------------------------------------
# Held-out loss and drift from a reference
# ----------------------------------------------------------------------------------------------
