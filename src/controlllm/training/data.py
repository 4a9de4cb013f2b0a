"""Training data: read text or chat records, tokenise them, and batch them.

Two tasks are supported:

* ``"cpt"`` (continued pre-training): documents are tokenised, each followed by the eos
  token, concatenated and cut into fixed blocks of ``seq_len`` tokens; every token is a
  training target.
* ``"sft"`` (supervised fine-tuning): conversations are rendered with the tokenizer's chat
  template; only assistant tokens (with the end-of-turn marker closing each assistant turn)
  are training targets, everything else is labelled ``-100``.

Datasets yield dicts of ``input_ids``, ``attention_mask`` and ``labels`` (1-D LongTensors)
that :class:`DataCollator` right-pads into a batch for the Hugging Face ``Trainer``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import UserError

#: Label value ignored by the cross-entropy loss.
IGNORE_INDEX = -100

#: Tasks understood by :func:`load_dataset_for_task`.
TASKS = ("cpt", "sft")

#: Roles a chat message may have.
CHAT_ROLES = ("system", "user", "assistant", "tool")

#: Chat format used when a tokenizer has no chat template: one ``Role: content`` line per
#: message, with the eos token closing each assistant message, e.g.
#: ``"User: Hi\nAssistant: Hello!</s>\n"``; the generation prompt is ``"Assistant: "``.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


class DataError(UserError, ValueError):
    """A data file or the records in it cannot be used for training."""


# --------------------------------------------------------------------------- reading files


def _check_file(path: str | os.PathLike, allowed: Sequence[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise DataError(
            f"unsupported data file extension {suffix or '(none)'!r} for {path}; allowed: {', '.join(allowed)}"
        )
    return path


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value cut to `limit` characters, so an error about a huge line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _not_utf8(path: Path, lineno: int, err: UnicodeDecodeError, column: int) -> DataError:
    return DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{err.object[err.start]:02x} at column {column}); "
                     "save the file as UTF-8")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror or err}") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON-lines file."""
    for lineno, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _not_utf8(path, lineno, err, err.start + 1) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
        except RecursionError:  # e.g. thousands of nested brackets
            raise DataError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
        except ValueError as err:  # e.g. an integer of more digits than Python converts
            raise DataError(f"{path}:{lineno}: invalid JSON: {str(err)[:120]}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def read_text_records(path: str | os.PathLike) -> list[str]:
    """Read plain-text documents for continued pre-training.

    ``.txt``: documents separated by blank lines (a file without blank lines is one
    document). ``.jsonl``: one JSON object per line with a string ``text`` field.
    Whitespace-only documents are skipped.

    Raises:
        DataError: missing file, unsupported extension, malformed line, missing ``text``
            field, or no documents at all.
    """
    path = _check_file(path, (".txt", ".jsonl"))
    texts: list[str] = []
    if path.suffix.lower() == ".txt":
        data = _read_bytes(path)
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError as err:
            start = data.rfind(b"\n", 0, err.start) + 1
            raise _not_utf8(path, data.count(b"\n", 0, err.start) + 1, err, err.start - start + 1) from None
        texts = [doc.strip() for doc in re.split(r"\n[ \t\r\f\v]*\n", content) if doc.strip()]
    else:
        for lineno, record in _iter_jsonl(path):
            if "text" not in record:
                raise DataError(
                    f"{path}:{lineno}: record has no 'text' field (keys: {', '.join(sorted(record)) or 'none'}); "
                    "allowed: a JSON object with a string 'text' field"
                )
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field 'text' must be a string, got {type(text).__name__}")
            if text.strip():
                texts.append(text)
    if not texts:
        raise DataError(f"{path}: no documents found (the file is empty or holds only whitespace)")
    return texts


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {_short(message)}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: message {i} has role {_short(role)}; allowed: {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def read_chat_records(path: str | os.PathLike) -> list[list[dict]]:
    """Read conversations for supervised fine-tuning from a ``.jsonl`` file.

    Each line is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` or
    ``{"prompt": ..., "response": ...}`` (turned into a user and an assistant message, with
    an optional ``system`` string first). Roles must be one of :data:`CHAT_ROLES`.

    Raises:
        DataError: missing file, unsupported extension, malformed line, a record with
            neither form, or no records at all.
    """
    path = _check_file(path, (".jsonl",))
    conversations: list[list[dict]] = []
    for lineno, record in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in record:
            conversations.append(_check_messages(record["messages"], where))
        elif "prompt" in record and "response" in record:
            messages = []
            if record.get("system") is not None:
                messages.append({"role": "system", "content": record["system"]})
            messages += [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]},
            ]
            conversations.append(_check_messages(messages, where))
        else:
            raise DataError(
                f"{where}: record has neither 'messages' nor 'prompt' and 'response' "
                f"(keys: {', '.join(sorted(record)) or 'none'}); allowed: 'messages' (a list of "
                "{role, content}) or 'prompt' and 'response' strings"
            )
        if not any(m["role"] == "assistant" for m in conversations[-1]):
            raise DataError(f"{where}: the conversation has no assistant message; SFT learns from assistant turns, "
                            "so every conversation needs one")
    if not conversations:
        raise DataError(f"{path}: no conversations found (the file is empty)")
    return conversations


