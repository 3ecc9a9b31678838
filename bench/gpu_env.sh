# Sourced by bench/gpu_lease.sh, gpu_suite.sh, gpu_e2e.sh, gpu_kernel_sweep.sh and toy/gpu_train.sh (bash): the python
# to use, the CUDA preflight, the packages the GPU image lacks, the SUMMARY.md header and the step runner.
# Installs nothing. Sets ROOT, PY, PYTHONPATH and PACKAGES (a line for SUMMARY.md); exits 2 without CUDA.
#   PY: $PYTHON if set, else .venv/bin/python if present, else python3.
#   GPU_CPU_SMOKE=1 (the scripts' --cpu-smoke): no CUDA preflight, and every python started from here on sees only
#     the GPU image's packages (bench/gpu_image_sim), so the carried wheels are unpacked and used as on the GPU.
#   GPU_WHEELS_DIR: the carried wheels (default bench/wheels; bench/fetch_wheels.sh fills it).
# A script sourced from one that already sourced this (gpu_lease.sh runs toy/gpu_train.sh) reuses its checks.
GPU_SCRIPT=${GPU_SCRIPT:-$(basename "$0")}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3 || echo python); fi
unset TRITON_INTERPRET JEDI_ATTN  # compiled kernels, default dispatch
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mapfile -t CARRIED_DISTS < <(awk '!/^#/ && NF {print $1}' "$ROOT/bench/gpu_wheels.txt")
mapfile -t CARRIED < <(awk '!/^#/ && NF {print $2}' "$ROOT/bench/gpu_wheels.txt")  # their modules

if [[ -z ${GPU_ENV_READY:-} ]]; then
  if [[ ${GPU_CPU_SMOKE:-0} == 1 ]]; then
    export PYTHONPATH="$ROOT/bench/gpu_image_sim:$PYTHONPATH" JEDI_GPU_IMAGE=$ROOT/bench/gpu_image_packages.txt
  elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "$GPU_SCRIPT: error: no CUDA device visible to torch ($PY: torch.cuda.is_available() is False)." >&2
    echo "$GPU_SCRIPT: this needs an NVIDIA GPU; nothing was run. On CPU: --cpu-smoke where the script has it, or" \
         "python -m pytest -q tests/test_bench_e2e.py" >&2
    exit 2
  fi

  # Each carried package whose module does not import is unpacked from its wheel (a wheel is a zip) into one temp
  # dir appended to PYTHONPATH; the rest stay as installed.
  mapfile -t missing < <("$PY" - "${CARRIED[@]}" <<'PYEOF'
import importlib.util, sys
for m in sys.argv[1:]:
    try:
        found = importlib.util.find_spec(m) is not None
    except ImportError:  # the simulated image refuses it
        found = False
    if not found:
        print(m)
PYEOF
  )
  WHEELS=${GPU_WHEELS_DIR:-$ROOT/bench/wheels}
  SITE=""
  for i in "${!CARRIED[@]}"; do
    [[ " ${missing[*]} " == *" ${CARRIED[$i]} "* ]] || continue
    stem=${CARRIED_DISTS[$i]//[-.]/_}  # a wheel's file name spells the distribution with underscores
    whls=()
    for f in "$WHEELS"/*.whl; do [[ -f $f && ${f##*/} =~ ^${stem}-[0-9] ]] && whls+=("$f"); done
    if (( ${#whls[@]} > 1 )); then
      echo "$GPU_SCRIPT: error: ${#whls[@]} wheels of ${CARRIED_DISTS[$i]} in $WHEELS;" \
           "rerun bash bench/fetch_wheels.sh" >&2
      exit 2
    fi
    if (( ${#whls[@]} == 1 )); then
      [[ -n $SITE ]] || SITE=$(mktemp -d /tmp/gpu_site.XXXXXX)
      "$PY" -m zipfile -e "${whls[0]}" "$SITE"
    fi
  done
  [[ -z $SITE ]] || export PYTHONPATH="$PYTHONPATH:$SITE"
  export GPU_ENV_READY=1
fi
PACKAGES=$("$PY" - "${CARRIED_DISTS[@]}" "${CARRIED[@]}" <<'PYEOF'
import importlib.metadata, importlib.util, sys
names = sys.argv[1:]
out = []
for dist, module in zip(names[:len(names) // 2], names[len(names) // 2:]):
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        spec = None
    if spec is None:
        out.append(f"{dist} NOT importable")
        continue
    where = "carried" if "/gpu_site." in (spec.origin or "") else "installed"
    out.append(f"{dist} {importlib.metadata.version(dist)} ({where})")
print("; ".join(out))
PYEOF
)
echo "$GPU_SCRIPT: packages: $PACKAGES"

# require_carried [MODULE...]: exit 2 unless these modules of bench/gpu_wheels.txt (default: all) import, for the
# scripts whose steps need them (the tokenizer is in every model step, diffusers in the baseline row). Run it before
# any GPU time is spent.
require_carried() {
  local err modules=("$@")
  (( ${#modules[@]} )) || modules=("${CARRIED[@]}")
  if ! err=$("$PY" -c "import $(IFS=,; echo "${modules[*]}")" 2>&1); then
    echo "$GPU_SCRIPT: error: the packages the GPU image lacks do not all import: $(tail -1 <<< "$err")" >&2
    echo "$GPU_SCRIPT: fetch their wheels here with \`bash bench/fetch_wheels.sh\` and carry bench/wheels" \
         "(bench/README.md); nothing was run." >&2
    exit 2
  fi
}

# SUMMARY.md's header lines: date, git commit, card, versions (the command line is the caller's)
summary_header() {
  echo "- date: $(date -u +%FT%TZ)"
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  if [[ ${GPU_CPU_SMOKE:-0} == 1 ]]; then
    echo "- card: none: --cpu-smoke on $(uname -m), $(getconf _NPROCESSORS_ONLN) CPUs" \
         "(simulated GPU image; the numbers mean nothing)"
  else
    echo "- card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  fi
  echo "- $("$PY" -c 'import torch, triton, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}")')"
  echo "- packages: $PACKAGES"
}

# run_step NAME LIMIT_S COMMAND: runs COMMAND (STEP_LIMIT exported) under `timeout -s INT`, logs to $OUT/NAME.log,
# appends "| NAME | exit | seconds | limit s |" to $OUT/SUMMARY.md; cuts LIMIT to what is left before $DEADLINE and
# skips the step when that leaves under MIN_STEP_S (default 30). Sets failed=1 on a non-zero exit or a skip.
run_step() {
  local name=$1 limit=$2 cmd=$3 left rc t0 dt status
  left=$(( DEADLINE - $(date +%s) ))
  (( limit < left )) && left=$limit
  if (( left < ${MIN_STEP_S:-30} )); then
    echo "== $name: SKIPPED, ${left}s of the budget left" | tee "$OUT/$name.log"
    echo "| $name | skipped (budget: ${left} s left) | 0 | 0 |" >> "$OUT/SUMMARY.md"
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
  status=$rc
  if [[ $rc -eq 124 ]]; then
    echo "== $name: TIMED OUT after ${limit}s" | tee -a "$OUT/$name.log"
    status="124 (timed out)"
  fi
  echo "| $name | $status | $dt | $limit |" >> "$OUT/SUMMARY.md"
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
