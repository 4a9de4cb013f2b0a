"""Memory benchmark: peak RSS of one training step on a quantised frozen branch, against full
fine-tuning, LoRA and QLoRA, at SmolLM2-135M's shape and at Llama-3.2-1B's shape (random weights), on CPU.

    .venv/bin/python benchmarks/memory/run.py             # both shapes, six methods (about 15 min on 2 cores)
    .venv/bin/python benchmarks/memory/run.py --quick     # a small shape, smoke run (< 1 min)
    .venv/bin/python benchmarks/memory/run.py --render    # rewrite memory.md / .png from memory.json

Each method runs in its own subprocess: the model is built (and quantised), the optimizer made,
then the kernel's high-water mark (VmHWM) is reset and one training step runs (forward with the
labels' loss, backward, AdamW step); the peak RSS of that step, which includes everything resident
(the model, its gradients, the optimizer state allocated in that first step, activations), is
read back. Ratios are to full fine-tuning measured in the same run. The methods go through
`controlllm.training.train.prepare_model`, the same path `controlllm train` takes. Writes memory.json,
memory.md and memory.png to benchmarks/results/ (or --output-dir); benchmarks/memory/notes.md,
when present, is appended to memory.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "perf"))
from common import (SMOLLM2_135M, batch, llama_config, machine_info, make_optimizer, random_model,  # noqa: E402
                    reset_peak_rss, rss_bytes, train_step, trainable, vm_hwm_bytes)

RESULTS = os.path.normpath(os.path.join(HERE, "..", "results"))
GiB = 1024 ** 3
COPIES = 8
COPY_RANK = 16  # low-rank copies: rank 16, alpha 32 (LoRA's settings below)

# Llama-3.2-1B's shape: 16 layers, hidden 2048, tied embeddings over a 128256-token vocabulary.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                max_position_embeddings=2048, rms_norm_eps=1e-5)
# Llama-3.1-8B, the paper's model (arithmetic only).
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
QUICK = dict(SMOLLM2_135M, vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=10,
             num_attention_heads=4, num_key_value_heads=2)

# name -> shape, dtype of weights and training, batch, sequence. fp32 full fine-tuning of 1.24 B
# parameters needs ~20 GB for weights, gradients and AdamW alone (16 bytes each), more than this
# machine's free memory: the 1B shape trains in bf16 (weights, gradients and AdamW state, 8 bytes
# each). bf16 matrix products run at ~4 GFLOP/s on this AVX2 CPU, so its sequence is short.
SHAPES = {
    "smollm2-135m": dict(shape=SMOLLM2_135M, dtype="float32", batch=1, seq=256),
    "llama-1b": dict(shape=LLAMA_1B, dtype="bfloat16", batch=1, seq=32),
}
QUICK_SHAPES = {"quick": dict(shape=QUICK, dtype="float32", batch=1, seq=64)}
# On a GPU (--device cuda, benchmarks/memory/gpu_plan.sh): the paper's model, in bf16, at a real sequence length.
GPU_SHAPES = {"llama-8b": dict(shape=LLAMA_8B, dtype="bfloat16", batch=1, seq=2048)}

METHODS = {
    "full": dict(label="full fine-tuning", method="full"),
    "lora": dict(label="LoRA r16", method="lora"),
    "qlora": dict(label="QLoRA r16 (4-bit base)", method="lora", quantize_base="4bit"),
    "control": dict(label=f"Control, {COPIES} copies", method="control"),
    "control-4bit": dict(label=f"Control, {COPIES} copies, 4-bit base", method="control", quantize_base="4bit"),
    "control-8bit": dict(label=f"Control, {COPIES} copies, 8-bit base", method="control", quantize_base="8bit"),
    # Low-rank copies (ControlConfig.copy_rank): each copy is its frozen layer, shared, plus a rank-16
    # update (alpha 32) of its 7 linear layers, as LoRA r16 but only at the copies' 8 layers.
    "lowrank-control": dict(label=f"low-rank Control r{COPY_RANK}, {COPIES} copies", method="control",
                            copy_rank=COPY_RANK),
    "lowrank-control-4bit": dict(label=f"low-rank Control r{COPY_RANK}, {COPIES} copies, 4-bit base", method="control",
                                 copy_rank=COPY_RANK, quantize_base="4bit"),
}
# Low-rank Control's target: its peak at most this many times QLoRA's (on the same shape).
LOWRANK_GOAL = ("lowrank-control-4bit", "qlora", 1.2)
GOAL = ("llama-1b", "control-4bit", 0.45)


# --------------------------------------------------------------------------------- one method
def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def worker(shape_name: str, method: str, shapes: dict, device: str = "cpu") -> dict:
    from controlllm.training.train import TrainConfig, prepare_model

    spec, m = shapes[shape_name], METHODS[method]
    dtype = getattr(torch, spec["dtype"])
    rss_start = rss_bytes()
    setup = time.perf_counter()
    base = random_model(spec["shape"], dtype)
    cfg = TrainConfig(data="unused", method=m["method"], quantize_base=m.get("quantize_base"), lora_r=16, lora_alpha=32,
                      num_expanded_layers=COPIES if m["method"] == "control" else None, copy_rank=m.get("copy_rank"),
                      copy_alpha=2.0 * m["copy_rank"] if m.get("copy_rank") else None)
    model = prepare_model(base, cfg)  # quantised (if asked) on the CPU, then moved
    model.to(device)
    model.train()
    optimizer = make_optimizer(model)
    ids, mask = (t.to(device) for t in batch(spec["shape"]["vocab_size"], spec["batch"], spec["seq"]))
    setup = time.perf_counter() - setup
    if device == "cuda":  # GPU memory: what torch allocated at its peak during the step (weights included)
        torch.cuda.synchronize()
        rss_start = rss_before = 0
        torch.cuda.reset_peak_memory_stats()
        reset = True
        seconds = train_step(model, optimizer, ids, mask)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        _trim()
        rss_before = rss_bytes()
        reset = reset_peak_rss()
        seconds = train_step(model, optimizer, ids, mask)
        peak = vm_hwm_bytes()
    trained = trainable(model)
    frozen_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items())
    return {
        "shape": shape_name, "method": method, "label": m["label"], "dtype": spec["dtype"],
        "batch": spec["batch"], "seq": spec["seq"], "peak_rss": peak, "rss_before_step": rss_before,
        "rss_after_imports": rss_start, "step_seconds": seconds, "setup_seconds": setup, "peak_reset": reset,
        "trainable_parameters": sum(p.numel() for p in trained),
        "state_dict_bytes": frozen_bytes,
    }


# ------------------------------------------------------------------------------- arithmetic
def layer_parameters(shape: dict) -> int:
    d, f = shape["hidden_size"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d


def lora_parameters(shape: dict, r: int = 16) -> int:
    d, f = shape["hidden_size"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    pairs = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    return shape["num_hidden_layers"] * sum(r * (a + b) for a, b in pairs)


def nf4_bytes_per_weight() -> float:
    # 4 bits, an 8-bit scale per block of 64 (double quantisation), a float32 per 256 scales
    return 0.5 + 1 / 64 + 4 / (64 * 256)


def state_arithmetic(shape: dict, weight_bytes: int, copies: int = COPIES) -> dict:
    """Bytes of model state (weights, gradients, AdamW moments) per method, in GB, activations
    excluded. `weight_bytes` is 4 (fp32 training) or 2 (bf16 weights, gradients and moments)."""
    layers = shape["num_hidden_layers"]
    layer = layer_parameters(shape)
    linear = layer - 2 * shape["hidden_size"]
    embed = shape["vocab_size"] * shape["hidden_size"]
    head = 0 if shape["tie_word_embeddings"] else embed
    total = layers * layer + embed + head + shape["hidden_size"]
    trained = 4 * weight_bytes  # weight, gradient, two moments
    frozen_4bit = layers * linear * nf4_bytes_per_weight()
    frozen_8bit = layers * linear * (1 + 4 / shape["hidden_size"])  # int8 + a float32 per row (about)
    rest = (total - layers * linear) * weight_bytes  # embeddings, head, norms stay in the training dtype
    lora = lora_parameters(shape)
    # Low-rank copies: LoRA r16's factors at the copies' layers only; the factors are float32 (16 bytes
    # each with gradient and AdamW moments) whatever the training dtype.
    copy_factors = lora * copies // layers
    out = {
        "parameters": total,
        "full": total * trained,
        "lora": total * weight_bytes + lora * trained,
        "qlora": frozen_4bit + rest + lora * trained,
        "control": total * weight_bytes + copies * layer * trained,
        "control-4bit": frozen_4bit + rest + copies * layer * trained,
        "control-8bit": frozen_8bit + rest + copies * layer * trained,
        "lowrank-control": total * weight_bytes + copy_factors * 16,
        "lowrank-control-4bit": frozen_4bit + rest + copy_factors * 16,
    }
    return {k: (v if k == "parameters" else v / 1e9) for k, v in out.items()}


def flops_per_token(shape: dict, seq: int, copies: int = COPIES) -> dict:
    """Training FLOPs per token (forward + backward), PaLM's count: 2 per weight forward, 4 backward
    (2 for the input gradient, 2 for the weight gradient), attention 12 L d S (no causal discount)."""
    layers, d = shape["num_hidden_layers"], shape["hidden_size"]
    layer = layer_parameters(shape)
    head = shape["vocab_size"] * d
    attn_layer = 12 * d * seq  # per layer, forward + backward
    full = 6 * (layers * layer + head) + layers * attn_layer
    # Control, copies spread evenly: the lowest copy sits at layer N/k - 1; gradients flow back
    # to it through the frozen layers above (input gradients only) and into every copy.
    lowest = layers // copies - 1
    above = layers - lowest
    frozen_fwd = 2 * (layers * layer + head) + layers * attn_layer / 3
    copy_fwd = 2 * copies * layer + copies * attn_layer / 3
    frozen_bwd = 2 * (above * layer + head) + above * attn_layer / 3
    copy_bwd = 4 * copies * layer + copies * attn_layer * 2 / 3
    control = frozen_fwd + copy_fwd + frozen_bwd + copy_bwd
    lora_bwd = 2 * (layers * layer + head) + layers * attn_layer / 3  # input gradients all the way down
    lora = frozen_fwd + lora_bwd + 6 * lora_parameters(shape)
    return {"full": full, "control": control, "lora": lora}


# ---------------------------------------------------------------------------------- report
def render(data: dict, output_dir: str) -> None:
    rows = data["results"]
    gpu = data.get("device") == "cuda"
    lines = ["# Memory: Control LLM on a quantised frozen branch, against full fine-tuning, LoRA and QLoRA "
             f"({'GPU' if gpu else 'CPU'})", ""]
    lines += [f"Command: `{data['command']}` (started {data['started']}, {data['minutes']:.1f} min in all).", ""]
    for update in data.get("updates", []):
        lines += [f"Then: `{update['command']}` (started {update['started']}), measuring the methods it names "
                  "again into the same memory.json.", ""]
    info = data["machine"]
    lines += [f"Machine: {info.get('cpu')}, {info.get('cpu_count')} CPU cores, torch threads {data['threads']}, "
              f"{(info.get('memory_bytes') or 0) / GiB:.0f} GiB RAM, shared with other jobs (step times are single steps on a busy "
              f"machine: read them as rough). Python {info.get('python')}, torch {info.get('torch')}, transformers "
              f"{info.get('transformers')}, bitsandbytes {data.get('bitsandbytes')}.", ""]
    if gpu:
        lines += [f"Device: {data.get('gpu')}. Peak memory is torch.cuda.max_memory_allocated over one training step "
                  "(weights, gradients, optimizer state, activations; the CUDA context and the allocator's cache are "
                  "not in it), so the 'process baseline' columns equal the peak columns.", ""]
    lines += ["Method: each method in its own process; the model is built with random weights (and quantised), "
              "the optimizer made (AdamW, fused, as the HF Trainer), the kernel's peak-RSS mark (VmHWM) reset, then "
              "one training step (forward with the LM loss, backward, AdamW step: the first step, which allocates "
              "AdamW's moments; its time includes first-call costs). Peak RSS is everything resident during that step: weights, quantised weights, "
              "gradients, optimizer state, activations, and the ~0.56 GB of the Python process itself (the 'process baseline' column subtracts it). Methods go "
              "through `controlllm.training.train.prepare_model`. LoRA/QLoRA: r 16, alpha 32, every linear layer of the "
              f"decoder. Control: {COPIES} copies spread evenly, lerp w = 0.5 fixed, nmse alignment (the defaults). "
              f"Low-rank Control (`controlllm train --method control --copy-rank {COPY_RANK}`, with `--quantize-base "
              f"4bit` for the 4-bit row): the same {COPIES} copies, each its frozen layer shared (not copied) plus "
              f"rank-{COPY_RANK}, alpha-{2 * COPY_RANK} float32 factors B A on its 7 linear layers. "
              "Quantised bases: every linear layer of the decoder in bitsandbytes nf4 (4-bit, double-quantised "
              "scales) or int8 rows (8-bit); embeddings, norms and the (tied) LM head stay in the training dtype.", ""]
    goal_shape, goal_method, goal_ratio = GOAL
    for shape_name in data["shapes"]:
        spec = data["shapes"][shape_name]
        mine = [r for r in rows if r["shape"] == shape_name]
        full = next((r for r in mine if r["method"] == "full" and "peak_rss" in r), None)
        shape = spec["shape"]
        lines += [f"## {shape_name}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, intermediate "
                  f"{shape['intermediate_size']}, vocab {shape['vocab_size']}, {spec['dtype']}, batch {spec['batch']} x "
                  f"{spec['seq']} tokens", ""]
        lines += ["| method | peak RSS (GB) | vs full FT | peak - process baseline (GB) | vs full FT | step (s) | "
                  "step vs full FT | trainable params | model state, arithmetic (GB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        weight_bytes = 2 if spec["dtype"] == "bfloat16" else 4
        arith = state_arithmetic(shape, weight_bytes)
        for r in mine:
            if "peak_rss" not in r:
                lines.append(f"| {r['label']} | failed: {r.get('error', '?')} | | | | | | | |")
                continue
            base = r["peak_rss"] - r["rss_after_imports"]

            def vs_full(value, key, fmt):  # "-" when full fine-tuning was not measured in this run
                if full is None:
                    return "-"
                ref = full["peak_rss"] - full["rss_after_imports"] if key == "baseline" else full[key]
                return format(value / ref, fmt)

            lines.append(
                f"| {r['label']} | {r['peak_rss'] / 1e9:.2f} | {vs_full(r['peak_rss'], 'peak_rss', '.3f')} | "
                f"{base / 1e9:.2f} | {vs_full(base, 'baseline', '.3f')} | {r['step_seconds']:.2f} | "
                f"{vs_full(r['step_seconds'], 'step_seconds', '.2f')} | "
                f"{r['trainable_parameters'] / 1e6:.1f} M | {arith[r['method']]:.2f} |")
        lines.append("")
        if shape_name == goal_shape and full:
            hit = next((r for r in mine if r["method"] == goal_method and "peak_rss" in r), None)
            if hit:
                ratio = hit["peak_rss"] / full["peak_rss"]
                lines += [f"Goal: {METHODS[goal_method]['label']} at or below {goal_ratio}x full fine-tuning's peak "
                          f"memory at this shape: measured **{ratio:.3f}x**, "
                          f"{'met' if ratio <= goal_ratio else '**not met**'} (see the notes below).", ""]
        method, against, limit = LOWRANK_GOAL
        mine_row = next((r for r in mine if r["method"] == method and "peak_rss" in r), None)
        ref_row = next((r for r in mine if r["method"] == against and "peak_rss" in r), None)
        if mine_row and ref_row:
            ratio = mine_row["peak_rss"] / ref_row["peak_rss"]
            net = (mine_row["peak_rss"] - mine_row["rss_after_imports"]) / (ref_row["peak_rss"] - ref_row["rss_after_imports"])
            lines += [f"Low-rank Control: {METHODS[method]['label']} at or below {limit}x {METHODS[against]['label']}'s "
                      f"peak at this shape: measured **{ratio:.3f}x** ({net:.3f}x without the process baseline), "
                      f"{'met' if ratio <= limit else '**not met**'}.", ""]
    lines += ["## The paper's shape: Llama-3.1-8B (32 layers, hidden 4096, intermediate 14336, vocab 128256, untied "
              f"LM head), {COPIES} copies, arithmetic", ""]
    lines += ["Model state only (weights, gradients, AdamW's two moments; activations excluded): 16 bytes per trained "
              "parameter in fp32 (8 in pure bf16), the frozen weights at 4 (2) bytes, nf4 at "
              f"{nf4_bytes_per_weight():.4f} bytes and int8 at ~1 byte per weight; embeddings and LM head stay in the "
              "training dtype.", ""]
    lines += ["| method | fp32 (GB) | vs full FT | bf16 (GB) | vs full FT | bf16 vs QLoRA |", "|---|---|---|---|---|---|"]
    a32, a16 = state_arithmetic(LLAMA_8B, 4), state_arithmetic(LLAMA_8B, 2)
    for method, m in METHODS.items():
        lines.append(f"| {m['label']} | {a32[method]:.1f} | {a32[method] / a32['full']:.3f} | {a16[method]:.1f} | "
                     f"{a16[method] / a16['full']:.3f} | {a16[method] / a16['qlora']:.2f} |")
    fl = flops_per_token(LLAMA_8B, 8192)
    lines += ["", f"Parameters: {a32['parameters'] / 1e9:.2f} B; one decoder layer {layer_parameters(LLAMA_8B) / 1e6:.1f} M, "
              f"{COPIES} copies {COPIES * layer_parameters(LLAMA_8B) / 1e9:.2f} B trained; LoRA r16 "
              f"{lora_parameters(LLAMA_8B) / 1e6:.1f} M.", "",
              "Training FLOPs per token at sequence 8192 (PaLM's count: 6 per weight, attention 12 L d S; Control: "
              "forward through both branches, backward through the layers above the lowest copy and into the "
              "copies; a quantised base adds a dequantisation per frozen matrix per forward and backward, which is "
              "memory traffic, not FLOPs):", "",
              "| method | GFLOP/token | vs full FT |", "|---|---|---|"]
    for k in ("full", "lora", "control"):
        lines.append(f"| {k} | {fl[k] / 1e9:.1f} | {fl[k] / fl['full']:.3f} |")
    notes = os.path.join(HERE, "notes.md")
    if os.path.isfile(notes):
        lines += ["", open(notes).read().strip()]
    with open(os.path.join(output_dir, "memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(data, os.path.join(output_dir, "memory.png"))


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(data["shapes"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(shapes))
    methods = list(METHODS)
    for j, shape_name in enumerate(shapes):
        rows = {r["method"]: r for r in data["results"] if r["shape"] == shape_name and "peak_rss" in r}
        if "full" not in rows:
            continue
        xs = [i + (j - (len(shapes) - 1) / 2) * width for i in range(len(methods))]
        mem = [rows[m]["peak_rss"] / rows["full"]["peak_rss"] if m in rows else 0 for m in methods]
        step = [rows[m]["step_seconds"] / rows["full"]["step_seconds"] if m in rows else 0 for m in methods]
        axes[0].bar(xs, mem, width, label=shape_name)
        axes[1].bar(xs, step, width, label=shape_name)
    axes[0].axhline(GOAL[2], color="k", linestyle="--", linewidth=1, label=f"goal {GOAL[2]} ({GOAL[0]}, 4-bit Control)")
    for ax, title in ((axes[0], "peak RSS of one training step / full FT"), (axes[1], "step time / full FT")):
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([METHODS[m]["label"].replace(", ", "\n") for m in methods], fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------ main
def data_started(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render", action="store_true", help="rewrite memory.md and memory.png from memory.json")
    parser.add_argument("--output-dir", default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default=None, help="comma-separated subset of the shapes")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--update", action="store_true",
                        help="measure the chosen shapes/methods again into the existing memory.json (its other rows kept)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: the Llama-3.1-8B shape on the GPU, peak = max_memory_allocated")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if args.device == "cuda" else SHAPES
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(worker(*args.worker, shapes, args.device)))
        return
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "memory.json")
    if args.render:
        with open(path) as f:
            render(json.load(f), args.output_dir)
        return
    import bitsandbytes

    chosen = args.shapes.split(",") if args.shapes else list(shapes)
    started = time.time()
    command = " ".join([".venv/bin/python", "benchmarks/memory/run.py", *sys.argv[1:]])
    data = {"command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "threads": args.threads,
            "machine": machine_info(), "bitsandbytes": bitsandbytes.__version__,
            "shapes": {k: shapes[k] for k in chosen}, "results": [], "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    if args.update:
        with open(path) as f:
            data = json.load(f)
        data.setdefault("updates", []).append({"command": command, "started": data_started(started)})
        data["shapes"].update({k: shapes[k] for k in chosen})
        started = time.time() - 60 * data.get("minutes", 0)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for shape_name in chosen:
        for method in args.methods.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", shape_name, method,
                   "--threads", str(args.threads), "--device", args.device] + (["--quick"] if args.quick else [])
            t = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode == 0:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                row = {"shape": shape_name, "method": method, "label": METHODS[method]["label"],
                       "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
            data["results"] = [r for r in data["results"] if (r["shape"], r["method"]) != (shape_name, method)]
            data["results"].append(row)
            data["results"].sort(key=lambda r: (list(SHAPES).index(r["shape"]) if r["shape"] in SHAPES else 0,
                                                list(METHODS).index(r["method"])))
            print(f"{shape_name:14s} {method:13s} {time.time() - t:6.1f}s "
                  + (f"peak {row['peak_rss'] / GiB:.2f} GiB step {row['step_seconds']:.2f}s" if "peak_rss" in row
                     else row["error"]), flush=True)
            data["minutes"] = (time.time() - started) / 60
            with open(path, "w") as f:
                json.dump(data, f, indent=2)
    render(data, args.output_dir)
    print(os.path.join(args.output_dir, "memory.md"))


if __name__ == "__main__":
    main()
