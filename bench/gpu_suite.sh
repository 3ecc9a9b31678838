#!/usr/bin/env bash
# GPU suite: whoever next has a CUDA GPU runs this first.  Usage: bash bench/gpu_suite.sh OUTDIR
#   e.g. bash bench/gpu_suite.sh bench/results/$(date +%F)-h100
# Installs nothing; uses .venv/bin/python if present, else $PYTHON or python. Budget: < 8 minutes on one H100.
# Every step writes OUTDIR/<step>.log (+ its own outputs); OUTDIR/SUMMARY.md gets card, date, command,
# versions and each step's exit status and wall time. Exit status: 0 only if every step passed.
set -uo pipefail

OUT=${1:-}
if [[ -z "$OUT" ]]; then
  echo "usage: bash bench/gpu_suite.sh OUTDIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python; fi
unset TRITON_INTERPRET JEDI_ATTN JEDI_ATTN_SPLIT_D  # compiled kernels, default dispatch
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---- 0. preflight: fail fast and clearly without a GPU -------------------------------------------------------
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_suite: error: no CUDA device visible to torch ($PY: torch.cuda.is_available() is False)." >&2
  echo "gpu_suite: this suite needs an NVIDIA GPU; nothing was run. On CPU run: python -m pytest -q tests/test_kernels.py" >&2
  exit 2
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# ---- steps: name | timeout (s) | command. Append end-to-end benchmarks here, keeping the total < 8 min. ----------
STEPS=(
  "check_attention|200|$PY bench/check_attention_cuda.py --out $OUT/check_attention.md"
  "bench_attention_fp16|240|$PY bench/bench_attention.py --dtype fp16 --max-seconds 200 --out $OUT/bench_attention_fp16.md"
  # "bench_attention_bf16|240|$PY bench/bench_attention.py --dtype bf16 --max-seconds 200 --out $OUT/bench_attention_bf16.md"
)

{
  echo "# GPU suite"
  echo
  echo "- command: \`bash bench/gpu_suite.sh $*\`"
  echo "- date: $(date -u +%FT%TZ)"
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "- card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $("$PY" -c 'import torch, triton, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}")')"
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
} > "$OUT/SUMMARY.md"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  echo "== $name (limit ${limit}s): $cmd"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" bash -c "$cmd" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  dt=$(( $(date +%s) - t0 ))
  [[ $rc -eq 124 ]] && echo "== $name: TIMED OUT after ${limit}s" | tee -a "$OUT/$name.log"
  echo "| $name | $rc | $dt |" >> "$OUT/SUMMARY.md"
  [[ $rc -ne 0 ]] && failed=1
done
echo "== results in $OUT"; cat "$OUT/SUMMARY.md"
exit $failed