# --------------------------------------------------------------------------- datasets


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")


class PackedDataset(Dataset):
    """Fixed-length blocks of a token stream; each item's labels equal its input ids."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2:
            raise DataError(f"blocks must be a 2-D tensor [n_blocks, seq_len], got shape {tuple(blocks.shape)}")
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TokenizedDataset(Dataset):
    """Variable-length examples, each a dict of equal-length ``input_ids`` and ``labels`` lists."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        ids = torch.tensor(example["input_ids"], dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor(example["labels"], dtype=torch.long),
        }


def mix_positions(length: int, ratio: float) -> list[bool]:
    """Which of `length` positions take a mixed-in example: position i does when floor((i + 1) r)
    > floor(i r), so the mixed examples are spread evenly and number floor(length r)."""
    return [math.floor((i + 1) * ratio + 1e-9) > math.floor(i * ratio + 1e-9) for i in range(length)]


class MixedDataset(Dataset):
    """The training data with general data mixed in at `ratio`, same length as `main` (so the same
    token count for packed text): evenly spaced positions (`mix_positions`) take the next `mix`
    example (cycling), the others the next `main` example in order; the last floor(len r) main
    examples are left out. The Trainer's seeded shuffle then orders it as it would `main`."""

    def __init__(self, main: Dataset, mix: Dataset, ratio: float):
        if not 0.0 < ratio < 1.0 or not math.isfinite(ratio):
            raise DataError(f"--mix-ratio must be in (0, 1), got {ratio!r}")
        if len(mix) == 0:
            raise DataError("--mix-data yields no training examples (too short for --seq-len?)")
        self.main, self.mix, self.ratio = main, mix, ratio
        self.index: list[tuple[bool, int]] = []
        counts = [0, 0]
        for mixed in mix_positions(len(main), ratio):
            self.index.append((mixed, counts[mixed] % len(mix) if mixed else counts[mixed]))
            counts[mixed] += 1
        self.mixed_examples = counts[True]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int):
        mixed, position = self.index[index]
        return (self.mix if mixed else self.main)[position]


def build_cpt_dataset(texts: Iterable[str], tokenizer, seq_len: int) -> PackedDataset:
    """Pack documents into blocks of ``seq_len`` tokens for continued pre-training.

    Each text is tokenised without special tokens and followed by ``tokenizer.eos_token_id``;
    the results are concatenated and cut into ``len // seq_len`` blocks (the remainder is
    dropped). Labels equal the input ids.

    Raises:
        DataError: no texts, no eos token, bad ``seq_len``, or fewer tokens than one block.
    """
    _check_seq_len(seq_len)
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("no texts to build a CPT dataset from")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; CPT packing needs one to separate documents")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"the texts hold {len(stream)} tokens (eos tokens included), fewer than one block of "
            f"seq_len={seq_len}; add text or lower seq_len"
        )
    blocks = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return PackedDataset(blocks)


