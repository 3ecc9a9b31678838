#!/usr/bin/env bash
# Attention kernel sweep on one GPU, < 5 minutes on an H100/H200.  Usage: bash bench/gpu_kernel_sweep.sh OUTDIR
#   e.g. bash bench/gpu_kernel_sweep.sh bench/results/$(date +%F)-h200-kernel
# Every Triton variant x JeDi's attention shapes (bench/kernel_sweep.py's docstring), fp16 and bf16, forward
# and backward, against SDPA default / cuDNN / flash / efficient; correctness first (a wrong variant is never
# timed). Writes OUTDIR/kernel_sweep.md (TFLOP/s), OUTDIR/dispatch/<card>.json (copy it to kernels/dispatch/
# and commit), OUTDIR/SUMMARY.md (card, date, command, versions, git commit) and OUTDIR/kernel_sweep.log.
# Installs nothing; uses $PYTHON if set, else .venv/bin/python if present, else python3. Exit 2 without CUDA.
# Env: SWEEP_BUDGET_S (default 285): wall-clock cap; the script starts a shape only if it should end in time.
#      SWEEP_ARGS: extra arguments for bench/kernel_sweep.py (e.g. "--dtypes bf16 --workers 8").
set -uo pipefail

OUT=${1:-}
if [[ -z "$OUT" ]]; then
  echo "usage: bash bench/gpu_kernel_sweep.sh OUTDIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3 || echo python); fi
unset TRITON_INTERPRET JEDI_ATTN  # compiled kernels, default dispatch
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_kernel_sweep: error: no CUDA device visible to torch ($PY: torch.cuda.is_available() is False)." >&2
  echo "gpu_kernel_sweep: nothing was run. On CPU: python bench/kernel_sweep.py --cpu-smoke --out /tmp/smoke" >&2
  exit 2
fi
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
