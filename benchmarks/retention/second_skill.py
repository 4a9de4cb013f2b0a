"""A second SFT skill, run as a recipe of `controlllm compare`: SciQ science questions.

The frontier benchmark's SFT skill is arithmetic; this is the second one, not arithmetic, with gold
answers from offline data (SciQ closed book, `skills.py`). It is `controlllm compare` itself on those
files: full fine-tuning, Control's recommended preset and SDFT (through TRL), each over a two-rate
grid chosen on validation (the lower two of compare's default grids), every run read along its dial
at s = 0.5 and 1; gain = bits/char drop on the gold answers, forgetting = KL to the base on held-out
English texts. What fits on two CPU cores beside the frontier runs: 32 steps x 8, float32, one seed,
750 train / 100 validation / 150 test items, 48 keep texts (at 300 / 200 items, 100 keep texts and five
dial points, scoring one run ran past 13 min on a shared core and was stopped; at this size a run took
4-14 min of training and 4-11 min of scoring). The GPU plan
(`gpu_plan.sh`) runs the same skill with 300 / 200 items, LoRA, low-rank Control and freeze too, at
128 steps x 16 and 5 seeds.

    .venv/bin/python benchmarks/retention/second_skill.py        # resumes from the committed records

Records: benchmarks/results/second_skill_sciq/runs/<method>@<lr>-seed42.json; the report:
benchmarks/results/second_skill_sciq/compare.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import skills  # noqa: E402

from controlllm.compare import CompareConfig, compare  # noqa: E402

METHODS = ("full", "control", "sdft")
RATES = {"full": (1e-5, 3e-5), "control": (5e-5, 3e-4), "sdft": (1e-5, 3e-5)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "second_skill_sciq"))
    parser.add_argument("--data", default=os.path.join("runs", "second_skill", "data"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # paths relative to the repository, as the report shows them
    print("data:", skills.write_data(args.data, skills=("sciq",), test=150, validation=100, keep=48), flush=True)
    methods = tuple(m for m in args.methods.split(",") if m)
    cfg = CompareConfig(train=os.path.join(args.data, "sciq_train.jsonl"),
                        validation=os.path.join(args.data, "sciq_validation.jsonl"),
                        test=os.path.join(args.data, "sciq_test.jsonl"), keep=os.path.join(args.data, "keep.txt"),
                        task="sft", output=args.output, methods=methods, seeds=(42,),
                        rates={m: RATES[m] for m in methods if m in RATES}, dial_values=(0.5, 1.0), units=32,
                        steps=args.steps, batch_size=8, seq_len=128, threads=args.threads, progress=False)
    compare(config=cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