def _render(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(conversation: list[dict], tokenizer, template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render ``conversation`` and locate each assistant message in the text.

    Each span runs from the first character of the assistant content to the end of the
    end-of-turn marker that closes it (trailing whitespace excluded). Spans are found by
    rendering prefixes of the conversation: the text before assistant message ``k`` is the
    rendering of ``messages[:k]`` with the generation prompt, and its end is the rendering of
    ``messages[:k + 1]``. Templates that do not render prefixes consistently fall back to
    searching for the content, extended over a directly following eos token.

    Returns:
        ``(text, [(start, end), ...])`` with character offsets into ``text``.
    """
    full = _render(tokenizer, conversation, template, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for k, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        content = message["content"].strip()
        try:
            before = _render(tokenizer, conversation[:k], template, True) if k else ""
            after = _render(tokenizer, conversation[: k + 1], template, False)
        except Exception:  # a template may refuse a partial conversation
            before = after = None
        if before is not None and full.startswith(before) and full.startswith(after) and len(after) > len(before):
            start, end = max(len(before), cursor), len(after)
            # Skip any role header the template writes when it lacks a generation prompt.
            found = full.find(content, start, end) if content else -1
            if found >= 0:
                start = found
        else:
            start = full.find(content, cursor) if content else -1
            if start < 0:
                raise DataError(
                    f"assistant message {k} ({content[:40]!r}) cannot be located in the rendered chat template"
                )
            end = start + len(content)
            eos = tokenizer.eos_token
            gap = len(full[end:]) - len(full[end:].lstrip())
            if eos and full.startswith(eos, end + gap):
                end += gap + len(eos)
        while end > start and full[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    return full, spans


def _label_tokens(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenise ``text`` and keep labels only on tokens inside ``spans``."""
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for j, (s, e) in enumerate(encoding["offset_mapping"]):
            for a, b in spans:
                if (s < b and e > a) if e > s else (a <= s < b):
                    labels[j] = ids[j]
                    break
        return ids, labels
    # Slow tokenizers have no offsets: count the tokens of each span's prefix instead.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        first = len(tokenizer(text[:a], add_special_tokens=False)["input_ids"])
        last = len(tokenizer(text[:b], add_special_tokens=False)["input_ids"])
        for j in range(first, min(last, len(ids))):
            labels[j] = ids[j]
    return ids, labels


def build_sft_dataset(conversations: Iterable[list[dict]], tokenizer, seq_len: int) -> TokenizedDataset:
    """Tokenise conversations for supervised fine-tuning with assistant-only labels.

    Conversations are rendered with ``tokenizer.chat_template`` (or
    :data:`FALLBACK_CHAT_TEMPLATE` when the tokenizer has none) and truncated to
    ``seq_len`` tokens. Labels are ``-100`` except on assistant content and the
    end-of-turn marker closing each assistant turn. Conversations left without any
    assistant token (none to begin with, or cut away by truncation) are dropped.

    Raises:
        DataError: bad ``seq_len``, malformed messages, or every conversation dropped.
    """
    _check_seq_len(seq_len)
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    examples: list[dict[str, list[int]]] = []
    total = 0
    for i, conversation in enumerate(conversations):
        total += 1
        conversation = _check_messages(conversation, f"conversation {i}")
        text, spans = assistant_spans(conversation, tokenizer, template)
        if not spans:
            continue
        ids, labels = _label_tokens(text, spans, tokenizer)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(
            f"all {total} conversations were dropped: none has an assistant token within seq_len={seq_len} "
            "(each needs an assistant message that starts before the cut)"
        )
    return TokenizedDataset(examples)


# --------------------------------------------------------------------------- batching


@dataclass
class DataCollator:
    """Right-pad a list of examples into a batch.

    Padding uses ``pad_token_id`` in ``input_ids``, ``0`` in ``attention_mask`` and
    ``label_pad_token_id`` (``-100``) in ``labels``. Examples without ``labels`` are
    labelled with their input ids; without ``attention_mask``, with ones.
    ``pad_to_multiple_of`` rounds the batch length up.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise DataError(f"pad_token_id must be an integer token id, got {self.pad_token_id!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be None or >= 1, got {self.pad_to_multiple_of!r}")

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "DataCollator":
        """Build a collator padding with the tokenizer's pad token (its eos token if it has none)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad token nor an eos token to pad with")
        return cls(pad_token_id=pad, **kwargs)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty list of examples")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        length = max(x.numel() for x in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        labels = torch.full((len(ids), length), self.label_pad_token_id, dtype=torch.long)
        for row, (feature, x) in enumerate(zip(features, ids)):
            n = x.numel()
            batch_ids[row, :n] = x
            mask[row, :n] = torch.as_tensor(feature.get("attention_mask", torch.ones(n)), dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature["labels"] if "labels" in feature else x, dtype=torch.long)
        return {"input_ids": batch_ids, "attention_mask": mask, "labels": labels}


def load_dataset_for_task(path: str | os.PathLike, tokenizer, task: str, seq_len: int) -> Dataset:
    """Read ``path`` and build the dataset for ``task``.

    ``"cpt"``: :func:`read_text_records` then :func:`build_cpt_dataset`.
    ``"sft"``: :func:`read_chat_records` then :func:`build_sft_dataset`.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; allowed: {', '.join(repr(t) for t in TASKS)}")
    if task == "cpt":
        return build_cpt_dataset(read_text_records(path), tokenizer, seq_len)
    return build_sft_dataset(read_chat_records(path), tokenizer, seq_len)
