#!/usr/bin/env bash
# Attention kernel sweep on one GPU, < 5 minutes on an H100/H200.  Usage: bash bench/gpu_kernel_sweep.sh OUTDIR
#   e.g. bash bench/gpu_kernel_sweep.sh bench/results/$(date +%F)-h200-kernel
# Every Triton variant x JeDi's attention shapes (bench/kernel_sweep.py's docstring), fp16 and bf16, forward
# and backward, against SDPA default / cuDNN / flash / efficient; correctness first (a wrong variant is never
# timed). Writes OUTDIR/kernel_sweep.md (TFLOP/s), OUTDIR/dispatch/<card>.json (copy it to kernels/dispatch/
# and commit), OUTDIR/SUMMARY.md (card, date, command, versions, git commit) and OUTDIR/kernel_sweep.log.
# Installs nothing (bench/gpu_env.sh: $PYTHON, else .venv/bin/python, else python3). Exit 2 without CUDA.
# Env: SWEEP_BUDGET_S (default 285): wall-clock cap; the script starts a shape only if it should end in time.
#      SWEEP_ARGS: extra arguments for bench/kernel_sweep.py (e.g. "--dtypes bf16 --workers 8").
set -uo pipefail

OUT=${1:-}
if [[ -z "$OUT" ]]; then
  echo "usage: bash bench/gpu_kernel_sweep.sh OUTDIR" >&2
  exit 2
fi
GPU_SCRIPT=gpu_kernel_sweep
source "$(dirname "$0")/gpu_env.sh"  # cd to the repository, PY, CUDA preflight (exit 2)
mkdir -p "$OUT"
BUDGET=${SWEEP_BUDGET_S:-285}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# The script budgets itself to BUDGET - 15 s; the timeout is the backstop (its rows so far are on disk).
# shellcheck disable=SC2086
timeout --signal=INT --kill-after=10 "$BUDGET" "$PY" bench/kernel_sweep.py --out "$OUT" \
  --max-seconds $(( BUDGET - 15 )) ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/kernel_sweep.log"
rc=${PIPESTATUS[0]}
[[ $rc -eq 124 ]] && echo "gpu_kernel_sweep: TIMED OUT after ${BUDGET}s (rows so far are in $OUT)" \
  | tee -a "$OUT/kernel_sweep.log"
echo "- exit status: $rc; script: bash bench/gpu_kernel_sweep.sh $*" >> "$OUT/SUMMARY.md"
exit "$rc"
