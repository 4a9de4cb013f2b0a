"""perf.md and perf_*.png from the benchmark's perf.json (see run.py)."""

from __future__ import annotations

import os

MiB = 1024 * 1024


def linear_flops(shape: dict, spec: dict, tokens: int) -> float:
    """Matmul FLOPs of one training step (forward + backward), linear layers and LM head only.

    Backward costs one input-gradient matmul wherever a gradient must flow further down and one
    weight-gradient matmul for every trained weight; frozen layers below the lowest trained one
    cost nothing in backward. (For stack the same count is used as for concat.) Attention scores (about 4% at 256 tokens) and the optimizer are left out.
    """
    H, I, V, N = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = H // shape["num_attention_heads"] * shape["num_key_value_heads"]
    layer = 2 * tokens * (2 * H * H + 2 * H * kv + 3 * H * I)
    head = 2 * tokens * H * V
    method = spec["method"]
    if method == "full":
        return N * layer + head + (2 * N * layer + 2 * head)
    if method == "lora":
        r = spec.get("r", 16)
        lora = 2 * tokens * r * 2 * (4 * H + 2 * kv + 3 * (H + I)) / 2  # A and B of the seven projections
        return N * (layer + lora) + head + (head + N * layer + 2 * N * lora)
    k = spec["k"]
    split = N // k
    positions = [i for i in range(N) if (i + 1) % split == 0][:k]
    low = positions[0]
    forward = (N + k) * layer + head
    frozen_input_grads = (N - 1 - low) * layer  # frozen layers above the lowest copy
    # Weight and input gradients of every copy (inside the lowest one too: its norm weights train).
    copies = 2 * k * layer
    return forward + head + frozen_input_grads + copies


def _fmt_mib(b):
    return f"{b / MiB:,.0f}" if b is not None else "-"


def _row(table, label):
    for r in table:
        if r["label"] == label:
            return r
    return None


