"""Step time of low-rank Control against LoRA (and Control, full fine-tuning), measured in one process.

Every method is built the way `controlllm train` builds it (`training.train.prepare_model` with the
TrainConfig the CLI makes: LoRA/QLoRA r16 alpha 32 on every linear layer of the decoder; Control on
8 copies with the recommended preset; low-rank Control the same with `--copy-rank 16`; the 4-bit
rows with `--quantize-base 4bit`) on SmolLM2-135M's shape with random weights, float32. After one
warm-up step each, the methods take turns step by step (the order reversed every other round), so a
shared machine's drift falls on all of them alike; the medians and their ratio to LoRA's (QLoRA's
for the 4-bit rows) are reported.

    .venv/bin/python benchmarks/perf/lowrank_steps.py               # about 10 min on 2 CPU cores
    .venv/bin/python benchmarks/perf/lowrank_steps.py --quick       # a tiny shape, seconds
    .venv/bin/python benchmarks/perf/lowrank_steps.py --render      # rewrite the md/png from the json

Writes benchmarks/results/lowrank_steps.{md,json,png} (or --output-dir).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import SMOLLM2_135M, machine_info, make_optimizer, random_model, trainable  # noqa: E402
from run import alternate_steps  # noqa: E402  (perf/run.py: methods taking turns step by step)

RESULTS = os.path.normpath(os.path.join(HERE, "..", "results"))
COPIES = 8
# label -> TrainConfig overrides, and the row each is compared with
METHODS = {
    "full fine-tuning": (dict(method="full"), "LoRA r16"),
    "LoRA r16": (dict(method="lora"), "LoRA r16"),
    "Control, 8 copies": (dict(method="control", preset="recommended", num_expanded_layers=COPIES), "LoRA r16"),
    "low-rank Control r16, 8 copies": (dict(method="control", preset="recommended", num_expanded_layers=COPIES,
                                            copy_rank=16, copy_alpha=32), "LoRA r16"),
    "QLoRA r16 (4-bit base)": (dict(method="lora", quantize_base="4bit"), "QLoRA r16 (4-bit base)"),
    "low-rank Control r16, 8 copies, 4-bit base": (dict(method="control", preset="recommended",
                                                        num_expanded_layers=COPIES, copy_rank=16, copy_alpha=32,
                                                        quantize_base="4bit"), "QLoRA r16 (4-bit base)"),
}


def build(shape: dict, overrides: dict):
    from controlllm.training.train import TrainConfig, prepare_model

    cfg = TrainConfig(data="unused", lora_r=16, lora_alpha=32, **overrides)
    model = prepare_model(random_model(shape, torch.float32), cfg)
    model.train()
    return model


def measure(shape: dict, batch_size: int, seq: int, reps: int) -> dict:
    trainers = []
    for label, (overrides, _) in METHODS.items():
        model = build(shape, overrides)
        trainers.append((label, model, make_optimizer(model)))
    times = alternate_steps([({"label": label}, model, opt) for label, model, opt in trainers], shape["vocab_size"],
                            batch_size, seq, reps, warm_seq=seq)
    rows = []
    for label, model, _ in trainers:
        against = METHODS[label][1]
        rows.append({"label": label, "config": METHODS[label][0], "against": against,
                     "median_s": statistics.median(times[label]), "times": times[label],
                     "trainable_parameters": sum(p.numel() for p in trainable(model))})
    medians = {r["label"]: r["median_s"] for r in rows}
    for r in rows:  # per-round ratios too: the spread of the ratio over rounds
        per_round = [a / b for a, b in zip(r["times"], times[r["against"]])]
        r["ratio"] = r["median_s"] / medians[r["against"]]
        r["ratio_rounds"] = [min(per_round), statistics.median(per_round), max(per_round)]
    del trainers
    gc.collect()
    return {"batch": batch_size, "seq": seq, "reps": reps, "rows": rows}


def render(data: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Step time: low-rank Control against LoRA, one process (CPU)", "",
             f"Command: `{data['command']}` (started {data['started']}, {data['minutes']:.1f} min). "
             f"Machine: {data['machine']}; torch threads {data['threads']}.", "",
             f"Shape: {data['shape']}, random weights, float32; batch {data['batch']} x "
             f"{data['seq']} tokens; {data['reps']} rounds after one warm-up step each, the methods taking turns "
             "(order reversed every other round). Each method as `controlllm train` builds it "
             "(`training.train.prepare_model`).", "",
             "| method | trainable params | median step (s) | vs | ratio | per-round ratio min / median / max |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lo, mid, hi = r["ratio_rounds"]
        lines.append(f"| {r['label']} | {r['trainable_parameters'] / 1e6:.1f} M | {r['median_s']:.2f} | {r['against']} | "
                     f"{r['ratio']:.2f} | {lo:.2f} / {mid:.2f} / {hi:.2f} |")
    lines += ["", "## Reading", "", data.get("reading", "(not written yet)"), ""]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lowrank_steps.md"), "w") as f:
        f.write("\n".join(lines))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = [r["label"] for r in data["rows"]]
    ax.barh(range(len(labels)), [r["median_s"] for r in data["rows"]], color="tab:blue")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"median step time (s), batch {data['batch']} x {data['seq']}")
    for i, r in enumerate(data["rows"]):
        ax.text(r["median_s"], i, f" {r['ratio']:.2f}x {r['against'].split(' ')[0]}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lowrank_steps.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    out_dir = args.output_dir or (os.path.join(RESULTS, "quick") if args.quick else RESULTS)
    path = os.path.join(out_dir, "lowrank_steps.json")
    if args.render:
        with open(path) as f:
            render(json.load(f), out_dir)
        return 0
    torch.set_num_threads(args.threads)
    shape = (dict(SMOLLM2_135M, vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2) if args.quick else SMOLLM2_135M)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.time()
    result = measure(shape, 1 if args.quick else 2, 32 if args.quick else 256, args.reps or (2 if args.quick else 6))
    data = {"command": "python benchmarks/perf/lowrank_steps.py" + (" --quick" if args.quick else "")
            + (f" --threads {args.threads}" if args.threads != 2 else ""), "started": started,
            "minutes": (time.time() - t0) / 60, "shape": f"{'a tiny Llama' if args.quick else 'SmolLM2-135M'} "
            f"({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']})", "threads": args.threads, "machine": machine_info().get("cpu", "CPU"),
            **result}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if "reading" in old:
            data["previous_reading"] = old["reading"]
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    render(data, out_dir)
    for r in data["rows"]:
        print(f"{r['label']:45s} {r['median_s']:.2f} s  {r['ratio']:.2f}x {r['against']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
