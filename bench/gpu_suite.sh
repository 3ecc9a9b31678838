#!/usr/bin/env bash
# GPU suite: whoever next has a CUDA GPU runs this first.  Usage: bash bench/gpu_suite.sh OUTDIR
#   e.g. bash bench/gpu_suite.sh bench/results/$(date +%F)-h100
# Installs nothing (bench/gpu_env.sh: python, CUDA preflight, the wheels of bench/gpu_wheels.txt carried in
# bench/wheels/ unpacked where the machine lacks them; bench/README.md says how to carry them).
# Budget: < 8 minutes on one H100.
# Every step writes OUTDIR/<step>.log (+ its own outputs); OUTDIR/SUMMARY.md gets card, date, command,
# versions and each step's exit status and wall time. Exit status: 0 only if every step passed.
# Env: SUITE_BUDGET_S (default 465): the whole suite's wall-clock budget; each step's limit is cut to what is left
# and a step with under 30 s left is skipped. SUITE_STEPS=name,name runs only those steps (e.g. a rerun).
set -uo pipefail

OUT=${1:-}
if [[ -z "$OUT" ]]; then
  echo "usage: bash bench/gpu_suite.sh OUTDIR" >&2
  exit 2
fi
GPU_SCRIPT=gpu_suite
source "$(dirname "$0")/gpu_env.sh"  # cd to the repository, PY, CUDA preflight (exit 2), carried wheels
require_carried  # the tokenizer and diffusers must import (exit 2, before any GPU time)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUITE_START=$(date +%s)
DEADLINE=$(( SUITE_START + ${SUITE_BUDGET_S:-465} ))

# ---- steps: name | timeout (s) | command. Append end-to-end benchmarks here, keeping the total < 8 min. ----------
STEPS=(
  # End-to-end first (bench/README.md): they are the numbers the speed work is judged by. \$STEP_LIMIT, expanded
  # when the step runs, is its limit after the suite budget cut; the scripts start a row only if it should end
  # 20 s before it (start-up), and write each row as it ends. Rows in order of what they decide.
  # To confirm after the 2026-11-27 fix of GraphedUNet (bench/results/2026-11-27-h200-run2): graph rows with Δ ~ 1e-2
  # or less, finite compile rows (sdpa+channels_last+compile separates compile from graphs); training's compile row.
  "bench_sampling|190|$PY bench/bench_sampling.py --timed-steps 10 --repeats 3 --variants diffusers,ours,sdpa,triton,sdpa+channels_last,sdpa+cuda_graphs,sdpa+channels_last+cuda_graphs,sdpa+channels_last+compile,sdpa+channels_last+cuda_graphs+compile --max-seconds \$((STEP_LIMIT - 20)) --out $OUT/bench_sampling.md"
  "bench_training|190|$PY bench/bench_training.py --steps 6 --variants sdpa,sdpa+ac,sdpa+data,sdpa+compile --max-seconds \$((STEP_LIMIT - 20)) --out $OUT/bench_training.md"
  "profile_unet|35|$PY bench/profile_unet.py --out $OUT/profile_unet.md"
  "bench_attention_fp16|35|$PY bench/bench_attention.py --dtype fp16 --max-seconds 20 --out $OUT/bench_attention_fp16.md"
  "check_attention|30|$PY bench/check_attention_cuda.py --dtypes bf16 --out $OUT/check_attention.md"
)

{
  echo "# GPU suite"
  echo
  echo "- command: \`bash bench/gpu_suite.sh $*\`"
  summary_header
  echo "- budget: ${SUITE_BUDGET_S:-465} s${SUITE_STEPS:+; steps: $SUITE_STEPS}"
  echo
  echo "| step | exit | seconds | limit s |"
  echo "|---|---|---|---|"
} > "$OUT/SUMMARY.md"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

run_steps "${SUITE_STEPS:-}"
echo "== results in $OUT"; cat "$OUT/SUMMARY.md"
exit $failed
