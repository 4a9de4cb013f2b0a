"""Performance benchmark: training-step cost, memory and inference speed of Control LLM against
full fine-tuning, LoRA and LLaMA-Pro, on the SmolLM2-135M shape (random weights), on CPU.

    .venv/bin/python benchmarks/perf/run.py            # full run (about 15-20 min on 2 cores)
    .venv/bin/python benchmarks/perf/run.py --quick    # smoke run at reduced size (< 3 min)
    .venv/bin/python benchmarks/perf/run.py --render   # rewrite perf.md and plots from perf.json
    .venv/bin/python benchmarks/perf/run.py --update --parts train   # re-measure parts of perf.json

Timings of methods that are compared are taken in one process, methods alternating step by step
so that drift of a shared machine cancels; medians and ratios are reported. Peak memory is
measured per method in its own subprocess. Writes perf.json, perf.md and perf_*.png to
benchmarks/results/ (or --output-dir).

On a machine shared with other jobs use `--threads 1`: two OpenMP threads next to another busy
process stall at every barrier and make step times swing by 4x; one thread gives a full core.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (QUICK, SMOLLM2_135M, batch, build_base, machine_info, make_optimizer,  # noqa: E402
                    methods_for, optimizer_state_bytes, prepare, reset_peak_rss, rss_bytes, train_step,
                    trainable, vm_hwm_bytes)

RESULTS = os.path.normpath(os.path.join(HERE, "..", "results"))
MiB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs):
    return statistics.median(xs) if xs else None


def settings(quick: bool) -> dict:
    if quick:
        return dict(shape=QUICK, batch=2, seq_len=64, train_reps=3, warm_seq=64, infer_prompt=32, infer_new=8,
                    infer_batches=[1, 4], infer_reps=2, k_points=[1, 2, 4, 8], k_batch=1, k_seq=64, k_reps=2,
                    seq_points=[32, 64, 128], seq_batch=1, seq_reps=2, memory_methods=3)
    return dict(shape=SMOLLM2_135M, batch=4, seq_len=256, train_reps=3, warm_seq=32, infer_prompt=128,
                infer_new=32, infer_batches=[1, 8], infer_reps=3, k_points=[1, 3, 7, 15, 30], k_batch=2, k_seq=256,
                k_reps=2, seq_points=[128, 256, 512, 1024], seq_batch=1, seq_reps=2, memory_methods=None)


# ------------------------------------------------------------------------------------------ training
def build_trainers(shape: dict, specs: list[dict]):
    template = build_base(shape)
    trainers = []
    for spec in specs:
        model = prepare(copy.deepcopy(template), spec)
        trainers.append((spec, model, make_optimizer(model)))
    del template
    return trainers


def alternate_steps(trainers, vocab: int, batch_size: int, seq_len: int, reps: int, warm_seq: int | None) -> dict:
    """Step times per method: one warm-up step each (`warm_seq` tokens per sequence; none when
    None), then `reps` rounds, methods alternating (reversed every other round)."""
    ids, mask = batch(vocab, batch_size, seq_len)
    for spec, model, opt in (trainers if warm_seq else []):  # warm-up: kernels, optimizer state, allocator
        train_step(model, opt, ids[:, :warm_seq], mask[:, :warm_seq])
    times = {spec["label"]: [] for spec, _, _ in trainers}
    for r in range(reps):
        order = trainers if r % 2 == 0 else trainers[::-1]
        for spec, model, opt in order:
            times[spec["label"]].append(train_step(model, opt, ids, mask))
        log(f"  round {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return times


def bench_train(cfg: dict) -> dict:
    shape = cfg["shape"]
    specs = methods_for(shape["num_hidden_layers"])
    trainers = build_trainers(shape, specs)
    rows = []
    times = alternate_steps(trainers, shape["vocab_size"], cfg["batch"], cfg["seq_len"], cfg["train_reps"], cfg["warm_seq"])
    tokens = cfg["batch"] * cfg["seq_len"]
    for spec, model, opt in trainers:
        t = median(times[spec["label"]])
        params = trainable(model)
        rows.append(dict(label=spec["label"], spec=spec, step_s=t, step_times=times[spec["label"]],
                         tokens_per_s=tokens / t, trainable_params=sum(p.numel() for p in params),
                         total_params=sum(p.numel() for p in model.parameters()),
                         optimizer_state_bytes=optimizer_state_bytes(opt)))
    del trainers
    gc.collect()
    return dict(batch=cfg["batch"], seq_len=cfg["seq_len"], reps=cfg["train_reps"], rows=rows)


# ------------------------------------------------------------------------------------------- memory
def memory_child(spec: dict, quick: bool) -> dict:
    """Peak RSS of one training step of `spec`, in this (fresh) process."""
    cfg = settings(quick)
    shape = cfg["shape"]
    start_rss = rss_bytes()
    model = prepare(build_base(shape), spec)
    gc.collect()
    after_model = rss_bytes()
    opt = make_optimizer(model)
    # Allocate the optimizer state without a forward pass: zero gradients, one step.
    for p in trainable(model):
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    after_optimizer = rss_bytes()
    reset = reset_peak_rss()
    ids, mask = batch(shape["vocab_size"], cfg["batch"], cfg["seq_len"])
    step = train_step(model, opt, ids, mask)
    return dict(label=spec["label"], spec=spec, start_rss=start_rss, after_model_rss=after_model,
                after_optimizer_rss=after_optimizer, peak_rss=vm_hwm_bytes(), peak_reset=reset,
                step_s_single=step, optimizer_state_bytes=optimizer_state_bytes(opt))


def bench_memory(cfg: dict, quick: bool) -> dict:
    n = cfg["shape"]["num_hidden_layers"]
    specs = methods_for(n)
    specs.append(dict(specs[0], label=specs[0]["label"] + " + grad. ckpt", gradient_checkpointing=True))
    specs.append(dict(label="full fine-tuning + grad. ckpt", method="full", gradient_checkpointing=True))
    if cfg["memory_methods"]:  # quick: Control k=N/4, full fine-tuning, LoRA
        specs = [specs[0], specs[4], specs[5]]
    rows = []
    for spec in specs:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)] + (["--quick"] if quick else [])
        cmd += ["--threads", str(torch.get_num_threads())]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory run for {spec['label']} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"  {row['label']}: peak {row['peak_rss'] / MiB:.0f} MiB, after model {row['after_model_rss'] / MiB:.0f} MiB")
        rows.append(row)
    return dict(batch=cfg["batch"], seq_len=cfg["seq_len"], rows=rows)


# ---------------------------------------------------------------------------------------- inference
@torch.inference_mode()
def prefill_and_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `new_tokens` greedy tokens), with the KV cache."""
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return prefill, time.perf_counter() - start


