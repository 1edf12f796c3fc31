#!/usr/bin/env bash
# parallel.virtual_stages (interleaved 1F1B): the tiny job with 8 layers and 4 micro-batches of
# 2 sequences, 20 steps, trained with 2 chunks per stage on 2 and 4 stages gives every step's loss
# and gradient norm bit for bit equal to the single process's (each sum runs in the same order:
# a chunk's gradients accumulate over micro-batches in order, the norm is summed per global layer
# in a fixed order, every group from the one chunk that holds it); 2 stages x 2 replicas within
# 1e-7 (MPI sums the replicas in another order) and bit for bit equal to the same layout with one
# chunk per stage; ZeRO-1 too. Evaluation during training runs through the chunks: validation
# losses and greedy completions equal the single process's. A checkpoint of 2 chunks per stage resumes with 1 and the reverse
# (tensors load by name) within 1e-5, with 2 bit for bit. Every combination the schedule cannot
# take is refused before any work with a message naming the fields.
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

# --- training with chunks -----------------------------------------------------------------------
# train NAME NP [--set ...]: 20 steps of 4 micro-batches of 2 (a later --set wins), every step logged, checkpoints at
# 10 and 20
train() {
  local name=$1 np=$2
  shift 2
  timeout 300 $MPIRUN -np "$np" "$train" "$job" "${common[@]}" --set train.steps=20 \
    --set train.log_every=1 --set data.micro_batch_size=2 --set parallel.micro_batches=4 \
    --set checkpoint.every=10 --set checkpoint.keep_last=0 --set output_dir="$work/$name" "$@" \
    >"$work/$name.log" 2>&1
  local rc=$?
  [ $rc = 0 ] && pass "$name: $np processes ran" || { fail "$name: exit $rc"; tail -n 20 "$work/$name.log"; }
}

# steps NAME FROM: "step loss grad_norm" of the steps after FROM
steps() {
  grep -o '"step":[0-9]*,"loss":[^,]*,"lr":[^,]*,"grad_norm":[^,]*' "$work/$1/metrics.jsonl" |
    awk -F'[:,]' -v from="$2" '$2 > from { print $2, $4, $8 }'
}

# same NAME A B FROM TOL: A's and B's steps after FROM (20 - FROM of them) agree in loss and
# gradient norm: bit for bit (TOL 0, metrics.jsonl prints them in full) or within TOL relative
same() {
  local verdict
  verdict=$(paste <(steps "$2" "$4") <(steps "$3" "$4") | awk -v tol="$5" -v n=$((20 - $4)) '
    function rel(a, b) { d = a - b; if (d < 0) d = -d; return d / (a < 0 ? -a : a) }
    { rows++; if ($1 != $4) bad = 1
      r = rel($2, $5); if (r > worst) worst = r; r = rel($3, $6); if (r > worst) worst = r
      if ($2 != $5 || $3 != $6) differ++ }
    END { if (rows != n || bad) print "steps " rows
          else if (tol == 0 && differ) print "worst " worst " (" differ " steps differ)"
          else if (worst > tol) print "worst " worst
          else print "ok " worst + 0 }')
  case $verdict in
    ok*) pass "$1: loss and gradient norm of steps $(($4 + 1))-20 $([ "$5" = 0 ] &&
           echo "bit for bit equal" || echo "within $5 (worst ${verdict#ok })")" ;;
    *) fail "$1: $verdict"; paste <(steps "$2" "$4") <(steps "$3" "$4") | head -n 5 ;;
  esac
}

stages() { echo --set parallel.pipeline_stages="$1" --set parallel.virtual_stages="$2"; }
# with evaluation at steps 10 and 20: validation, and greedy generation checked against a replay
evaluation=(--set eval.every=10 --set data.valid="$build/data/tiny.h5" --set eval.valid_batches=2
            --set eval.prompts.ids=72,101,108,108 --set eval.max_new_tokens=6
            --set eval.temperature=0 --set eval.check_kv=true)
