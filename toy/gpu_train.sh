#!/usr/bin/env bash
# The GPU toy JeDi (issue 23) in one call: config/toy_gpu.py trained in two stages inside a wall-time budget on one
# H100/H200, then the toy benchmark on all 34 held-out subjects.    Usage: bash toy/gpu_train.sh OUTDIR [--cpu-smoke]
# OUTDIR gets: jedi_toy_gpu.safetensors (fp16 EMA export), stage1.log and stage2.log (train.py's output: loss,
# ms/step, MFU, reference gain on held-out sets), toy_benchmark.md/.png (close-up references) and, if the budget
# allows, toy_benchmark_context_refs.md (framed), SUMMARY.md (command, card, versions, steps and seconds per phase).
# Checkpoints (weights + AdamW) go to OUTDIR/run/ and are not results.
# Budget (env): TRAIN_BUDGET_S (360) from the start of stage 1 to the export; TOTAL_BUDGET_S (540) for everything;
# STAGE2_MAX_STEPS caps stage 2 (default none; 3 with --cpu-smoke, where a large one tests the SIGTERM path).
# Stage 1 runs config/toy_gpu.py's max_iters, or stops at 40 % of the budget; stage 2's max_iters are what stage
# 1's measured ms/step leaves in the budget. A stage past its time (stage 2: the budget less an export's time) gets
# SIGTERM (the python process alone, not its loader workers): train.py checkpoints and exits, and the EMA weights
# are then exported from that checkpoint.
# Installs nothing: bench/gpu_env.sh picks the python, checks CUDA and unpacks the carried wheels of what the GPU
# image lacks (bench/gpu_wheels.txt: open_clip_torch, ftfy, wcwidth for model/text.py's tokenizer; bench/README.md).
# --cpu-smoke: the same steps on CPU, a few iterations and 2 subjects, under the simulated GPU image (only its
# packages and the carried wheels import), to check this script before a GPU call. bench/gpu_lease.sh runs it.
# Exit status: 2 without CUDA (unless --cpu-smoke), usage or environment errors (the carried packages do not
# import); else the first failing step's.
set -euo pipefail

