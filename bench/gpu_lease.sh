#!/usr/bin/env bash
# One GPU lease, one command (issue 28): the GPU toy, the kernel dispatch table and the end-to-end numbers in at most
# 540 s of wall time on one H100 or H200.       Usage: bash bench/gpu_lease.sh OUT [--cpu-smoke]
# Steps, in this order; each must end by its time since the start (so one that finishes early leaves its seconds to
# the next), a failure or timeout is recorded and the next step still runs:
#   toy       by 365 s  toy/gpu_train.sh: config/toy_gpu.py in two stages (training <= 280 s), then toy/benchmark.py
#                       on all 34 held-out subjects (<= 60 s; framed references too if time is left)
#   kernel    by 470 s  bench/kernel_sweep.py cut to what decides the dispatch table of JeDi (SD-1.x, 512 px) and
#                       JeDi-XL (SDXL at config/jedi_sdxl.py's 512 px: head dim 64, 10 and 20 heads): bf16 (sample.py
#                       and train.py on CUDA), self-attention sets of N = 2 and 4 (whose length buckets hold N = 3)
#                       and cross-attention at every UNet level; triton, -tma, -ws, -atomic against SDPA and cuDNN
#   training  by 490 s  bench/bench_training.py: train.py's step at 512 px, 4 sets of 4, backend auto, one row
#   sampling  by 528 s  bench/bench_sampling.py: sample.generate rows diffusers, ours, ours+compile (the compile row
#                       starts only if its ~60 s fit: it gets the seconds the steps before left)
# The end-to-end steps run "auto" attention on the table the kernel step just measured (--dispatch-dir): what the
# card gets once that table is committed to kernels/dispatch/.
# Output: a results folder <date>-<card>-lease/ (each step's tables and log, nvidia-smi.txt, SUMMARY.md; not the toy's
# training checkpoints) is packed after every step into OUT/results.tgz.part0.. (15 MiB parts, at most 7), next to
# OUT/SUMMARY.md: at most 8 files, all a device call returns, and a call cut short keeps every step that ended.
#   Here: cat OUT/results.tgz.part* | tar -xz -C bench/results/      -> bench/results/<date>-<card>-lease/
# --cpu-smoke: the same steps and code paths on CPU at tiny sizes (tests/test_gpu_lease.py): under the simulated GPU
#   image (bench/gpu_image_sim: only the image's packages and the carried wheels import) and with every
#   warp-specialized kernel launch failing, so the fallback is reported as on the GPU. Budget 3 x 540 s.
# Installs nothing: bench/gpu_env.sh (python, CUDA preflight, the carried wheels of bench/gpu_wheels.txt, which
# `bash bench/fetch_wheels.sh` fetches and the device call carries). Exit status: 2 for usage, without CUDA or without
# the carried packages (nothing is run or written); else 0 only if every step passed.
# Env: LEASE_BUDGET_S (540; --cpu-smoke 1620): every time above scales with it.
set -uo pipefail