train single 1 "${evaluation[@]}"
train pp2_v2 2 $(stages 2 2) "${evaluation[@]}"
train pp4_v2 4 $(stages 4 2) "${evaluation[@]}"
# 2 replicas of 2 micro-batches: the same global batch
train pp2_dp2 4 $(stages 2 1) --set parallel.micro_batches=2
train pp2_dp2_v2 4 $(stages 2 2) --set parallel.micro_batches=2
train pp2_dp2_v2_zero 4 $(stages 2 2) --set parallel.micro_batches=2 --set parallel.zero=1
same "2 stages x 2 chunks against one process" single pp2_v2 0 0
same "4 stages x 2 chunks against one process" single pp4_v2 0 0
same "2 stages x 2 chunks x 2 replicas against one process" single pp2_dp2_v2 0 1e-7
same "2 stages x 2 chunks x 2 replicas against 1 chunk per stage" pp2_dp2 pp2_dp2_v2 0 0
same "ZeRO-1 with 2 chunks per stage against one process" single pp2_dp2_v2_zero 0 1e-7

# the evaluations through the chunks: validation losses and completions as the single process's
evaluated() {
  grep -o '"step":[0-9]*,"val_loss":[^,]*' "$work/$1/metrics.jsonl"
  grep -o '"step":[0-9]*,"prompt_ids":[^]]*\],"completion_ids":[^]]*\]' "$work/$1/eval.jsonl"
}
for name in pp2_v2 pp4_v2; do
  if [ "$(evaluated single | wc -l)" = 4 ] && diff <(evaluated single) <(evaluated $name) >/dev/null; then
    pass "$name: evaluation at steps 10 and 20 through the chunks equals the single process's (validation loss, completions)"
  else
    fail "$name: evaluation through the chunks differs"; paste <(evaluated single) <(evaluated $name) | head -n 4
  fi
done

# a copy of NAME's step 10 to resume from, `latest` pointing at it
resumable() {
  mkdir -p "$work/$1/checkpoints"
  cp -r "$work/$2/checkpoints/step_00000010" "$work/$1/checkpoints/"
  ln -s step_00000010 "$work/$1/checkpoints/latest"
}
resume=(--set checkpoint.resume=AUTO)
resumable v2_as_v2 pp2_v2
train v2_as_v2 2 $(stages 2 2) "${resume[@]}"
resumable v2_as_v1 pp2_v2
train v2_as_v1 2 $(stages 2 1) "${resume[@]}"
resumable v1_as_v2 single
train v1_as_v2 2 $(stages 2 2) "${resume[@]}"
resumable v2_as_pp4_v2 pp2_v2
train v2_as_pp4_v2 4 $(stages 4 2) "${resume[@]}"
grep -q "resuming from $work/v2_as_v1/checkpoints/step_00000010" "$work/v2_as_v1.log"
result $((! $?)) "a 2-chunk checkpoint is resumed with 1 chunk per stage"
same "2 chunks per stage resumed with 2" pp2_v2 v2_as_v2 10 0
same "2 chunks per stage resumed with 1" pp2_v2 v2_as_v1 10 1e-5
same "1 stage resumed as 2 stages x 2 chunks" single v1_as_v2 10 1e-5
same "2 stages x 2 chunks resumed as 4 x 2" pp2_v2 v2_as_pp4_v2 10 1e-5

# --dry-run lists each rank's chunks
rm -rf "$work/out"
timeout 120 $MPIRUN -np 4 "$train" "$job" "${common[@]}" --set output_dir="$work/out" \
  $(stages 4 2) --set parallel.micro_batches=4 --dry-run >"$log" 2>&1 &&
  grep -q "interleaved: 2 chunks per stage" "$log" &&
  grep -Eq "^0 +0 +0 +0-0,4-4 .*embedding" "$log" && grep -Eq "^3 +3 +0 +3-3,7-7 .*lm-head" "$log"
result $((! $?)) "--dry-run: 4 stages x 2 chunks, rank 0 holds layers 0 and 4, rank 3 layers 3 and 7"
# the default is one chunk per stage, as --print-job shows
timeout 60 "$train" "$job" --print-job >"$log" 2>&1 && grep -q "virtual_stages: 1" "$log"
result $((! $?)) "--print-job shows parallel.virtual_stages: 1 by default"
finish
