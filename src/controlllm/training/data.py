"""Training data: read text or chat records, tokenise them, and batch them.

Accepted data (local files; every error names the file, the line or record, and what is accepted)
================================================================================================

Files
-----
* ``.txt``: plain text; documents are separated by blank lines (a file without a blank line is one
  document). For ``cpt`` data and for text mixed into any run (``--mix-data``).
* ``.jsonl``: one JSON object per line (errors give the line number).
* ``.json``: one JSON array of objects, e.g. Alpaca's own ``alpaca_data.json``.
* ``.parquet`` and ``.arrow`` files, and a folder written by ``datasets.Dataset.save_to_disk``: one
  record per row, read with the ``datasets`` library; a column is a field.

Records for ``--task cpt`` (text)
--------------------------------
A string ``text`` field (column)::

    {"text": "The first document ..."}

Records for ``--task sft`` (conversations), any of these forms, mixed freely::

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is 2 + 2?"},
                  {"role": "assistant", "content": "4."}]}
    {"prompt": "What is 2 + 2?", "response": "4.", "system": "Be brief."}        # system optional
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4."}        # Alpaca; input optional
    {"conversations": [{"from": "human", "value": "What is 2 + 2?"},
                       {"from": "gpt", "value": "4."}]}                           # ShareGPT

Roles are ``system``, ``user``, ``assistant`` and ``tool``; ShareGPT's ``from`` names map to them
(``human`` -> user, ``gpt`` -> assistant, ``observation`` -> tool, see :data:`SHAREGPT_ROLES`). An
Alpaca ``input`` is appended to the instruction after a blank line. A top-level ``system`` string
opens the conversation (prompt/response, Alpaca and ShareGPT records). Every conversation needs an
assistant message.

What is trained
===============
* ``"cpt"`` (continued pre-training): documents are tokenised, each followed by the eos
  token, concatenated and cut into fixed blocks of ``seq_len`` tokens; every token is a
  training target.
* ``"sft"`` (supervised fine-tuning): conversations are rendered with the tokenizer's chat
  template; only assistant tokens (with the end-of-turn marker closing each assistant turn)
  are training targets, everything else is labelled ``-100``.
* Mixed-in data (``--mix-data``, :class:`MixedDataset`): for cpt, text packed like the training
  data; for sft, conversations like the training data, or plain text (``.txt``, or records with a
  ``text`` field) as documents of their own, every token trained. ``--mix-ratio`` is the mix's share
  of the trained tokens.

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


#: File types read as records (one JSON object, or one table row, per record).
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
#: File types read as plain text.
TEXT_SUFFIXES = (".txt",)

#: ShareGPT speaker names ("from") and the chat role each one is.
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "bard": "assistant",
    "tool": "tool", "observation": "tool", "function_response": "tool",
}

_CHAT_FORMS = ("'messages' (a list of {role, content}), 'conversations' (ShareGPT: a list of {from, value}), "
               "'prompt' and 'response', or 'instruction', optional 'input', and 'output' (Alpaca)")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_info.json"))


def _check_data_path(path: str | os.PathLike, allowed: Sequence[str]) -> Path:
    """A data file of an allowed type, or a folder written by `datasets.Dataset.save_to_disk`."""
    path = Path(path)
    if _is_saved_dataset(path) and ".arrow" in allowed:
        return path
    return _check_file(path, allowed)


def _table_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet or arrow file, or of a saved dataset folder, through the `datasets` library."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - a dependency of controlllm
        raise DataError(f"{path}: reading {path.suffix or 'saved dataset'} files needs the 'datasets' package "
                        f"(pip install datasets): {err}") from None
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                raise DataError(f"{path} holds several splits ({', '.join(table)}); give the folder of one "
                                f"split, e.g. {path / next(iter(table))}")
        elif path.suffix.lower() == ".arrow":
            table = datasets.Dataset.from_file(str(path), in_memory=True)
        else:
            import tempfile

            enabled = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            try:
                with tempfile.TemporaryDirectory(prefix="controlllm-data-") as cache:
                    table = datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
            finally:
                if enabled:
                    datasets.enable_progress_bars()
    except DataError:
        raise
    except Exception as err:  # pyarrow's and datasets' errors: a file that is not what its name says
        raise DataError(f"cannot read {path} as {path.suffix.lstrip('.') or 'a saved dataset'}: "
                        f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}") from None
    for number, row in enumerate(table, start=1):
        yield f"{path}: record {number}", row


def _json_array_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Objects of a .json file holding one array of records (Alpaca's own alpaca_data.json)."""
    try:
        data = json.loads(_read_bytes(path).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {err.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    except (RecursionError, ValueError) as err:
        raise DataError(f"{path}: invalid JSON: {str(err)[:120] or 'nested too deeply'}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold an array of records ([{{...}}, ...]), got "
                        f"{type(data).__name__}; for one record per line use .jsonl")
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {number}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}: record {number}", record


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` for every record of a data file: each line of a ``.jsonl`` file (``where``
    is ``file:line``), each element of a ``.json`` array, each row of a ``.parquet`` or ``.arrow`` file or
    of a folder saved by ``datasets`` (``where`` is ``file: record N``, from 1). Local files only.

    Raises:
        DataError: missing file, another type, malformed content.
    """
    path = _check_data_path(path, RECORD_SUFFIXES)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for lineno, record in _iter_jsonl(path):
            yield f"{path}:{lineno}", record
    elif suffix == ".json":
        yield from _json_array_records(path)
    else:
        yield from _table_records(path)


def _holds_text(path: str | os.PathLike) -> bool:
    """Whether a data file holds plain text (a .txt file, or records with a 'text' field and no chat)."""
    path = Path(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return True
    for _, record in iter_records(path):
        return "text" in record and not any(k in record for k in ("messages", "conversations", "prompt", "instruction"))
    return False


def read_text_records(path: str | os.PathLike) -> list[str]:
    """Read plain-text documents for continued pre-training (or to mix into SFT).

    ``.txt``: documents separated by blank lines (a file without blank lines is one document).
    Records (``.jsonl``, ``.json`` array, ``.parquet``, ``.arrow``, see :func:`iter_records`): a string
    ``text`` field (column) per record. Whitespace-only documents are skipped.

    Raises:
        DataError: missing file, unsupported type, malformed record, missing ``text`` field, or no
            documents at all; it names the file and the line or record.
    """
    path = _check_data_path(path, TEXT_SUFFIXES + RECORD_SUFFIXES)
    texts: list[str] = []
    if path.suffix.lower() in TEXT_SUFFIXES:
        data = _read_bytes(path)
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError as err:
            start = data.rfind(b"\n", 0, err.start) + 1
            raise _not_utf8(path, data.count(b"\n", 0, err.start) + 1, err, err.start - start + 1) from None
        texts = [doc.strip() for doc in re.split(r"\n[ \t\r\f\v]*\n", content) if doc.strip()]
    else:
        for where, record in iter_records(path):
            if "text" not in record:
                raise DataError(
                    f"{where}: record has no 'text' field (keys: {', '.join(sorted(record)) or 'none'}); "
                    "allowed: a record with a string 'text' field (a 'text' column)"
                )
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
            if text.strip():
                texts.append(text)
    if not texts:
        raise DataError(f"{path}: no documents found (the file is empty or holds only whitespace)")
    return texts


def _check_messages(messages: Any, where: str, field: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and "from" in message and "value" in message and "role" not in message:
            speaker = message["from"]
            role = SHAREGPT_ROLES.get(speaker.lower() if isinstance(speaker, str) else speaker)
            if role is None:
                raise DataError(f"{where}: message {i} is from {_short(speaker)}; allowed: "
                                f"{', '.join(SHAREGPT_ROLES)}")
            message = {"role": role, "content": message["value"]}
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content' (or ShareGPT's "
                            f"'from' and 'value'), got {_short(message)}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: message {i} has role {_short(role)}; allowed: {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def _present(record: dict, key: str) -> bool:
    return record.get(key) is not None


def chat_of_record(record: dict, where: str) -> list[dict]:
    """The conversation a record holds, in any accepted form (see the module docstring); `where` names
    the file and record in errors."""
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    lead = [{"role": "system", "content": system}] if system else []
    if _present(record, "messages"):
        return _check_messages(record["messages"], where)
    if _present(record, "conversations"):
        conversation = _check_messages(record["conversations"], where, "conversations")
        return conversation if any(m["role"] == "system" for m in conversation) else lead + conversation
    if _present(record, "prompt") and _present(record, "response"):
        return _check_messages(lead + [{"role": "user", "content": record["prompt"]},
                                       {"role": "assistant", "content": record["response"]}], where)
    if _present(record, "instruction") and _present(record, "output"):
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        instruction = record["instruction"]
        if not isinstance(instruction, str):
            raise DataError(f"{where}: field 'instruction' must be a string, got {type(instruction).__name__}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return _check_messages(lead + [{"role": "user", "content": user},
                                       {"role": "assistant", "content": record["output"]}], where)
    raise DataError(f"{where}: record has none of the chat forms (keys: {', '.join(sorted(record)) or 'none'}); "
                    f"allowed: {_CHAT_FORMS}")


def read_chat_records(path: str | os.PathLike) -> list[list[dict]]:
    """Read conversations for supervised fine-tuning from a records file (``.jsonl``, ``.json`` array,
    ``.parquet``, ``.arrow``; see :func:`iter_records`), each record in one of the forms of the module
    docstring: ``messages``, ShareGPT ``conversations``, ``prompt``/``response`` or Alpaca
    ``instruction``/``input``/``output``. Roles must be one of :data:`CHAT_ROLES`.

    Raises:
        DataError: missing file, unsupported type, malformed record, a record in none of the forms, a
            conversation without an assistant message, or no records at all; it names the file and
            the line or record.
    """
    path = _check_data_path(path, RECORD_SUFFIXES)
    conversations: list[list[dict]] = []
    for where, record in iter_records(path):
        conversations.append(chat_of_record(record, where))
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


def trained_tokens(example: dict[str, Any]) -> int:
    """The tokens an example trains on: labels other than -100 after the one-token shift of the LM loss."""
    labels = torch.as_tensor(example["labels"] if "labels" in example else example["input_ids"])
    return int((labels[1:] != IGNORE_INDEX).sum())


def data_order(length: int, seed: int, epoch: int = 0) -> list[int]:
    """The order in which the Trainer visits a map-style dataset of `length` examples in `epoch`: its
    sampler (accelerate's `SeedableRandomSampler`, seeded with `data_seed` + epoch) draws
    `torch.randperm(length)` from a generator seeded so. `MixedDataset` follows it, so the main data's
    order with mixing is the order of a run without it."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class MixedDataset(torch.utils.data.IterableDataset):
    """The training data with general data mixed in, `ratio` being the mix's share of the trained
    (label) tokens, not of the examples.

    Each epoch visits `main` in the order a run without mixing visits it (`data_order(len(main),
    seed, epoch)`, the Trainer's seeded shuffle) and interleaves `mix` examples (in their own seeded
    order, cycling): after each main example, the next mix example follows when, with it, the mix's
    share of the tokens trained so far in the epoch stays within `ratio`. So at any point the mix
    holds at most `ratio` of the trained tokens, and less than that by at most one mix example.
    The order is its own (an iterable dataset: the Trainer does not shuffle it) and deterministic per
    epoch (`set_epoch`, called by the Trainer's data loader), so resuming replays the same stream.

    Raises:
        DataError: `ratio` not in (0, 1), `mix` empty, or `ratio` too small to take a single mix
            example in an epoch of `main` (the message gives the smallest ratio that would).
    """

    def __init__(self, main: Dataset, mix: Dataset, ratio: float, seed: int = 42):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0.0 < ratio < 1.0:
            raise DataError(f"--mix-ratio must be in (0, 1), got {ratio!r}")
        if len(mix) == 0:
            raise DataError("--mix-data yields no training examples (too short for --seq-len?)")
        self.main, self.mix, self.ratio, self.seed = main, mix, float(ratio), seed
        self.main_tokens = [trained_tokens(main[i]) for i in range(len(main))]
        self.mix_tokens = [trained_tokens(mix[i]) for i in range(len(mix))]
        self.epoch = 0
        first = self.plan(0)
        self.mixed_examples = sum(1 for is_mix, _ in first if is_mix)
        if self.mixed_examples == 0:
            total, least = sum(self.main_tokens), min(t for t in self.mix_tokens if t > 0) if any(self.mix_tokens) else 0
            need = f"; at least {least / (total + least):.3g} would take one" if least else ""
            raise DataError(
                f"--mix-ratio {ratio:g} takes no --mix-data example: the training data trains on {total} tokens per "
                f"epoch and the mix examples train on at least {least} tokens each{need} (or give more training data)"
            )
        self.length = len(first)

    def plan(self, epoch: int) -> list[tuple[bool, int]]:
        """The epoch's examples in order: (from the mix?, index in its dataset)."""
        mix_order = data_order(len(self.mix), self.seed + 1, epoch)
        plan: list[tuple[bool, int]] = []
        main_total = mix_total = 0
        cursor = 0
        for index in data_order(len(self.main), self.seed, epoch):
            plan.append((False, index))
            main_total += self.main_tokens[index]
            while True:
                candidate = mix_order[cursor % len(mix_order)]
                tokens = self.mix_tokens[candidate]
                if tokens == 0 or (mix_total + tokens) > self.ratio * (main_total + mix_total + tokens):
                    break
                plan.append((True, candidate))
                mix_total += tokens
                cursor += 1
        return plan

    def set_epoch(self, epoch: int) -> None:
        """Which epoch the next iteration yields (the Trainer's data loader calls it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length  # the first epoch's; later ones differ by a few examples at most

    def __iter__(self):
        for is_mix, index in self.plan(self.epoch):
            yield (self.mix if is_mix else self.main)[index]


def _documents(texts: Iterable[str], tokenizer, seq_len: int, what: str, why_eos: str) -> tuple[list[str], int]:
    """(the non-empty texts, the eos id) for building `what`, or a DataError naming what is missing."""
    _check_seq_len(seq_len)
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"no texts to build {what} from")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"the tokenizer has no eos token; {why_eos}")
    return texts, eos


def build_text_examples(texts: Iterable[str], tokenizer, seq_len: int) -> TokenizedDataset:
    """Plain documents as examples of their own (for mixing general text into SFT): each text is
    tokenised without special tokens, followed by the eos token, and cut into pieces of at most
    `seq_len` tokens; every token is trained (labels equal the input ids).

    Raises:
        DataError: bad `seq_len`, no eos token, or no text.
    """
    texts, eos = _documents(texts, tokenizer, seq_len, "examples", "plain documents need one to end them")
    examples = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = [*ids, eos]
        for start in range(0, len(ids), seq_len):
            piece = ids[start:start + seq_len]
            if len(piece) > 1:  # a lone token trains on nothing (the loss shifts by one)
                examples.append({"input_ids": piece, "labels": list(piece)})
    return TokenizedDataset(examples)


def read_mix_records(path: str | os.PathLike, task: str) -> tuple[str, list]:
    """Read the data to mix into a `task` run: ``("text", documents)`` or ``("chat", conversations)``.

    For ``"cpt"`` it is text (:func:`read_text_records`). For ``"sft"``, a file of plain text (``.txt``,
    or records with a ``text`` field) is read as documents, anything else as conversations
    (:func:`read_chat_records`)."""
    if task == "cpt":
        return "text", read_text_records(path)
    if _holds_text(path):
        return "text", read_text_records(path)
    return "chat", read_chat_records(path)


def build_mix_dataset(records: tuple[str, list], tokenizer, task: str, seq_len: int) -> Dataset:
    """The dataset of :func:`read_mix_records`'s result for a `task` run: packed blocks for cpt, plain
    documents (:func:`build_text_examples`, all tokens trained) or chats for sft."""
    kind, items = records
    if task == "cpt":
        return build_cpt_dataset(items, tokenizer, seq_len)
    if kind == "text":
        return build_text_examples(items, tokenizer, seq_len)
    return build_sft_dataset(items, tokenizer, seq_len)


def build_cpt_dataset(texts: Iterable[str], tokenizer, seq_len: int) -> PackedDataset:
    """Pack documents into blocks of ``seq_len`` tokens for continued pre-training.

    Each text is tokenised without special tokens and followed by ``tokenizer.eos_token_id``;
    the results are concatenated and cut into ``len // seq_len`` blocks (the remainder is
    dropped). Labels equal the input ids.

    Raises:
        DataError: no texts, no eos token, bad ``seq_len``, or fewer tokens than one block.
    """
    texts, eos = _documents(texts, tokenizer, seq_len, "a CPT dataset", "CPT packing needs one to separate documents")
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
