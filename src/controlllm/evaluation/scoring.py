"""Held-out scoring, one implementation for `eval` and the dial: loss, bits/char and KL(reference || model).

Data is either plain texts (continued pre-training: every token is scored, after a BOS, or EOS
when the tokenizer has no BOS) or chats (supervised fine-tuning: each conversation is rendered
and labelled exactly as `training.data.build_sft_dataset` does, and only the tokens SFT trains on,
the assistant answers with the end-of-turn marker closing each, are scored). Token rows are cut
into windows of `seq_len` predicted positions overlapping by one token, so every scored token is
predicted exactly once and no window sees another text.

A position counts when it predicts a scored token: the loss and the KL are summed over those
positions only (never over padding, prompts or the position after a text's last token), per text,
so callers can split or resample texts. Bits/char divide the summed loss by the characters of
the scored text: the whole text for plain texts, the answers' characters for chats.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import UserError

__all__ = ["ScoringData", "TextScores", "is_chats", "prepare", "read_scoring_data", "score_texts", "token_sums"]

IGNORE_INDEX = -100
LN2 = math.log(2.0)


class ScoringDataError(UserError, ValueError):
    """Data that cannot be scored: no text, no answer tokens, or a mix of texts and chats."""


def is_chats(data: Sequence[Any]) -> bool:
    """Whether `data` is a list of chats (each a list of {role, content} messages) rather than of strings."""
    kinds = {isinstance(d, str) for d in data}
    if len(kinds) > 1:
        raise ScoringDataError("the data mixes plain texts and chats; give one kind: strings, or lists of "
                               "{role, content} messages")
    if data and not isinstance(data[0], (str, list)):
        raise ScoringDataError(f"cannot score a {type(data[0]).__name__}; allowed: strings (plain text) or lists of "
                               "{role, content} messages (chats)")
    return bool(data) and not isinstance(data[0], str)


@dataclass
class ScoringData:
    """Token windows ready to score: `windows[i]` is up to seq_len + 1 token ids, `labels[i]` the
    ids its positions predict (-100 where not scored), `owner[i]` the index of its text, and
    `characters[t]` the scored characters of text t. `chats` says which kind the data was."""

    windows: list[list[int]]
    labels: list[list[int]]
    owner: list[int]
    characters: list[int]
    chats: bool

    @property
    def texts(self) -> int:
        return len(self.characters)

    def batches(self, pad_id: int, batch_size: int, device) -> Iterator[tuple[torch.Tensor, ...]]:
        """(input_ids, attention_mask, targets, owners) per batch of `batch_size` windows, longest first,
        right-padded; targets are -100 on padding and on positions that predict no scored token."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size={batch_size!r} is not allowed; use an integer >= 1")
        order = sorted(range(len(self.windows)), key=lambda i: -len(self.windows[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            width = max(len(self.windows[i]) - 1 for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for row, i in enumerate(chunk):
                n = len(self.windows[i]) - 1
                ids[row, :n] = torch.tensor(self.windows[i][:-1], dtype=torch.long)
                mask[row, :n] = 1
                targets[row, :n] = torch.tensor(self.labels[i], dtype=torch.long)
            owners = torch.tensor([self.owner[i] for i in chunk], dtype=torch.long)
            yield ids.to(device), mask.to(device), targets.to(device), owners


def _cut(ids: list[int], labels: list[int], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Windows of seq_len + 1 tokens overlapping by one; labels[j] is what position j - 1 predicts.
    Windows that predict no scored token are left out."""
    out = []
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start: start + seq_len + 1]
        targets = labels[start + 1: start + len(window)]
        if any(t != IGNORE_INDEX for t in targets):
            out.append((window, targets))
    return out


def _check_seq_len(seq_len) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"seq_len={seq_len!r} is not allowed; use an integer >= 1")


def prepare(tokenizer, data: Sequence[Any], seq_len: int = 256) -> ScoringData:
    """Tokenise plain texts or chats (see the module docstring) into windows of `seq_len` predicted tokens.

    Empty texts, and chats without an answer token, are left out (as training leaves them out);
    a `ScoringDataError` says so when nothing is left.
    """
    from .common import _encode, _prefix_token_id

    _check_seq_len(seq_len)
    data = list(data)
    chats = is_chats(data)
    windows, labels, owner, characters = [], [], [], []
    if chats:
        from ..training.data import FALLBACK_CHAT_TEMPLATE, _check_messages, _label_tokens, assistant_spans

        # The template and the labels exactly as build_sft_dataset makes them for training.
        template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        rows = []
        for i, chat in enumerate(data):
            chat = _check_messages(chat, f"conversation {i}")
            text, spans = assistant_spans(chat, tokenizer, template)
            if not spans:
                continue
            ids, marks = _label_tokens(text, spans, tokenizer)
            answers = sum(len(m["content"].strip()) for m in chat if m["role"] == "assistant")
            rows.append((ids, marks, answers))
    else:
        prefix = _prefix_token_id(tokenizer)
        rows = []
        for text in data:
            if text:
                ids = [prefix] + _encode(tokenizer, text, False)
                rows.append((ids, ids, len(text)))
    for ids, marks, chars in rows:
        cut = _cut(ids, marks, seq_len)
        if not cut:
            continue
        for window, targets in cut:
            windows.append(window)
            labels.append(targets)
            owner.append(len(characters))
        characters.append(max(chars, 1))
    if not windows:
        what = "chat with an assistant answer" if chats else "non-empty text"
        raise ScoringDataError(f"nothing to score: the data holds no {what} ({len(data)} records given)")
    return ScoringData(windows, labels, owner, characters, chats)


def token_sums(log_q: torch.Tensor, targets: torch.Tensor,
               log_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per row: the summed negative log-likelihood of the scored targets (log-probabilities
    `log_q`, fp32), the number of scored positions, and, with a reference's `log_p`, the summed
    KL(p || q); positions whose target is -100 (padding, prompts) count in none of them."""
    real = targets != IGNORE_INDEX
    picked = log_q.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    nll = torch.where(real, -picked, torch.zeros_like(picked)).sum(-1)
    kl = None
    if log_p is not None:
        per = (log_p.exp() * (log_p - log_q)).sum(-1)
        kl = torch.where(real, per, torch.zeros_like(per)).sum(-1)
    return nll, real.sum(-1), kl


@dataclass
class TextScores:
    """Per-text sums from `score_texts`: negative log-likelihood (nats), scored tokens, scored
    characters and, with a reference, KL (nats); the means over all texts as properties."""

    nll: list[float]
    tokens: list[int]
    characters: list[int]
    kl: list[float] | None = None
    chats: bool = False

    @property
    def mean_nll(self) -> float:
        return sum(self.nll) / sum(self.tokens)

    @property
    def bpc(self) -> float:
        return sum(self.nll) / LN2 / sum(self.characters)

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl is None else sum(self.kl) / sum(self.tokens)


def log_probs(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fp32 next-token log-probabilities of `model` on a right-padded batch."""
    from .common import _logits

    return _logits(model, ids, mask).float().log_softmax(-1)


def score_texts(model: Any, tokenizer, data: Sequence[Any] | ScoringData, seq_len: int = 256, batch_size: int = 8,
                reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                progress: bool = True, desc: str = "score") -> TextScores:
    """Score `model` on plain texts or chats (or data already `prepare`d): per-text loss sums and,
    with `reference` (a callable `(input_ids, attention_mask) -> logits`), KL(reference || model)
    summed over the same positions."""
    from tqdm.auto import tqdm

    from .common import _device_of, _inference, _pad_id

    prepared = data if isinstance(data, ScoringData) else prepare(tokenizer, data, seq_len)
    n = prepared.texts
    nll = torch.zeros(n, dtype=torch.float64)
    tokens = torch.zeros(n, dtype=torch.long)
    kl = torch.zeros(n, dtype=torch.float64) if reference is not None else None
    device = _device_of(model)
    with _inference(model), tqdm(total=len(prepared.windows), desc=desc, disable=not progress) as bar:
        for ids, mask, targets, owners in prepared.batches(_pad_id(tokenizer), batch_size, device):
            log_p = reference(ids, mask).float().log_softmax(-1) if reference is not None else None
            row_nll, row_tokens, row_kl = token_sums(log_probs(model, ids, mask), targets, log_p)
            nll.index_add_(0, owners, row_nll.double().cpu())
            tokens.index_add_(0, owners, row_tokens.cpu())
            if kl is not None:
                kl.index_add_(0, owners, row_kl.double().cpu())
            bar.update(len(owners))
    return TextScores(nll.tolist(), tokens.tolist(), list(prepared.characters),
                      kl.tolist() if kl is not None else None, prepared.chats)


def read_scoring_data(path: str | os.PathLike, limit: int | None = None) -> list[str] | list[list[dict]]:
    """What to score from a file, in the formats training reads: chats from a .jsonl of
    {"messages": [...]} or {"prompt", "response"} records (scored on the answers), plain texts
    from a .jsonl of {"text"} records or a text file (documents separated by blank lines).
    Keeps the first `limit` records."""
    from ..training.data import DataError, read_chat_records, read_text_records

    path = os.fspath(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit={limit!r} is not allowed; use None (all records) or an integer >= 1")
    if not os.path.isfile(path):
        raise DataError(f"{path!r} does not exist or is not a file")
    chats = False
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        first = json.loads(line)
                    except ValueError:
                        break  # the reader below names the line
                    chats = isinstance(first, dict) and "text" not in first
                    break
        records = read_chat_records(path) if chats else read_text_records(path)
    elif path.endswith(".txt"):
        records = read_text_records(path)
    else:  # any other text file: its paragraphs
        from .heldout import load_texts

        records = load_texts(path)
    return records[:limit] if limit is not None else records
