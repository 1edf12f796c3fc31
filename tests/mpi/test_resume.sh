#!/usr/bin/env bash
# Exact resume and resharding with the tiny job under mpirun. A run of 20 steps saves at step 10
# and 20; a second run resumes from a copy of its step 10 and must log the same losses for steps
# 11-20: bit for bit in the same layout, within 1e-5 relative when a 4-stage checkpoint resumes
# with 2 stages, 1 stage, or 2 stages x 2 replicas (one micro-batch each, so that the global
# batch, and with it the sample stream, stays the same). Usage: bash tests/mpi/test_resume.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train job=$build/jobs/tiny.pb data=$build/data/tiny.h5
require "$train" "$job" "$data"

# run NP OUT [--set a=b ...]: 20 steps of the tiny job, every step logged, checkpoints at 10, 20
run() {
  local np=$1 out=$2
  shift 2
  timeout 120 $MPIRUN -np "$np" "$train" "$job" --set data.train="$data" \
    --set output_dir="$out" --set train.steps=20 --set train.log_every=1 \
    --set checkpoint.every=10 --set checkpoint.keep_last=0 "$@" >"$log" 2>&1
  rc=$?
}

# losses FILE: "step loss" for steps 11-20 of a metrics.jsonl
losses() {
  grep -o '"step":[0-9]*,"loss":[^,]*' "$1" | awk -F'[:,]' '$2 > 10 {print $2, $4}'
}

# resumable OUT FROM: OUT/checkpoints holds a copy of FROM's step 10, `latest` pointing at it
resumable() {
  mkdir -p "$1/checkpoints"
  cp -r "$2/checkpoints/step_00000010" "$1/checkpoints/"
  ln -s step_00000010 "$1/checkpoints/latest"
}

# same_losses NAME A B TOLERANCE: steps 11-20 of both runs, equal as text (TOLERANCE 0) or
# within TOLERANCE relative
same_losses() {
  local a b ok=0
  a=$(losses "$2/metrics.jsonl")
  b=$(losses "$3/metrics.jsonl")
  if [ "$(echo "$a" | wc -l)" = 10 ] && [ "$(echo "$b" | wc -l)" = 10 ]; then
    if [ "$4" = 0 ]; then
      [ "$a" = "$b" ] && ok=1
    else
      paste <(echo "$a") <(echo "$b") | awk -v tol="$4" '
        { d = $2 - $4; if (d < 0) d = -d; if ($1 != $3 || d > tol * ($2 < 0 ? -$2 : $2)) bad = 1 }
        END { exit bad }' && ok=1
    fi
  fi
  result $ok "$1" "$(paste <(echo "$a") <(echo "$b") | head -n 10 | tr '\n' ';')"
}

# --- the same layout: bit for bit -----------------------------------------------------------
run 1 "$work/a"
result $((rc == 0)) "pp 1: 20 steps straight" "exit $rc"
resumable "$work/b" "$work/a"
run 1 "$work/b"
ok=0
[ $rc = 0 ] && grep -q "resuming from $work/b/checkpoints/step_00000010" "$log" && ok=1
result $ok "pp 1: resume AUTO follows latest to step 10" "exit $rc"
same_losses "pp 1: steps 11-20 resumed = straight, bit for bit" "$work/a" "$work/b" 0

run 2 "$work/c" --set parallel.pipeline_stages=2
result $((rc == 0)) "pp 2: 20 steps straight" "exit $rc"
run 2 "$work/d" --set parallel.pipeline_stages=2 \
  --set checkpoint.resume="$work/c/checkpoints/step_00000010"
ok=0
[ $rc = 0 ] && [ -d "$work/d/checkpoints/step_00000020" ] && ok=1
result $ok "pp 2: resume from a checkpoint path, saving under its own output_dir" "exit $rc"
same_losses "pp 2: steps 11-20 resumed = straight, bit for bit" "$work/c" "$work/d" 0

run 2 "$work/e" --set parallel.pipeline_stages=2 --set checkpoint.resume=NEVER
ok=0
[ $rc = 0 ] && ! grep -q "resuming" "$log" && ok=1
result $ok "resume NEVER starts fresh" "exit $rc"

# --- resharding a 4-stage checkpoint -------------------------------------------------------
four=(--set model.num_layers=4)
run 4 "$work/r" "${four[@]}" --set parallel.pipeline_stages=4
result $((rc == 0)) "pp 4: 20 steps straight, 4 layers" "exit $rc"
for layout in "2 2 2" "1 1 2" "4 2 1"; do
  read -r np pp mb <<<"$layout"
  out=$work/r-$np-$pp
  resumable "$out" "$work/r"
  run "$np" "$out" "${four[@]}" --set parallel.pipeline_stages="$pp" --set parallel.micro_batches="$mb"
  ok=0
  [ $rc = 0 ] && grep -q "written by 4 stages" "$log" && ok=1
  result $ok "4 stages resumed as $pp stages x $((np / pp)) replicas" "exit $rc"
  same_losses "4 stages -> $pp x $((np / pp)): steps 11-20 within 1e-5" "$work/r" "$out" 1e-5
done

finish