OUTDIR=${1:-}
SMOKE=0
if [[ $# -eq 2 && $2 == --cpu-smoke ]]; then SMOKE=1; elif [[ $# -ne 1 || $OUTDIR == -* ]]; then
  echo "usage: bash toy/gpu_train.sh OUTDIR [--cpu-smoke]" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 GPU_CPU_SMOKE=$SMOKE
GPU_SCRIPT=gpu_train
source "$(dirname "$0")/../bench/gpu_env.sh"  # cd to the repository, PY, CUDA preflight (exit 2), carried wheels
require_carried open_clip ftfy wcwidth  # model/text.py's tokenizer (exit 2 before any training)

mkdir -p "$OUTDIR"
OUT=$(cd "$OUTDIR" && pwd)
RUN=$OUT/run
if [[ -e $RUN/ckpt ]]; then
  echo "gpu_train: error: $RUN/ckpt exists (another run's checkpoints); give a new OUTDIR" >&2
  exit 2
fi
CKPT=$OUT/jedi_toy_gpu.safetensors
START=$(date +%s)
TRAIN_BUDGET=${TRAIN_BUDGET_S:-360}
TOTAL_BUDGET=${TOTAL_BUDGET_S:-540}
CONFIGS=(config/toy.py config/toy_gpu.py)
if [[ $SMOKE == 1 ]]; then  # the real model and configs, on CPU, a few steps of small batches
  EXTRA=(--device=cpu --max_iters=3 --images_per_batch=8 --num_workers=2 --eval_sets=4 --eval_interval=2
         --log_interval=1 --warmup_iters=1)
  BENCH=(--device cpu --threads 1 --subjects 2 --steps 2)
  MAX_STAGE2_STEPS=${STAGE2_MAX_STEPS:-3}
else
  EXTRA=()
  BENCH=(--device cuda)
  MAX_STAGE2_STEPS=${STAGE2_MAX_STEPS:-1000000}
fi
now() { date +%s; }
phase() { echo "| $1 | $2 | $3 |" >> "$OUT/phases.tmp"; }  # name, exit status, seconds
: > "$OUT/phases.tmp"

# bounded LIMIT_S LOG CMD...: run CMD with its output also in LOG; SIGTERM to CMD alone at LIMIT_S, SIGKILL 60 s later
bounded() {
  local limit=$1 log=$2 pid rc=0 t0 termed=0
  shift 2
  t0=$(now)
  "$@" > "$log" 2>&1 &  # the log is complete when CMD exits; tail echoes it and ends with CMD
  pid=$!
  tail -f -n +1 --pid="$pid" "$log" &
  while kill -0 "$pid" 2>/dev/null; do
    if (( termed == 0 && $(now) - t0 >= limit )); then
      echo "gpu_train: $(basename "$log" .log) passed its ${limit} s: SIGTERM (checkpoint, then stop)" >&2
      kill -TERM "$pid" 2>/dev/null || true
      termed=1
    elif (( termed == 1 && $(now) - t0 >= limit + 60 )); then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    sleep 1
  done
  wait "$pid" || rc=$?
  wait  # tail
  return $rc
}
latest_step() {  # the newest complete checkpoint's step (train.py writes meta.json last), or 0
  local d
  d=$(ls -d "$RUN"/ckpt/step_* 2>/dev/null | sort | tail -1)
  [[ -n $d && -f $d/meta.json ]] && echo $((10#${d##*step_})) || echo 0
}

# ---- stage 1: drawing (config/toy_gpu.py's max_iters), at most 40 % of the training budget
t=$(now)
rc=0
bounded $((TRAIN_BUDGET * 2 / 5)) "$OUT/stage1.log" "$PY" train.py "${CONFIGS[@]}" "${EXTRA[@]}" --out_dir="$RUN" || rc=$?
phase "stage 1: train.py ${CONFIGS[*]}" $rc $(( $(now) - t ))
STEPS1=$(latest_step)
if (( rc != 0 || STEPS1 == 0 )); then echo "gpu_train: stage 1 failed (exit $rc)" >&2; exit $(( rc ? rc : 1 )); fi
# measured step time: median of the logged ms/step after the first log line (warm-up, cuDNN autotuning)
MS=$(grep -o '[0-9.]* ms/step' "$OUT/stage1.log" | awk '{print $1}' | sed '1{$!d}' | sort -g |
     awk '{v[NR] = $1} END {if (NR) print v[int((NR + 1) / 2)]}' || true)
if [[ -z $MS ]]; then echo "gpu_train: no ms/step line in stage1.log" >&2; exit 1; fi
STAGE1_S=$(( $(now) - t ))
FIXED_S=$(awk -v s="$STAGE1_S" -v n="$STEPS1" -v ms="$MS" 'BEGIN {f = s - n * ms / 1000; print (f > 0 ? int(f + 0.5) : 0)}')

# ---- stage 2: close-ups, sized to end inside the budget (its own start-up and export ~ stage 1's fixed seconds)
LEFT=$(( START + TRAIN_BUDGET - $(now) ))
MORE=$(awk -v left="$LEFT" -v fixed="$FIXED_S" -v ms="$MS" 'BEGIN {n = int(0.95 * (left - fixed) * 1000 / ms);
  print (n > 0 ? n : 0)}')
(( MORE > MAX_STAGE2_STEPS )) && MORE=$MAX_STAGE2_STEPS
echo "gpu_train: stage 1: $STEPS1 steps in ${STAGE1_S} s, ${MS} ms/step, ~${FIXED_S} s start-up/save; ${LEFT} s left:" \
     "stage 2 gets $MORE steps"
STEPS2=$STEPS1
if (( MORE < 1 )); then
  phase "stage 2: skipped, no time left in the budget" - 0
else
  t=$(now)
  rc=0
  LIMIT2=$(( LEFT - FIXED_S > 30 ? LEFT - FIXED_S : 30 ))  # past it, exporting from its checkpoint takes ~FIXED_S
  bounded $LIMIT2 "$OUT/stage2.log" "$PY" train.py "${CONFIGS[@]}" config/toy_gpu_closeup.py \
    "${EXTRA[@]}" --out_dir="$RUN" --export_path="$CKPT" --max_iters=$((STEPS1 + MORE)) || rc=$?
  STEPS2=$(latest_step)
  phase "stage 2: + config/toy_gpu_closeup.py, to step $STEPS2 of $((STEPS1 + MORE))" $rc $(( $(now) - t ))
  if (( rc != 0 )); then echo "gpu_train: stage 2 failed (exit $rc)" >&2; exit $rc; fi
fi
if ! grep -qs "^exported EMA weights" "$OUT/stage2.log"; then  # stage 2 stopped by SIGTERM or skipped
  t=$(now)
  rc=0
  "$PY" train.py "${CONFIGS[@]}" config/toy_gpu_closeup.py "${EXTRA[@]}" --out_dir="$RUN" --export_path="$CKPT" \
    --export_only=True 2>&1 | tee -a "$OUT/stage2.log" || rc=$?
  phase "export of step $STEPS2 (stage 2 stopped early or skipped)" $rc $(( $(now) - t ))
  (( rc == 0 )) || exit $rc
fi
TRAIN_S=$(( $(now) - START ))

# ---- toy benchmark: all 34 held-out subjects, close-up references; framed ones too if the budget allows
t=$(now)
rc=0
"$PY" toy/benchmark.py --ckpt "$CKPT" --out "$OUT/toy_benchmark.md" "${BENCH[@]}" > "$OUT/benchmark.log" 2>&1 || rc=$?
BENCH_S=$(( $(now) - t ))
phase "toy/benchmark.py (close-up references)" $rc $BENCH_S
if (( rc == 0 && $(now) + BENCH_S + 15 < START + TOTAL_BUDGET )); then
  t=$(now)
  "$PY" toy/benchmark.py --ckpt "$CKPT" --ref_framing context --grid '' --out "$OUT/toy_benchmark_context_refs.md" \
    "${BENCH[@]}" >> "$OUT/benchmark.log" 2>&1 || rc=$?
  phase "toy/benchmark.py --ref_framing context" $rc $(( $(now) - t ))
else
  phase "toy/benchmark.py --ref_framing context: skipped, it would pass TOTAL_BUDGET_S ($TOTAL_BUDGET s)" - 0
fi

{
  echo "# GPU toy run (toy/gpu_train.sh)"
  echo
  echo "- command: \`bash toy/gpu_train.sh $*\`"
  summary_header
  echo "- CPUs: $(getconf _NPROCESSORS_ONLN)"
  echo "- training: stage 1 $STEPS1 steps at a median ${MS} ms/step, stage 2 to step $STEPS2; ${TRAIN_S} s of wall time" \
       "from the start of stage 1 to the export (budget ${TRAIN_BUDGET} s); total $(( $(now) - START )) s"
  echo "- checkpoint: \`$(basename "$CKPT")\` ($(stat -c %s "$CKPT") bytes)"
  echo
  echo "| phase | exit | seconds |"
  echo "|---|---|---|"
  cat "$OUT/phases.tmp"
  echo
  echo "Reference gain logged during training (held-out sets of 2):"
  echo
  gains=$(grep -hs "ref gain" "$OUT/stage1.log" "$OUT/stage2.log" | sed 's/ (loss.*//; s/^/    /' || true)
  echo "${gains:-    (none: no evaluation step was reached)}"
} > "$OUT/SUMMARY.md"
rm -f "$OUT/phases.tmp"
cat "$OUT/SUMMARY.md"
exit $rc
