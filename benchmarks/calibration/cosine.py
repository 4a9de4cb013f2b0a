"""Does the paper-cpt preset's cosine alignment drift more than nmse on a real model?

Cosine is not a function of the branches' gap (see controlllm/block.py): it pushes the layers below an
expanded layer even where the branches respond alike, and it can be lowered by growing the hidden
states. This benchmark trains SmolLM2-135M-Instruct with the paper-cpt preset twice, once with its
cosine loss and once with nmse (everything else equal: dlerp, trainable gate, weight 1, the same
8 layers, data order and rate), on the frontier benchmark's Spanish continued pre-training
(benchmarks/retention/frontier.py: 32 steps x 4 x 128 tokens, paper-cpt's chosen rate 3e-4), and
measures for each run:

* along the dial s = 0, 0.25, 0.5, 0.75, 1: the gain (Spanish test bits/char, base - run) and the KL
  to the base on held-out English (nats/token), so the two losses are compared at equal gain on their
  dial curves (`controlllm.compare.on_envelope`, as the frontier reads its envelopes);
* the mean per-token norm of the hidden state entering each expanded layer (the output of the layers
  below it), trained over base, on the English text: growth there is cosine's drift;
* the two branches' norms at each expanded layer, copy over frozen.

    .venv/bin/python benchmarks/calibration/cosine.py            # about 15 min on 2 CPU cores
    .venv/bin/python benchmarks/calibration/cosine.py --render   # rewrite the md/png from the json

Results: benchmarks/results/cosine.{md,json,png}. Each run's scores are kept in
runs/cosine/<loss>.json, so an interrupted benchmark resumes with the run it had not finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "retention"))

LOSSES = ("cosine", "nmse")
DIALS = (0.0, 0.25, 0.5, 0.75, 1.0)
LEVELS = (0.5, 0.75, 0.9)  # shares of the smaller of the two runs' gains at s = 1


@torch.no_grad()
def measure(model, tokenizer, spanish: list[str], english: list[str], reference) -> dict:
    """Gain and KL along the dial; hidden-state norms below and at each expanded layer (trained / base)."""
    import retention_tasks as tasks

    model.eval()
    with model.disable_control():
        base_sp = tasks.per_text_scores(model, tokenizer, spanish)
    base_bpc = tasks.bpc(base_sp)
    curve = []
    for s in DIALS:
        model.set_dial(s)
        sp = tasks.per_text_scores(model, tokenizer, spanish)
        en = tasks.per_text_scores(model, tokenizer, english, reference=reference)
        curve.append({"dial": s, "gain": base_bpc - tasks.bpc(sp), "kl": sum(en["kl"]) / sum(en["tokens"])})
    model.set_dial(1.0)
    expanded = sorted(model.control_blocks)
    below = {i: [0.0, 0.0] for i in expanded}
    branches = {i: [0.0, 0.0] for i in expanded}  # summed token norms of the copy's and the frozen layer's output
    hooks, active = [], [True]
    for i, block in model.control_blocks.items():
        for k, layer in enumerate((block.expanded_layer, block.base_layer)):
            def grab(mod, args, out, i=i, k=k):
                if not active[0]:
                    return
                h = out[0] if isinstance(out, tuple) else out
                branches[i][k] += float(h.float().norm(dim=-1).sum())
            hooks.append(layer.register_forward_hook(grab))
    for text in english:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
        trained = model(input_ids=ids, output_hidden_states=True).hidden_states
        active[0] = False
        with model.disable_control():
            base = model(input_ids=ids, output_hidden_states=True).hidden_states
        active[0] = True
        for i in expanded:  # hidden_states[i] is the input of decoder layer i
            below[i][0] += float(trained[i].float().norm(dim=-1).sum())
            below[i][1] += float(base[i].float().norm(dim=-1).sum())
    for h in hooks:
        h.remove()
    out = {"base_spanish_bpc": base_bpc, "dial": curve,
           "norm_ratio_below": {str(i): t / b for i, (t, b) in below.items()}}
    if any(b[1] for b in branches.values()):
        out["copy_over_frozen_norm"] = {str(i): e / p for i, (e, p) in branches.items() if p}
    return out


def run_one(loss: str, args, data: dict, folder: str) -> dict:
    """Train the paper-cpt preset with alignment `loss` and measure it (cached in folder/<loss>.json)."""
    from controlllm.assets import load_pretrained
    from controlllm.training.train import TrainConfig, train

    path = os.path.join(folder, f"{loss}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    model, tokenizer = load_pretrained(None)
    cfg = TrainConfig(data=data["train_path"], output=os.path.join(folder, loss), task="cpt", method="control",
                      preset="paper-cpt", alignment_loss=loss, num_expanded_layers=8, max_steps=args.steps,
                      lr=args.lr, batch_size=4, seq_len=128, seed=42, save_steps=args.steps, progress=False,
                      threads=args.threads, logging_steps=4)
    start = time.time()
    result = train(cfg, model=model, tokenizer=tokenizer)
    trained = result.model
    base, _ = load_pretrained(None)
    base.eval()
    reference = lambda ids, mask: base(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    out = {"loss": loss, "train_seconds": round(result.seconds, 1), **measure(trained, tokenizer, data["test"],
                                                                             data["english"], reference)}
    out["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(cfg.output, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    out["last_log"] = log[-1] if log else {}
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return out


def equal_gain(results: dict) -> list[dict]:
    """KL of each loss at shared gain levels on its dial curve (read as the frontier benchmark reads
    envelopes, `controlllm.compare.on_envelope`), and the ratio cosine / nmse."""
    from controlllm.compare import on_envelope

    top = min(max(p["gain"] for p in results[loss]["dial"]) for loss in LOSSES)
    rows = []
    for frac in LEVELS:
        level = frac * top
        kl = {loss: on_envelope([p["gain"] for p in results[loss]["dial"]], [p["kl"] for p in results[loss]["dial"]],
                                level) for loss in LOSSES}
        rows.append({"level": frac, "gain": level, **kl,
                     "ratio": kl["cosine"] / kl["nmse"] if kl["cosine"] is not None and kl["nmse"] else None})
    return rows


def render(data: dict, out_dir: str) -> None:
    """benchmarks/results/cosine.md and cosine.png from the json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, eq = data["results"], data["equal_gain"]
    lines = ["# Cosine vs nmse alignment in the paper-cpt preset (SmolLM2-135M-Instruct, Spanish CPT)", "",
             f"Command: `{data['command']}` (started {data['started']}, {data['minutes']:.1f} min). "
             f"Training: {data['steps']} steps x 4 x 128 tokens of Spanish, lr {data['lr']:g}, seed 42, the "
             "paper-cpt preset (dlerp, trainable gate, alignment weight 1, 8 copies) with its cosine loss and with "
             "nmse; nothing else differs. Gain: Spanish test bits/char (base - run, 24 texts); KL(base || run) on "
             "24 held-out English texts, nats/token; the frontier benchmark's sets.", "",
             "| loss | s | gain (bits/char) | KL (nats/token) |", "|---|---|---|---|"]
    for loss in LOSSES:
        for p in res[loss]["dial"]:
            lines.append(f"| {loss} | {p['dial']:g} | {p['gain']:.4f} | {p['kl']:.5f} |")
    lines += ["", "At equal gain (on each loss's dial curve, levels = shares of the smaller gain at s = 1):", "",
              "| level | gain | KL cosine | KL nmse | cosine / nmse |", "|---|---|---|---|---|"]
    f = lambda x, fmt="{:.5f}": "-" if x is None else fmt.format(x)  # noqa: E731
    for r in eq:
        lines.append(f"| {int(r['level'] * 100)}% | {r['gain']:.4f} | {f(r['cosine'])} | {f(r['nmse'])} | "
                     f"{f(r['ratio'], '{:.2f}')} |")
    layers = list(res["cosine"]["norm_ratio_below"])
    lines += ["", "Hidden-state norm entering each expanded layer, trained / base (English text, s = 1):", "",
              "| loss | " + " | ".join(f"layer {i}" for i in layers) + " |", "|---|" + "---|" * len(layers)]
    for loss in LOSSES:
        lines.append(f"| {loss} | " + " | ".join(f"{res[loss]['norm_ratio_below'][i]:.4f}" for i in layers) + " |")
    if all("copy_over_frozen_norm" in res[loss] for loss in LOSSES):
        lines += ["", "Copy branch over frozen branch norm at each expanded layer (s = 1):", "",
                  "| loss | " + " | ".join(f"layer {i}" for i in layers) + " |", "|---|" + "---|" * len(layers)]
        for loss in LOSSES:
            lines.append(f"| {loss} | " + " | ".join(f"{res[loss]['copy_over_frozen_norm'].get(i, float('nan')):.4f}"
                                                     for i in layers) + " |")
    lines += ["", "## Reading", "", data.get("reading", "(not written yet)"), ""]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cosine.md"), "w") as fh:
        fh.write("\n".join(lines))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for loss, colour in zip(LOSSES, ("tab:red", "tab:blue")):
        a.plot([p["gain"] for p in res[loss]["dial"]], [p["kl"] for p in res[loss]["dial"]], "o-", color=colour,
               label=f"paper-cpt, {loss}")
        b.plot([int(i) for i in layers], [res[loss]["norm_ratio_below"][i] for i in layers], "o-", color=colour,
               label=loss)
    a.set_xlabel("Spanish gain (bits/char)")
    a.set_ylabel("KL to base on English (nats/token)")
    a.set_title("Along the dial, s = 0 .. 1")
    a.legend()
    b.axhline(1.0, color="grey", lw=0.5)
    b.set_xlabel("expanded layer")
    b.set_ylabel("norm of its input, trained / base")
    b.set_title("Hidden states below each copy")
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cosine.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=os.path.join(ROOT, "runs", "cosine"))
    parser.add_argument("--output-dir", default=RESULTS)
    parser.add_argument("--render", action="store_true", help="rewrite cosine.md/png from cosine.json")
    args = parser.parse_args(argv)
    json_path = os.path.join(args.output_dir, "cosine.json")
    if args.render:
        with open(json_path) as f:
            render(json.load(f), args.output_dir)
        return 0
    import retention_tasks as tasks

    torch.set_num_threads(args.threads)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.time()
    os.makedirs(args.runs, exist_ok=True)
    sp = tasks.spanish_data(500, 16, 24)
    train_path = os.path.join(args.runs, "cpt_train.txt")
    with open(train_path, "w") as f:
        f.write("\n\n".join(d.replace("\n\n", "\n") for d in sp["train"]))
    data = {"train_path": train_path, "test": sp["test"], "english": [t[:500] for t in tasks.english_heldout(24)]}
    results = {}
    for loss in LOSSES:
        print(f"[{time.strftime('%H:%M:%S')}] paper-cpt with {loss} alignment", flush=True)
        results[loss] = run_one(loss, args, data, args.runs)
    out = {"command": "python benchmarks/calibration/cosine.py" + (f" --steps {args.steps}" if args.steps != 32 else ""),
           "started": started, "minutes": (time.time() - t0) / 60, "steps": args.steps, "lr": args.lr,
           "results": results, "equal_gain": equal_gain(results)}
    if os.path.exists(json_path):  # keep a reading written for these numbers
        with open(json_path) as f:
            old = json.load(f)
        if old.get("results") == json.loads(json.dumps(results)) and "reading" in old:
            out["reading"] = old["reading"]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(out, f, indent=1)
    render(out, args.output_dir)
    for r in out["equal_gain"]:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
