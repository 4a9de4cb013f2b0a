#!/usr/bin/env bash
# The retention benchmark at GPU scale: one GPU, bf16 training, 2,048,000 tokens per CPT run
# (20x the CPU plan's 102,400), every item of the MC suite (up to 1,000 per benchmark).
# Results go next to the CPU ones, under benchmarks/results/retention_gpu/.
#
#     benchmarks/retention/gpu.sh                 # the whole plan
#     benchmarks/retention/gpu.sh --estimate      # print the job list and stop
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script needs a GPU')"
mkdir -p benchmarks/results/retention_gpu
exec "$PY" benchmarks/retention/run.py --plan gpu --results benchmarks/results/retention_gpu "$@"
