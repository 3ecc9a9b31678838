# Sourced by bench/gpu_suite.sh, gpu_e2e.sh and gpu_kernel_sweep.sh (bash): the python to use, the CUDA preflight, diffusers.
# Installs nothing. Sets ROOT, PY, PYTHONPATH and PACKAGES (a line for SUMMARY.md); exits 2 without CUDA.
#   PY: $PYTHON if set, else .venv/bin/python if present, else python3.
GPU_SCRIPT=${GPU_SCRIPT:-$(basename "$0")}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3 || echo python); fi
unset TRITON_INTERPRET JEDI_ATTN  # compiled kernels, default dispatch
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "$GPU_SCRIPT: error: no CUDA device visible to torch ($PY: torch.cuda.is_available() is False)." >&2
  echo "$GPU_SCRIPT: this needs an NVIDIA GPU; nothing was run. On CPU run: python -m pytest -q tests/test_bench_e2e.py" >&2
  exit 2
fi

# Python packages the GPU image lacks: diffusers (bench_sampling's baseline row), open_clip_torch and ftfy (the
# tokenizer of sample.py, hence of bench_sampling's "ours" rows; ftfy needs wcwidth). Carried as wheels in
# bench/wheels/ (bench/README.md says how), unpacked into one temp dir appended to PYTHONPATH: installed packages win.
CARRIED=(diffusers open_clip ftfy)
missing=()
for m in "${CARRIED[@]}"; do "$PY" -c "import $m" 2>/dev/null || missing+=("$m"); done
if (( ${#missing[@]} )) && compgen -G "bench/wheels/*.whl" > /dev/null; then
  SITE=$(mktemp -d /tmp/gpu_site.XXXXXX)
  for whl in bench/wheels/*.whl; do "$PY" -m zipfile -e "$whl" "$SITE"; done  # a pure-Python wheel is a zip
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
PACKAGES=$(for m in "${CARRIED[@]}"; do
  v=$("$PY" -c "import $m; print(getattr($m, '__version__', '?'))" 2>&1 | tail -1) || v="NOT importable ($v)"
  where=installed; [[ " ${missing[*]} " == *" $m "* ]] && where=carried
  [[ $v == NOT* ]] && echo -n "$m $v; " || echo -n "$m $v ($where); "
done)
echo "$GPU_SCRIPT: packages: $PACKAGES"

# SUMMARY.md's header lines: date, git commit, card, versions (the command line is the caller's)
summary_header() {
  echo "- date: $(date -u +%FT%TZ)"
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "- card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $("$PY" -c 'import torch, triton, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}")')"
  echo "- packages: $PACKAGES"
}

# run_step NAME LIMIT_S COMMAND: runs COMMAND (STEP_LIMIT exported) under `timeout -s INT`, logs to $OUT/NAME.log,
# appends "| NAME | exit | seconds |" to $OUT/SUMMARY.md; cuts LIMIT to what is left before $DEADLINE and skips
# the step with under 30 s left. Sets failed=1 on a non-zero exit.
run_step() {
  local name=$1 limit=$2 cmd=$3 left rc t0 dt
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < 30 )); then
    echo "== $name: SKIPPED, ${left}s of the budget left" | tee "$OUT/$name.log"
    echo "| $name | skipped (budget) | 0 |" >> "$OUT/SUMMARY.md"
    failed=1
    return
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
  return 0
}

# run_steps [ONLY]: every "name|limit|command" of the caller's STEPS array through run_step, in order; ONLY, a
# comma-separated list of names, runs just those. Sets failed (0 or 1).
run_steps() {
  local only=${1:-} step name limit cmd
  failed=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    if [[ -n "$only" && ",$only," != *",$name,"* ]]; then continue; fi
    run_step "$name" "$limit" "$cmd"
  done
}
