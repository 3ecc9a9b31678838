#!/usr/bin/env bash
# The user's GPU path, end to end, on one H100/H200 in under 5 minutes.  Usage: bash bench/gpu_e2e.sh OUTDIR
#   e.g. bash bench/gpu_e2e.sh bench/results/$(date +%F)-h100-e2e
# 1. bench_sampling: sample.generate as `sample.py` runs it (bf16, NHWC; --compile; --compile reduce-overhead =
#    CUDA graphs) against the diffusers-built baseline, 512 px, set of 4 (1 ref + 3 new), 50 DDIM steps, guidance.
# 2. bench_training: one training step at 512 px, N = 4, eager and compiled (bench/bench_training.py's own rows).
# Writes OUTDIR/bench_sampling.md, OUTDIR/bench_training.md, a log per step and OUTDIR/SUMMARY.md (card, date,
# command, versions, git commit, each step's exit status and seconds). Installs nothing (bench/gpu_env.sh: the
# wheels of bench/gpu_wheels.txt carried in bench/wheels/ are unpacked where the machine lacks them).
# Exit status: 2 without CUDA or without the carried packages,
# else 0 only if both steps passed. Env: E2E_BUDGET_S (default 290): wall-clock budget of the whole script.
set -uo pipefail

OUT=${1:-}
if [[ -z "$OUT" ]]; then
  echo "usage: bash bench/gpu_e2e.sh OUTDIR" >&2
  exit 2
fi
ARGS="$*"
GPU_SCRIPT=gpu_e2e
source "$(dirname "$0")/gpu_env.sh"  # cd to the repository, PY, CUDA preflight (exit 2), carried wheels
require_carried  # the tokenizer and diffusers must import (exit 2, before any GPU time)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEADLINE=$(( $(date +%s) + ${E2E_BUDGET_S:-290} ))

# name | limit (s) | command. \$STEP_LIMIT is the step's limit after the budget cut; each script starts a row only
# if it should end 15 s before it (start-up), and writes every row as it ends. The compile rows come last.
STEPS=(
  "bench_sampling|180|$PY bench/bench_sampling.py --timed-steps 10 --repeats 3 --variants diffusers,ours,sdpa,ours+compile,ours+compile+cuda_graphs --max-seconds \$((STEP_LIMIT - 15)) --out $OUT/bench_sampling.md"
  "bench_training|105|$PY bench/bench_training.py --steps 6 --backends sdpa --compile --max-seconds \$((STEP_LIMIT - 15)) --out $OUT/bench_training.md"
)

{
  echo "# GPU end to end (bench/gpu_e2e.sh)"
  echo
  echo "- command: \`bash bench/gpu_e2e.sh $ARGS\`"
  summary_header
  echo "- budget: ${E2E_BUDGET_S:-290} s"
  echo
  echo "| step | exit | seconds | limit s |"
  echo "|---|---|---|---|"
} > "$OUT/SUMMARY.md"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

run_steps
echo "== results in $OUT"; cat "$OUT/SUMMARY.md"
exit $failed