DEST=${1:-}
SMOKE=0
if [[ $# -eq 2 && $2 == --cpu-smoke ]]; then SMOKE=1; elif [[ $# -ne 1 || $DEST == -* ]]; then
  echo "usage: bash bench/gpu_lease.sh OUT [--cpu-smoke]" >&2
  exit 2
fi
[[ $DEST == /* ]] || DEST=$PWD/$DEST
ARGS="$*"
START=$(date +%s)
BUDGET=${LEASE_BUDGET_S:-$(( SMOKE ? 1620 : 540 ))}
export GPU_CPU_SMOKE=$SMOKE PYTHONUNBUFFERED=1
GPU_SCRIPT=gpu_lease
source "$(dirname "$0")/gpu_env.sh"  # cd to the repository, PY, CUDA preflight (exit 2), carried wheels
require_carried  # the tokenizer (toy, e2e) and diffusers (the baseline) must import: exit 2 before any GPU time

at() { echo $(( $1 * BUDGET / 540 )); }  # seconds of the 540 s plan -> this run's budget
# The models whose attention shapes the kernel step measures: SD-1.x and SDXL at JeDi-XL's training resolution
# (config/jedi_sdxl.py's `resolution`; tests/test_gpu_lease.py checks the two agree). SDXL's six D 64 shapes add
# ~16 s to the sweep's ~45 s, ~60 s of the 95 s it gets (estimate: docs/kernel.md §5), so nothing else is cut.
MODELS=sd1,sdxl@512
if (( SMOKE )); then
  TAG=cpu-smoke
  SMOKE_ARG=--cpu-smoke
  TINY=--tiny
  SWEEP=(--cpu-smoke --dtypes bf16 --models $MODELS)
else
  TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/^NVIDIA //' |
        awk '{print tolower($1)}')
  SMOKE_ARG=""
  TINY=""
  SWEEP=(--dtypes bf16 --models $MODELS --set-sizes 2,4
         --variants triton,triton-tma,triton-ws,triton-atomic,sdpa,sdpa-cudnn --workers 12)
fi
NAME=$(date -u +%F)-${TAG:-gpu}-lease
WORKROOT=$(mktemp -d /tmp/gpu_lease.XXXXXX)
OUT=$WORKROOT/$NAME  # run_step writes each step's log and its SUMMARY.md row here
mkdir -p "$OUT" "$DEST"
DEADLINE=$(( START + BUDGET - $(at 12) ))  # a step killed at its limit takes up to 10 s more; then the last pack
MIN_STEP_S=$(at 10)

# pack: the results folder -> DEST/results.tgz.part0.. (15 MiB each) + DEST/SUMMARY.md; at most 8 files come back
pack() {
  local parts=$WORKROOT/parts
  rm -rf "$parts" && mkdir "$parts"
  tar -C "$WORKROOT" --exclude="$NAME/toy/run" -czf - "$NAME" | split -b 15M -d -a 1 - "$parts/results.tgz.part"
  if (( $(ls "$parts" | wc -l) > 7 )); then  # not expected (the largest file is the 16 MB toy export)
    rm -f "$parts"/*
    echo "- results too large for 7 parts of 15 MiB: packed without *.safetensors and *.png" >> "$OUT/SUMMARY.md"
    tar -C "$WORKROOT" --exclude="$NAME/toy/run" --exclude='*.safetensors' --exclude='*.png' -czf - "$NAME" |
      split -b 15M -d -a 1 - "$parts/results.tgz.part"
  fi
  rm -f "$DEST"/results.tgz.part*
  cp "$parts"/* "$DEST"/ && cp "$OUT/SUMMARY.md" "$DEST/SUMMARY.md"
}

{
  echo "# GPU lease (bench/gpu_lease.sh)"
  echo
  echo "- command: \`bash bench/gpu_lease.sh $ARGS\`"
  summary_header
  echo "- budget: $BUDGET s; steps end by: toy $(at 365) s, kernel $(at 470) s, training $(at 490) s," \
       "sampling $(at 528) s from the start"
  echo "- results: \`$NAME/\` (in results.tgz.part*: \`cat results.tgz.part* | tar -xz -C bench/results/\`)"
  echo
  echo "| step | exit | seconds | limit s |"
  echo "|---|---|---|---|"
} > "$OUT/SUMMARY.md"
(( SMOKE )) || nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
pack

# name | ends by (s of the 540 s plan) | command. \$STEP_LIMIT is the step's limit, expanded when it runs.
TABLES=$OUT/kernel/dispatch  # written by the kernel step; read by the end-to-end steps
STEPS=(
  "toy|365|TRAIN_BUDGET_S=$(at 280) TOTAL_BUDGET_S=$(at 345) bash toy/gpu_train.sh $OUT/toy $SMOKE_ARG"
  "kernel|470|$PY bench/kernel_sweep.py ${SWEEP[*]} --max-seconds \$((STEP_LIMIT - $(at 10))) --out $OUT/kernel"
  "training|490|$PY bench/bench_training.py $TINY --variants auto --warmup 1 --steps 3 --dispatch-dir $TABLES \
--max-seconds \$((STEP_LIMIT - $(at 5))) --out $OUT/bench_training.md"
  "sampling|528|$PY bench/bench_sampling.py $TINY --variants diffusers,ours,ours+compile --timed-steps 10 --repeats 3 \
--dispatch-dir $TABLES --max-seconds \$((STEP_LIMIT - $(at 15))) --out $OUT/bench_sampling.md"
)
failed_any=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name ends cmd <<< "$step"
  [[ $name == training || $name == sampling ]] && mkdir -p "$TABLES"  # empty if the sweep wrote none: SDPA
  failed=0
  run_step "$name" $(( START + $(at "$ends") - $(date +%s) )) "$cmd"
  (( failed )) && failed_any=1
  pack
done
echo "- total: $(( $(date +%s) - START )) s" >> "$OUT/SUMMARY.md"
pack

echo "== $DEST: SUMMARY.md and results.tgz.part* ($(du -sh "$WORKROOT/parts" | cut -f1))"
for f in SUMMARY.md toy/SUMMARY.md toy/toy_benchmark.md kernel/SUMMARY.md bench_training.md bench_sampling.md; do
  [[ -f $OUT/$f ]] && { echo; echo "==== $f"; cat "$OUT/$f"; }
done
exit $failed_any
