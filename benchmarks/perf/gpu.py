"""GPU training-step benchmark: Control LLM against full fine-tuning on a ~1B Llama shape in bf16.

    .venv/bin/python benchmarks/perf/gpu.py [--steps 10] [--batch 8] [--seq-len 2048] [--output benchmarks/results/perf_gpu.json]

Sized for one run of under 10 minutes on one H100/H200: for each method it builds the model on the
GPU (random weights, bf16, SDPA attention), runs 3 warm-up and `--steps` timed steps (forward,
backward, AdamW step) and reports tokens/s, peak GPU memory and model FLOPs utilisation (MFU):
model FLOPs of the step (linear layers, LM head and attention, forward + the backward each method
really needs) per second over the GPU's dense bf16 peak (`--peak-tflops`, default 989 for H100/H200 SXM).
Each method runs alone on the GPU (for its peak memory), one after the other; medians are reported. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# A ~1.2B Llama (Llama-3.2-1B's shape).
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                max_position_embeddings=4096, rms_norm_eps=1e-5)


def step_flops(shape: dict, method: str, k: int, tokens: int, seq_len: int) -> float:
    """Model FLOPs of one training step: matmuls of linear layers, LM head and attention scores."""
    H, I, V, N = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = H // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = 2 * tokens * (2 * H * H + 2 * H * kv + 3 * H * I)
    attn = 2 * tokens * seq_len * H  # QK^T and AV, causal (half of 4 * T * H per token)
    layer_fwd, layer_bwd_in, layer_bwd_w = linear + attn, linear + 2 * attn, linear
    head = 2 * tokens * H * V
    if method == "full":
        return N * layer_fwd + head + N * (layer_bwd_in + layer_bwd_w) + 2 * head
    split = N // k
    positions = [i for i in range(N) if (i + 1) % split == 0][:k]
    low = positions[0]
    forward = (N + k) * layer_fwd + head
    backward = head + (N - 1 - low) * layer_bwd_in + k * layer_bwd_w + (k - 1) * layer_bwd_in
    return forward + backward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Control LLM vs full fine-tuning training step on one GPU (bf16)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-expanded-layers", type=int, default=None, help="default N // 4")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output", default=os.path.join(HERE, "..", "results", "perf_gpu.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu.py: no CUDA GPU is available (torch.cuda.is_available() is False); this benchmark needs one "
              "(e.g. an H100/H200) and a CUDA build of torch. Nothing was measured.", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, HERE)
    from common import optimizer_state_bytes

    from controlllm import ControlConfig, get_control_model

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    shape = LLAMA_1B
    n = shape["num_hidden_layers"]
    k = args.num_expanded_layers or n // 4
    tokens = args.batch * args.seq_len
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq_len), device=device)
    mask = torch.ones_like(ids)

    def build(method):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
        model.to(torch.bfloat16)
        if method == "control":
            model = get_control_model(model, ControlConfig(num_expanded_layers=k))
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # Pure bf16 training (AdamW moments in the parameters' dtype): the usual speed-benchmark set-up.
        return model, torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step(model, opt):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    results = {}
    # Memory: each method alone on the GPU (the other is built after this one is freed).
    for method in ("control", "full"):
        model, opt = build(method)
        for _ in range(args.warmup):
            step(model, opt)
        torch.cuda.reset_peak_memory_stats()
        times = [step(model, opt) for _ in range(args.steps)]
        t = statistics.median(times)
        flops = step_flops(shape, method, k, tokens, args.seq_len)
        results[method] = dict(step_s=t, step_times=times, tokens_per_s=tokens / t,
                               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                               optimizer_state_gib=optimizer_state_bytes(opt) / 2**30,
                               model_tflops_per_step=flops / 1e12, mfu=flops / t / (args.peak_tflops * 1e12))
        del model, opt
        torch.cuda.empty_cache()
    c, f = results["control"], results["full"]
    print(f"| method | step (s) | tokens/s | peak memory (GiB) | MFU | trainable |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_memory_gib']:.1f} | "
              f"{100 * r['mfu']:.1f}% | {r['trainable_params']:,d} |")
    print(f"\nControl k={k} / full: step {c['step_s'] / f['step_s']:.2f}x, memory {c['peak_memory_gib'] / f['peak_memory_gib']:.2f}x")
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=shape, batch=args.batch,
               seq_len=args.seq_len, k=k, gradient_checkpointing=args.gradient_checkpointing,
               peak_tflops=args.peak_tflops, results=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