def render(data: dict, out_dir: str) -> None:
    parts = data["parts"]
    s = data["settings"]
    shape = s["shape"]
    n = shape["num_hidden_layers"]
    q = max(1, n // 4)
    lines = ["# Performance: Control LLM against full fine-tuning, LoRA and LLaMA-Pro (CPU)", ""]
    m = data["machine"]
    lines += [
        f"Command: `{data['command']}` (started {data.get('started')}, finished {data.get('finished', 'not finished')}, "
        f"{data.get('wall_s', 0) / 60:.1f} min).",
        "",
    ]
    for extra in data.get("update_commands", []):
        lines += [f"Then, to re-measure parts once another job had left the machine: `{extra}`. The first "
                  "measurements are kept in perf.json under `superseded` and summarised at the end of this file.", ""]
    lines += [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores, torch threads {m['torch_threads']}, "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB RAM, shared with other jobs (timings are noisy: methods that are "
        "compared alternate step by step in one process, and medians and ratios are reported). "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.",
        "",
        f"Model: Llama with SmolLM2-135M's shape (vocab {shape['vocab_size']}, hidden {shape['hidden_size']}, "
        f"intermediate {shape['intermediate_size']}, {n} layers, {shape['num_attention_heads']} heads, "
        f"{shape['num_key_value_heads']} KV heads, tied embeddings), random weights, fp32, SDPA attention. "
        "AdamW over the trainable parameters.",
        "",
    ]
    if data.get("skipped"):
        lines += [f"Not measured in this run (out of the time budget): {', '.join(data['skipped'])}.", ""]
    if data.get("quick"):
        lines += ["**Quick (smoke) run at reduced size: the numbers say nothing about the real shape.**", ""]

    targets = []
    train = parts.get("train")
    mem = parts.get("memory")
    ctrl_label = f"control k={q} lerp+mse"
    if train:
        rows = train["rows"]
        full, lora, ctrl = _row(rows, "full fine-tuning"), _row(rows, "LoRA r16 all-linear"), _row(rows, ctrl_label)
        tokens = train["batch"] * train["seq_len"]
        lines += [f"## Training step (batch {train['batch']} x {train['seq_len']} tokens; forward, backward, AdamW step)", "",
                  f"Median of {train['reps']} timed steps after one short warm-up step per method, methods alternating.", "",
                  "| method | step (s) | tokens/s | vs full FT | vs LoRA | FLOP model vs full FT | trainable params | optimizer state (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        full_flops = linear_flops(shape, dict(method="full"), tokens)
        for r in rows:
            fl = linear_flops(shape, r["spec"], tokens) / full_flops
            lines.append(f"| {r['label']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['step_s'] / full['step_s']:.2f}x | "
                         f"{r['step_s'] / lora['step_s']:.2f}x | {fl:.2f}x | {r['trainable_params']:,d} "
                         f"({100 * r['trainable_params'] / r['total_params']:.1f}%) | {_fmt_mib(r['optimizer_state_bytes'])} |")
        lines += ["", "Step times of every round (s): " + "; ".join(
            f"{r['label']}: " + ", ".join(f"{t:.2f}" for t in r["step_times"]) for r in rows), ""]
        targets.append((f"training step, Control k={q} (lerp+mse) / full fine-tuning", "<= 0.70",
                        ctrl["step_s"] / full["step_s"], ctrl["step_s"] / full["step_s"] <= 0.70))
        targets.append((f"training step, Control k={q} (lerp+mse) / LoRA r16", "<= 1.00",
                        ctrl["step_s"] / lora["step_s"], ctrl["step_s"] / lora["step_s"] <= 1.0))
    if mem:
        rows = mem["rows"]
        full = _row(rows, "full fine-tuning")
        lines += [f"## Peak memory of a training step (batch {mem['batch']} x {mem['seq_len']}), one process per method", "",
                  "Peak RSS (kernel high-water mark, reset after the optimizer state was allocated) during one step; "
                  "'after model' is RSS once the model is built; 'training overhead' = peak - after model "
                  "(gradients, optimizer state, activations, logits).", "",
                  "| method | peak RSS (MiB) | vs full FT | after model (MiB) | training overhead (MiB) | overhead vs full FT | one step (s, not alternated) |",
                  "|---|---|---|---|---|---|---|"]
        fo = full["peak_rss"] - full["after_model_rss"]
        for r in rows:
            o = r["peak_rss"] - r["after_model_rss"]
            lines.append(f"| {r['label']} | {_fmt_mib(r['peak_rss'])} | {r['peak_rss'] / full['peak_rss']:.2f}x | "
                         f"{_fmt_mib(r['after_model_rss'])} | {_fmt_mib(o)} | {o / fo:.2f}x | {r['step_s_single']:.1f} |")
        lines.append("")
        c = _row(rows, ctrl_label)
        ratio = c["peak_rss"] / full["peak_rss"]
        targets.append((f"peak training memory, Control k={q} / full fine-tuning (peak RSS)", "<= 0.70", ratio, ratio <= 0.70))
        ck = _row(rows, ctrl_label + " + grad. ckpt")
        if ck:
            ratio = ck["peak_rss"] / full["peak_rss"]
            targets.append((f"  same, Control k={q} with gradient checkpointing", "<= 0.70", ratio, ratio <= 0.70))
    inf = parts.get("inference")
    if inf:
        k = inf["k"]
        need = 0.95 / (1 + k / inf["num_layers"])
        lines += [f"## Inference (prompt {inf['prompt']} tokens, {inf['new_tokens']} greedy decode steps with the KV cache)", "",
                  "Prefill: one forward over the prompt (logits of the last position only). Decode: tokens per second "
                  f"over the decode steps (batch x steps / time). Models alternate; medians of {inf.get('reps', '?')}. "
                  f"The merged model is {'' if inf.get('merged_same_structure_as_base') else 'NOT '}of the base class "
                  "with the same parameter names and shapes as the base model, so any speed difference between the two "
                  "is measurement noise.", "",
                  "| batch | model | prefill tokens/s | vs base | decode tokens/s | vs base |", "|---|---|---|---|---|---|"]
        base_rows = {r["batch"]: r for r in inf["rows"] if r["model"] == "base"}
        for r in inf["rows"]:
            b = base_rows[r["batch"]]
            lines.append(f"| {r['batch']} | {r['model']} | {r['prefill_tokens_per_s']:,.0f} | "
                         f"{r['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.3f}x | {r['decode_tokens_per_s']:,.1f} | "
                         f"{r['decode_tokens_per_s'] / b['decode_tokens_per_s']:.3f}x |")
        lines.append("")
        for r in inf["rows"]:
            b = base_rows[r["batch"]]
            dr = r["decode_tokens_per_s"] / b["decode_tokens_per_s"]
            pr = r["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]
            if "unmerged" in r["model"]:
                targets.append((f"decode, unmerged Control k={k} / base, batch {r['batch']}", f">= {need:.3f} (0.95/(1+k/N))", dr, dr >= need))
            if "merged" in r["model"] and "unmerged" not in r["model"]:
                targets.append((f"decode, merged / base, batch {r['batch']}", "within 3%", dr, abs(dr - 1) <= 0.03))
                targets.append((f"prefill, merged / base, batch {r['batch']}", "within 3%", pr, abs(pr - 1) <= 0.03))
    ks = parts.get("k_sweep")
    if ks:
        lines += [f"## Step time against the number of expanded layers (batch {ks['batch']} x {ks['seq_len']}, "
                  f"lerp + mse, median of {ks['reps']})", "", "![k sweep](perf_k_sweep.png)", "",
                  "| method | step (s) | vs full FT | FLOP model vs full FT |", "|---|---|---|---|"]
        full = _row(ks["rows"], "full fine-tuning")
        tokens = ks["batch"] * ks["seq_len"]
        ff = linear_flops(shape, dict(method="full"), tokens)
        for r in ks["rows"]:
            spec = dict(method="control", k=r["k"]) if r["k"] else dict(method="full" if "full" in r["label"] else "lora")
            lines.append(f"| {r['label']} | {r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f}x | "
                         f"{linear_flops(shape, spec, tokens) / ff:.2f}x |")
        lines.append("")
        _plot_k(ks, os.path.join(out_dir, "perf_k_sweep.png"))
    ss = parts.get("seq_sweep")
    if ss:
        lines += [f"## Step time against sequence length (batch {ss['batch']}, median of {ss['reps']})", "",
                  "![sequence sweep](perf_seq_sweep.png)", "", "| seq len | " + " | ".join(
                      dict.fromkeys(r["label"] for r in ss["rows"])) + " | ratio |", "|---|---|---|---|"]
        for seq in sorted({r["seq_len"] for r in ss["rows"]}):
            rs = [r for r in ss["rows"] if r["seq_len"] == seq]
            lines.append(f"| {seq} | " + " | ".join(f"{r['step_s']:.2f} s" for r in rs) + f" | {rs[0]['step_s'] / rs[1]['step_s']:.2f}x |")
        lines.append("")
        _plot_seq(ss, os.path.join(out_dir, "perf_seq_sweep.png"))
    if targets:
        summary = ["## Targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for name, wanted, got, ok in targets:
            summary.append(f"| {name} | {wanted} | {got:.3f} | {'yes' if ok else '**no**'} |")
        summary.append("")
        insert = next(i for i, line in enumerate(lines) if line.startswith("## "))
        lines[insert:insert] = summary
    old = data.get("superseded", {})
    if old:
        lines += ["## First measurements, superseded (taken while another job loaded the machine)", ""]
        if "train" in old:
            rows = old["train"]["rows"]
            full, lora = _row(rows, "full fine-tuning"), _row(rows, "LoRA r16 all-linear")
            lines += ["| method | step (s) | vs full FT | vs LoRA | rounds (s) |", "|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['label']} | {r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f}x | "
                             f"{r['step_s'] / lora['step_s']:.2f}x | " + ", ".join(f"{t:.2f}" for t in r["step_times"]) + " |")
            lines.append("")
        if "inference" in old:
            base_rows = {r["batch"]: r for r in old["inference"]["rows"] if r["model"] == "base"}
            lines += ["| batch | model | prefill vs base | decode vs base |", "|---|---|---|---|"]
            for r in old["inference"]["rows"]:
                b = base_rows[r["batch"]]
                lines.append(f"| {r['batch']} | {r['model']} | {r['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.3f}x | "
                             f"{r['decode_tokens_per_s'] / b['decode_tokens_per_s']:.3f}x |")
            lines.append("")
    notes_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")
    if os.path.exists(notes_path) and not data.get("quick"):
        with open(notes_path) as f:
            lines += ["", f.read().strip(), ""]
    with open(os.path.join(out_dir, "perf.md"), "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def _plot_k(ks: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctrl = sorted((r for r in ks["rows"] if r["k"]), key=lambda r: r["k"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["k"] for r in ctrl], [r["step_s"] for r in ctrl], "o-", label="Control LLM (lerp + mse)")
    for r, style in ((_row(ks["rows"], "full fine-tuning"), "--"), (_row(ks["rows"], "LoRA r16 all-linear"), ":")):
        if r:
            ax.axhline(r["step_s"], linestyle=style, color="gray" if style == "--" else "black", label=r["label"])
    ax.set_xlabel("expanded layers k")
    ax.set_ylabel("training step (s)")
    ax.set_title(f"Step time vs k (batch {ks['batch']} x {ks['seq_len']})")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_seq(ss: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["label"] for r in ss["rows"]):
        rs = sorted((r for r in ss["rows"] if r["label"] == label), key=lambda r: r["seq_len"])
        ax.plot([r["seq_len"] for r in rs], [r["step_s"] for r in rs], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("training step (s)")
    ax.set_title(f"Step time vs sequence length (batch {ss['batch']})")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