def bench_inference(cfg: dict) -> dict:
    from controlllm import ControlConfig, get_control_model

    shape = cfg["shape"]
    n = shape["num_hidden_layers"]
    k = max(1, n // 4)
    base = build_base(shape).eval()
    control = get_control_model(copy.deepcopy(base), ControlConfig(num_expanded_layers=k)).eval()
    merged = get_control_model(copy.deepcopy(base), ControlConfig(num_expanded_layers=k)).merge_and_unload().eval()
    # ControlModel.generate runs the base model's generate on the model holding the blocks.
    models = {"base": base, f"Control k={k} unmerged": control.base_model, f"Control k={k} merged": merged}
    same_structure = (type(merged) is type(base)
                      and [(n, p.shape) for n, p in merged.named_parameters()] == [(n, p.shape) for n, p in base.named_parameters()])
    rows = []
    for b in cfg["infer_batches"]:
        prompt = batch(shape["vocab_size"], b, cfg["infer_prompt"])[0]
        for m in models.values():  # warm-up
            prefill_and_decode(m, prompt[:, :8], 2)
        pre = {name: [] for name in models}
        dec = {name: [] for name in models}
        for r in range(cfg["infer_reps"]):
            for name, m in (models.items() if r % 2 == 0 else list(models.items())[::-1]):
                p, d = prefill_and_decode(m, prompt, cfg["infer_new"])
                pre[name].append(p)
                dec[name].append(d)
        for name in models:
            rows.append(dict(model=name, batch=b, prefill_s=median(pre[name]), decode_s=median(dec[name]),
                             prefill_tokens_per_s=b * cfg["infer_prompt"] / median(pre[name]),
                             decode_tokens_per_s=b * cfg["infer_new"] / median(dec[name]),
                             prefill_times=pre[name], decode_times=dec[name]))
            log(f"  batch {b} {name}: prefill {rows[-1]['prefill_tokens_per_s']:.0f} tok/s, "
                f"decode {rows[-1]['decode_tokens_per_s']:.1f} tok/s")
    return dict(k=k, num_layers=n, prompt=cfg["infer_prompt"], new_tokens=cfg["infer_new"], reps=cfg["infer_reps"],
                merged_same_structure_as_base=same_structure, rows=rows)


# ------------------------------------------------------------------------------------------- sweeps
def bench_k_sweep(cfg: dict) -> dict:
    shape = cfg["shape"]
    specs = [dict(label=f"control k={k}", method="control", k=k, interpolation="lerp", alignment_loss="mse")
             for k in cfg["k_points"]]
    specs += [dict(label="full fine-tuning", method="full"), dict(label="LoRA r16 all-linear", method="lora", r=16)]
    trainers = build_trainers(shape, specs)
    # Few timed rounds: warm up at the measured size so the first round is not an outlier.
    times = alternate_steps(trainers, shape["vocab_size"], cfg["k_batch"], cfg["k_seq"], cfg["k_reps"], cfg["k_seq"])
    rows = [dict(label=s["label"], k=s.get("k"), step_s=median(times[s["label"]]), step_times=times[s["label"]])
            for s, _, _ in trainers]
    del trainers
    gc.collect()
    return dict(batch=cfg["k_batch"], seq_len=cfg["k_seq"], reps=cfg["k_reps"], rows=rows)


def bench_seq_sweep(cfg: dict) -> dict:
    shape = cfg["shape"]
    n = shape["num_hidden_layers"]
    specs = [methods_for(n)[0], dict(label="full fine-tuning", method="full")]
    trainers = build_trainers(shape, specs)
    rows = []
    # Longest first, warmed up at that length: shorter steps then reuse memory already mapped.
    for j, seq in enumerate(sorted(cfg["seq_points"], reverse=True)):
        times = alternate_steps(trainers, shape["vocab_size"], cfg["seq_batch"], seq, cfg["seq_reps"], seq if j == 0 else None)
        for s, _, _ in trainers:
            rows.append(dict(label=s["label"], seq_len=seq, step_s=median(times[s["label"]]), step_times=times[s["label"]]))
    del trainers
    gc.collect()
    return dict(batch=cfg["seq_batch"], reps=cfg["seq_reps"], rows=rows)


# ------------------------------------------------------------------------------------------- report
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Control LLM performance benchmark (CPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run at reduced size (< 3 min)")
    parser.add_argument("--output-dir", default=None, help="default benchmarks/results (quick: benchmarks/results/quick)")
    parser.add_argument("--parts", default="train,memory,inference,k_sweep,seq_sweep")
    parser.add_argument("--render", action="store_true", help="only rewrite perf.md and plots from perf.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--start-parts-within-min", type=float, default=None,
                        help="skip parts that would start later than this many minutes into the run")
    parser.add_argument("--infer-reps", type=int, default=None, help="override the inference repetitions")
    parser.add_argument("--update", action="store_true",
                        help="re-measure only --parts and replace them in the existing perf.json")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child), args.quick)))
        return
    out_dir = args.output_dir or (os.path.join(RESULTS, "quick") if args.quick else RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "perf.json")
    from report import render

    if args.render:
        with open(json_path) as f:
            render(json.load(f), out_dir)
        return
    cfg = settings(args.quick)
    if args.infer_reps:
        cfg["infer_reps"] = args.infer_reps
    command = "benchmarks/perf/run.py" + (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads else "")
    if args.start_parts_within_min is not None:
        command += f" --start-parts-within-min {args.start_parts_within_min:g}"
    if args.update:
        command += f" --update --parts {args.parts}" + (f" --infer-reps {args.infer_reps}" if args.infer_reps else "")
        with open(json_path) as f:
            data = json.load(f)
        data.setdefault("update_commands", []).append(f".venv/bin/python {command}")
    else:
        data = dict(command=f".venv/bin/python {command}", quick=args.quick, machine=machine_info(),
                    load_at_start=os.getloadavg(), started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    settings={k: v for k, v in cfg.items()}, parts={})
    started = time.perf_counter()
    parts = {"train": lambda: bench_train(cfg), "memory": lambda: bench_memory(cfg, args.quick),
             "inference": lambda: bench_inference(cfg), "k_sweep": lambda: bench_k_sweep(cfg),
             "seq_sweep": lambda: bench_seq_sweep(cfg)}
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        if args.start_parts_within_min is not None and t0 - started > 60 * args.start_parts_within_min:
            log(f"{name} skipped: out of time")
            data.setdefault("skipped", []).append(name)
            continue
        log(f"{name} ...")
        if args.update and name in data["parts"]:
            data.setdefault("superseded", {})[name] = data["parts"][name]
        data["parts"][name] = parts[name]()
        data["parts"][name]["wall_s"] = time.perf_counter() - t0
        data["parts"][name]["measured"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        if not args.update:
            data["wall_s"] = time.perf_counter() - started
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
        log(f"{name} done in {time.perf_counter() - t0:.0f}s")
    if not args.update:
        data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    render(data, out_dir)
    log(f"wrote {json_path}, perf.md and plots in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
