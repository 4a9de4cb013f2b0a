"""Profile one training step per method with torch.profiler and print where the time goes.

    .venv/bin/python benchmarks/perf/profile_step.py [--quick] [--batch 4] [--seq-len 256]

Writes benchmarks/results/perf_profile.txt (top operators per method, self CPU time).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUICK, SMOLLM2_135M, batch, build_base, make_optimizer, methods_for, prepare  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", default="0,4,5", help="indices into the method list")
    parser.add_argument("--output", default=os.path.join(RESULTS, "perf_profile.txt"))
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else SMOLLM2_135M
    specs = methods_for(shape["num_hidden_layers"])
    ids, mask = batch(shape["vocab_size"], args.batch, args.seq_len)
    lines = [f"shape={shape}\nbatch={args.batch} x {args.seq_len}, torch {torch.__version__}, threads {torch.get_num_threads()}\n"]
    for i in (int(x) for x in args.methods.split(",")):
        spec = specs[i]
        model = prepare(build_base(shape), spec)
        opt = make_optimizer(model)
        warm_ids, warm_mask = ids[:, :32], mask[:, :32]
        model(input_ids=warm_ids, attention_mask=warm_mask, labels=warm_ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("forward"):
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        phases = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in ("forward", "backward", "optimizer")}
        text = f"\n=== {spec['label']} === phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + "\n" + table
        print(text, flush=True)
        lines.append(text)
        del model, opt
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
