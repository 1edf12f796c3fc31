#!/usr/bin/env bash
# parallel.virtual_stages (interleaved 1F1B): every combination the schedule cannot take is
# refused before any work with a message naming the fields, and a valid one is refused too,
# saying that the trainer cannot execute interleaved 1F1B yet (its schedule is proven in
# tests/unit/test_schedule.c and priced by --plan, test_plan.sh). The tiny job with 8 layers.
# Usage: bash tests/mpi/test_interleaved.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train job=$build/jobs/tiny.pb
require "$train" "$job" "$build/data/tiny.h5"

common=(--set model.num_layers=8 --set data.train="$build/data/tiny.h5"
        --set checkpoint.resume=NEVER)

# refused NAME NP MESSAGE ARGS...: NP processes refuse the job with MESSAGE and start no work
refused() {
  local name=$1 np=$2 message=$3
  shift 3
  rm -rf "$work/out"
  timeout 120 $MPIRUN -np "$np" "$train" "$job" "${common[@]}" --set output_dir="$work/out" \
    "$@" >"$log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qF -- "$message" "$log" && [ ! -e "$work/out" ]; then
    pass "$name: refused with \"$message\""
  else
    result 0 "$name: exit $rc, expected a refusal naming \"$message\""
  fi
}

refused "v out of range" 2 "parallel.virtual_stages must be in [1, 16] (is 0)" \
  --set parallel.pipeline_stages=2 --set parallel.virtual_stages=0
refused "v with one stage" 1 \
  "parallel.virtual_stages = 2 needs parallel.pipeline_stages >= 2 (is 1)" \
  --set parallel.virtual_stages=2
refused "v with GPipe" 2 "parallel.virtual_stages = 2 needs parallel.schedule ONE_F_ONE_B" \
  --set parallel.pipeline_stages=2 --set parallel.virtual_stages=2 --set parallel.schedule=GPIPE
multiple="parallel.micro_batches (3) must be a multiple of parallel.pipeline_stages (2) with"
refused "micro-batches not a multiple of the stages" 2 "$multiple parallel.virtual_stages = 2" \
  --set parallel.pipeline_stages=2 --set parallel.virtual_stages=2 --set parallel.micro_batches=3
refused "more chunks than layers" 4 \
  "parallel.pipeline_stages x parallel.virtual_stages (4 x 4) is more than the model's 8 layers" \
  --set parallel.pipeline_stages=4 --set parallel.virtual_stages=4 --set parallel.micro_batches=4
refused "layers_per_stage with chunks" 2 \
  "parallel.layers_per_stage cannot be combined with parallel.virtual_stages = 2" \
  --set parallel.pipeline_stages=2 --set parallel.virtual_stages=2 --set parallel.micro_batches=4 \
  --set parallel.layers_per_stage=4,4
# valid for the schedule, but not executed yet: refused on 2 and 4 processes, --dry-run too
not_yet="parallel.virtual_stages = 2: interleaved 1F1B is scheduled and simulated (--plan shows"
not_yet+=" its bubble) but the trainer cannot execute it yet"
for np in 2 4; do
  refused "2 stages x 2 chunks on $np processes" "$np" "$not_yet" \
    --set parallel.pipeline_stages=2 --set parallel.virtual_stages=2 --set parallel.micro_batches=4
done
refused "4 stages x 2 chunks, --dry-run" 4 "the trainer cannot execute it yet" \
  --set parallel.pipeline_stages=4 --set parallel.virtual_stages=2 --set parallel.micro_batches=4 \
  --dry-run
# the default is one chunk per stage, as --print-job shows
timeout 60 "$train" "$job" --print-job >"$log" 2>&1 && grep -q "virtual_stages: 1" "$log"
result $((! $?)) "--print-job shows parallel.virtual_stages: 1 by default"
finish
