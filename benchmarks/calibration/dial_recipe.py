"""The Control recipe chosen again with the retention dial and the fixed alignment gradient.

Spanish continued pre-training of SmolLM2-135M-Instruct (30 steps of 4 x 128 tokens, float32,
one cosine schedule), every run followed by its dial curve (`controlllm.dial`, values
0, 0.25, 0.5, 0.75, 1), all on validation data:
  gain  = drop of held-out Spanish bits/char (RV1909 chapters held out by the demo's rule),
  drift = KL(base || model) on held-out English fortunes (and their bits/char change).
What a user can get from a method is its dial curve, so methods are compared there: at each gain
level, the least KL on the curve's Pareto envelope (linear between envelope points). Full
fine-tuning's dial is WiSE-FT. The `oldgrad` runs train with the alignment target detached, as
before the fix (the block's alignment call is wrapped in this script only), to measure what the
fix changed where the alignment is strong (`mse` at weight 1, the paper's CSFT recipe).

    .venv/bin/python benchmarks/calibration/dial_recipe.py             # every variant
    .venv/bin/python benchmarks/calibration/dial_recipe.py --only full-1e-4,ctl8-3e-4
    .venv/bin/python benchmarks/calibration/dial_recipe.py --report-only

Finished variants are kept in benchmarks/results/dial_recipe_runs/<name>.json and skipped on a
rerun (the run folders go to runs/dial_recipe/). Results: benchmarks/results/dial_recipe.{md,json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from contextlib import contextmanager

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
RECORDS = os.path.join(RESULTS, "dial_recipe_runs")

from controlllm import block as block_module  # noqa: E402
from controlllm.assets import load_pretrained  # noqa: E402
from controlllm.demo import english_texts, spanish_chapters  # noqa: E402
from controlllm.dial import Dial, dial_curve  # noqa: E402
from controlllm.training.train import TrainConfig, train  # noqa: E402

VALUES = (0.25, 0.5, 0.75, 1.0)
VAL_CHARS = 1000
LEVELS = (0.10, 0.15, 0.20, 0.25, 0.30, 0.35)
CTL = dict(method="control", interpolation="lerp", alignment_loss="nmse", alignment_weight=1.0,
           train_interpolation=False, num_expanded_layers=8)
# name -> TrainConfig overrides, in the order they run (most telling first).
VARIANTS = {
    "full-1e-4": dict(method="full", lr=1e-4),
    "ctl8-3e-4": dict(CTL, lr=3e-4),
    "ctl8-1e-3": dict(CTL, lr=1e-3),
    "ctl8-1e-4": dict(CTL, lr=1e-4),
    "ctl8-5e-5": dict(CTL, lr=5e-5),
    "csft-mse-1e-3": dict(method="control", preset="paper-csft", num_expanded_layers=8, lr=1e-3),
    "csft-mse-1e-3-oldgrad": dict(method="control", preset="paper-csft", num_expanded_layers=8, lr=1e-3),
    "ctl8-w1-3e-4": dict(CTL, lr=3e-4, interpolation_init=20.0),  # w = sigmoid(20) = 1.0 in fp32: the copy alone
    "ctl8-mix-3e-4": dict(CTL, lr=3e-4, mix_ratio=0.1),  # mix_data set below: English fortunes
    "ctl15-3e-4": dict(CTL, lr=3e-4, num_expanded_layers=15),
    "ctl30-3e-4": dict(CTL, lr=3e-4, num_expanded_layers=30),
}


@contextmanager
def detached_alignment_target(enabled: bool):
    """The alignment as computed before the fix: the frozen branch detached (h_p.detach())."""
    if not enabled:
        yield
        return
    original = block_module.alignment_per_token
    block_module.alignment_per_token = lambda kind, h_p, h_e, margin=0.0: original(kind, h_p.detach(), h_e, margin)
    try:
        yield
    finally:
        block_module.alignment_per_token = original


def envelope(points: list[dict]) -> list[tuple[float, float]]:
    """(gain, kl) of the Pareto envelope of a dial curve: points no other point beats on both,
    sorted by gain; between two of them the curve is read linearly."""
    pts = sorted((p["gain"], p["kl"]) for p in points)
    out: list[tuple[float, float]] = []
    for gain, kl in reversed(pts):  # from the largest gain down, keep the points with less KL than all above
        if not out or kl < out[-1][1]:
            out.append((gain, kl))
    return sorted(out)


def kl_at(points: list[dict], level: float) -> float | None:
    """The least KL at which the dial curve reaches `level` of gain (None when it never does)."""
    env = envelope(points)
    if not env or env[-1][0] < level:
        return None
    for (g0, k0), (g1, k1) in zip([(0.0, 0.0), *env], env):
        if g0 <= level <= g1:
            return k0 + (k1 - k0) * (level - g0) / (g1 - g0) if g1 > g0 else k1
    return env[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=os.path.join(ROOT, "runs", "dial_recipe"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        report()
        return
    torch.set_num_threads(args.threads)
    names = [n for n in (args.only.split(",") if args.only else VARIANTS) if n]
    os.makedirs(args.runs, exist_ok=True)
    os.makedirs(RECORDS, exist_ok=True)
    base, tokenizer = load_pretrained(None)
    base.eval()
    train_docs, heldout = spanish_chapters()
    spanish_val = [t[:VAL_CHARS] for t in heldout[:8]]  # the first 1,000 characters of 8 held-out chapters
    english = english_texts(400)
    english_val, english_mix = english[24:40], english[48:]
    data, mix = os.path.join(args.runs, "train_es.txt"), os.path.join(args.runs, "mix_en.txt")
    with open(data, "w") as f:
        f.write("\n\n".join(train_docs))
    with open(mix, "w") as f:
        f.write("\n\n".join(english_mix))
    for name in names:
        record_path = os.path.join(RECORDS, f"{name}.json")
        if os.path.isfile(record_path):
            continue
        overrides = dict(VARIANTS[name])
        if "mix_ratio" in overrides:
            overrides["mix_data"] = mix
        out = os.path.join(args.runs, name)
        cfg = TrainConfig(data=data, output=out, task="cpt", max_steps=args.steps, batch_size=4, seq_len=128,
                          save_steps=args.steps, logging_steps=10, progress=False, threads=args.threads, resume=True,
                          **overrides)
        start = time.time()
        with detached_alignment_target(name.endswith("-oldgrad")):
            result = train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)
        seconds = time.time() - start
        model = result.model.eval()
        dial = Dial(model, base=base if overrides["method"] == "full" else None)
        start = time.time()
        points = dial_curve(dial, tokenizer, spanish_val, english_val, VALUES, seq_len=256, progress=False)
        record = {"name": name, "config": {k: v for k, v in overrides.items() if k != "mix_data"},
                  "steps": args.steps, "tokens": args.steps * 4 * 128, "train_seconds": round(seconds, 1),
                  "dial_seconds": round(time.time() - start, 1), "dial": dial.describe()["what"],
                  "points": [p.to_dict() for p in points]}
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
        end = points[-1]
        print(f"{name}: s=1 gain {end.gain:.3f} kl {end.kl:.4f}; train {seconds:.0f} s", flush=True)
        del model, result, dial
        report()
    report()


def report() -> None:
    """Write benchmarks/results/dial_recipe.{json,md,png} from every finished variant."""
    records = [json.load(open(os.path.join(RECORDS, f"{n}.json"))) for n in VARIANTS
               if os.path.isfile(os.path.join(RECORDS, f"{n}.json"))]
    if not records:
        return
    table = {r["name"]: {str(level): kl_at(r["points"], level) for level in LEVELS} for r in records}
    best = {}
    for level in LEVELS:
        reached = {n: v[str(level)] for n, v in table.items() if v[str(level)] is not None}
        best[str(level)] = min(reached, key=reached.get) if reached else None
    with open(os.path.join(RESULTS, "dial_recipe.json"), "w") as f:
        json.dump({"levels": LEVELS, "kl_at_gain": table, "least_kl": best, "runs": records}, f, indent=1)
    lines = ["# The Control recipe with its dial: gain vs drift on validation data",
             "", "Command: `.venv/bin/python benchmarks/calibration/dial_recipe.py` (SmolLM2-135M-Instruct, Spanish CPT, "
             f"{records[0]['steps']} steps of 4 x 128 tokens, float32, one seed; every run then dialled at s = 0, "
             "0.25, 0.5, 0.75, 1). Gain: drop of Spanish validation bits/char (the first 1,000 characters of 8 held-out "
             "chapters); drift: KL(base || model) on 16 held-out English fortunes, nats/token. Full fine-tuning's dial is WiSE-FT.", "",
             "## Each run's dial curve (s: gain / KL)", "",
             "| run | " + " | ".join(f"s = {v:g}" for v in VALUES) + " | train s |", "|---|" + "---|" * (len(VALUES) + 1)]
    for r in records:
        cells = [f"{p['gain']:.3f} / {p['kl']:.4f}" for p in r["points"] if p["value"] > 0]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} |")
    lines += ["", "## KL at equal gain, read on each dial curve's Pareto envelope (linear between its points)", "",
              "| run | " + " | ".join(f"gain {lv:g}" for lv in LEVELS) + " |", "|---|" + "---|" * len(LEVELS)]
    for name, row in table.items():
        cells = []
        for level in LEVELS:
            v = row[str(level)]
            cells.append("-" if v is None else (f"**{v:.4f}**" if best[str(level)] == name else f"{v:.4f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: least KL at that gain. '-': the curve never reaches it."]
    discussion = os.path.join(HERE, "dial_recipe_discussion.md")
    if os.path.isfile(discussion):
        lines += ["", open(discussion).read().rstrip()]
    with open(os.path.join(RESULTS, "dial_recipe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in records:
        xs, ys = [p["gain"] for p in r["points"]], [p["kl"] for p in r["points"]]
        style = dict(color="black", lw=2.2) if r["name"].startswith("full") else dict(lw=1.2)
        ax.plot(xs, ys, "-o", ms=3, label=r["name"], **style)
    ax.set_xlabel("gain: drop of Spanish validation bits/char")
    ax.set_ylabel("drift: KL to base on English validation (nats/token)")
    ax.set_title("Dial curves (s = 0 ... 1) of each run; lower right is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "dial_recipe.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
