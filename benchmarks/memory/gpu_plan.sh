#!/usr/bin/env bash
# Memory at the paper's shape (Llama-3.1-8B: 32 layers, hidden 4096, untied 128256-token head) on one GPU, bf16,
# batch 1 x 2048 tokens, one training step per method in its own process: full fine-tuning, LoRA r16, QLoRA r16,
# Control on 8 copies (full precision, 4-bit and 8-bit base) and low-rank Control r16 (full precision and 4-bit
# base), each as `controlllm train` builds it. Peak = torch.cuda.max_memory_allocated. Random weights (memory and
# time do not depend on their values); each model is built and quantised on the CPU (16 GB of host memory), then
# moved. About 1-2 min per method on an H100/H200 (most of it building the model), so ~15 min in all.
#
#   bash benchmarks/memory/gpu_plan.sh     # writes benchmarks/results/gpu/memory.{md,json,png}
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
"$PY" benchmarks/memory/run.py --device cuda --threads "${THREADS:-8}" --output-dir benchmarks/results/gpu \
  --methods "${METHODS:-qlora,lowrank-control-4bit,full,lora,control,control-4bit,control-8bit,lowrank-control}"
