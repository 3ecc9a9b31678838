#!/usr/bin/env bash
# GPU suite: whoever next has a CUDA GPU runs this first.  Usage: bash bench/gpu_suite.sh OUTDIR
#   e.g. bash bench/gpu_suite.sh bench/results/$(date +%F)-h100
# Installs nothing; uses $PYTHON if set, else .venv/bin/python if present, else python3. Budget: < 8 minutes on one H100.
# The one exception: without an importable diffusers, a wheel carried in bench/wheels/ is unpacked into a temp dir
# on PYTHONPATH for the diffusers baseline of bench_sampling (bench/README.md says how to carry it).
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
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3 || echo python); fi
unset TRITON_INTERPRET JEDI_ATTN  # compiled kernels, default dispatch
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---- 0. preflight: fail fast and clearly without a GPU -------------------------------------------------------
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_suite: error: no CUDA device visible to torch ($PY: torch.cuda.is_available() is False)." >&2
  echo "gpu_suite: this suite needs an NVIDIA GPU; nothing was run. On CPU run: python -m pytest -q tests/test_kernels.py" >&2
  exit 2
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUITE_START=$(date +%s)
DEADLINE=$(( SUITE_START + ${SUITE_BUDGET_S:-465} ))

# ---- diffusers for bench_sampling's baseline row: the machine's own, else a wheel carried in bench/wheels/ ----------
# prints the version, or the import error's last line (and fails)
diffusers_version() {
  "$PY" -c 'import diffusers; from diffusers import UNet2DConditionModel; print(diffusers.__version__)' 2>&1 | tail -1
  return "${PIPESTATUS[0]}"
}
if v=$(diffusers_version); then
  DIFFUSERS="$v (installed)"
else
  DIFFUSERS="not importable ($v): bench_sampling skips its baseline row; see bench/README.md"
  whl=$(ls bench/wheels/diffusers-*.whl 2>/dev/null | sort -V | tail -1)
  if [[ -n "$whl" ]]; then
    SITE=$(mktemp -d /tmp/gpu_suite_site.XXXXXX)
    # a pure-Python wheel is a zip of the package and its metadata: unpacking it is installing it, without pip
    if "$PY" -m zipfile -e "$whl" "$SITE" && v=$(PYTHONPATH="$PYTHONPATH:$SITE" diffusers_version); then
      export PYTHONPATH="$PYTHONPATH:$SITE"  # appended: never shadows the machine's packages
      DIFFUSERS="$v (from $whl)"
    else
      DIFFUSERS="$whl does not import ($v): bench_sampling skips its baseline row"
    fi
  fi
fi
echo "gpu_suite: diffusers: $DIFFUSERS"

# ---- steps: name | timeout (s) | command. Append end-to-end benchmarks here, keeping the total < 8 min. ----------
STEPS=(
  # End-to-end first (bench/README.md): they are the numbers the speed work is judged by. \$STEP_LIMIT, expanded
  # when the step runs, is its limit after the suite budget cut; the scripts start a row only if it should end
  # 20 s before it (start-up), and write each row as it ends. Rows in order of what they decide.
  # To confirm after the 2026-11-27 fix of GraphedUNet (bench/results/2026-11-27-h200-run2): graph rows with Δ ~ 1e-2
  # or less, finite compile rows (sdpa+channels_last+compile separates compile from graphs); training's compile row.
  "bench_sampling|190|$PY bench/bench_sampling.py --timed-steps 10 --repeats 3 --variants diffusers,sdpa,triton,sdpa+channels_last,sdpa+cuda_graphs,sdpa+channels_last+cuda_graphs,sdpa+channels_last+compile,sdpa+channels_last+cuda_graphs+compile --max-seconds \$((STEP_LIMIT - 20)) --out $OUT/bench_sampling.md"
  "bench_training|190|$PY bench/bench_training.py --steps 6 --variants sdpa,sdpa+ac,sdpa+data,sdpa+compile --max-seconds \$((STEP_LIMIT - 20)) --out $OUT/bench_training.md"
  "profile_unet|35|$PY bench/profile_unet.py --out $OUT/profile_unet.md"
  "bench_attention_fp16|35|$PY bench/bench_attention.py --dtype fp16 --max-seconds 20 --out $OUT/bench_attention_fp16.md"
  "check_attention|30|$PY bench/check_attention_cuda.py --dtypes bf16 --out $OUT/check_attention.md"
)

{
  echo "# GPU suite"
  echo
  echo "- command: \`bash bench/gpu_suite.sh $*\`"
  echo "- date: $(date -u +%FT%TZ)"
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "- card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $("$PY" -c 'import torch, triton, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}")')"
  echo "- diffusers: $DIFFUSERS"
  echo "- budget: ${SUITE_BUDGET_S:-465} s${SUITE_STEPS:+; steps: $SUITE_STEPS}"
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
} > "$OUT/SUMMARY.md"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  if [[ -n "${SUITE_STEPS:-}" && ",$SUITE_STEPS," != *",$name,"* ]]; then continue; fi
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < 30 )); then
    echo "== $name: SKIPPED, ${left}s of the suite budget left" | tee "$OUT/$name.log"
    echo "| $name | skipped (suite budget) | 0 |" >> "$OUT/SUMMARY.md"
    failed=1
    continue
  fi
  (( limit > left )) && limit=$left
  export STEP_LIMIT=$limit
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
