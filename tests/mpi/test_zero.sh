#!/usr/bin/env bash
# ZeRO-1 (parallel.zero: 1) must not change the numbers: 20 steps of the tiny job (4 layers) on
# 2 stages x 2 replicas and on 1 stage x 4 replicas, sharded against unsharded, give every step's
# loss within 1e-7 relative (the gradients are summed by MPI_Reduce_scatter instead of
# MPI_Allreduce, and the gradient norm from per-shard partial sums, so the bits may differ). A
# ZeRO-1 checkpoint of step 10 resumed unsharded, an unsharded one resumed with ZeRO-1, and a
# 2 x 2 ZeRO-1 one resumed as 1 x 4 ZeRO-1 (other shard boundaries), give steps 11-20 within 1e-7
# of the straight run. --dry-run shows less weights+adam memory per rank with zero 1, and
# parallel.zero outside {0, 1} is refused. Usage: bash tests/mpi/test_zero.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train job=$build/jobs/tiny.pb data=$build/data/tiny.h5
require "$train" "$job" "$data"

common=(--set model.num_layers=4 --set train.steps=20 --set train.log_every=1
        --set data.train="$data" --set data.micro_batch_size=2 --set checkpoint.every=10
        --set checkpoint.keep_last=0)

# run NAME NP STAGES MICRO_BATCHES ZERO [--set ...]: output in $work/NAME
run() {
  local name=$1 np=$2 pp=$3 mb=$4 zero=$5
  shift 5
  if timeout 120 $MPIRUN -np "$np" "$train" "$job" "${common[@]}" --set output_dir="$work/$name" \
      --set parallel.pipeline_stages="$pp" --set parallel.micro_batches="$mb" \
      --set parallel.zero="$zero" "$@" >"$work/$name.log" 2>&1; then
    pass "$name: $np processes ran"
  else
    fail "$name: $np processes failed"
    tail -n 20 "$work/$name.log"
  fi
}

# losses OUT FIRST: "step loss" of steps >= FIRST of OUT/metrics.jsonl
losses() {
  grep -o '"step":[0-9]*,"loss":[^,]*' "$1/metrics.jsonl" | awk -F'[:,]' -v f="$2" '$2 >= f {print $2, $4}'
}

# same_losses WHAT A B FIRST: steps FIRST..20 of A and B within 1e-7 relative; prints the worst
same_losses() {
  local verdict
  verdict=$(paste <(losses "$work/$2" "$4") <(losses "$work/$3" "$4") | awk -v want=$((21 - $4)) '
    { n++; if ($1 != $3) bad = 1
      d = $2 - $4; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > worst) worst = r }
    END { if (n != want || bad) print "steps " n; else if (worst > 1e-7) print "worst " worst
          else print "ok " worst + 0 }')
  case $verdict in
    ok*) pass "$1: steps $4-20 within 1e-7 (worst relative difference ${verdict#ok })" ;;
    *) fail "$1: losses differ ($verdict)"
       paste <(losses "$work/$2" "$4") <(losses "$work/$3" "$4") | head -n 5 ;;
  esac
}

# --- straight runs: the same global batch of 8 sequences in every layout ----------------------
run pp2dp2_z0 4 2 2 0
run pp2dp2_z1 4 2 2 1
run pp1dp4_z0 4 1 1 0
run pp1dp4_z1 4 1 1 1
same_losses "2 x 2: ZeRO-1 = unsharded" pp2dp2_z0 pp2dp2_z1 1
same_losses "1 x 4: ZeRO-1 = unsharded" pp1dp4_z0 pp1dp4_z1 1

# --- checkpoints across sharding ----------------------------------------------------------------
ck() { echo "$work/$1/checkpoints/step_00000010"; }
run z1_to_z0 4 2 2 0 --set checkpoint.resume="$(ck pp2dp2_z1)"
same_losses "2 x 2 ZeRO-1 checkpoint resumed unsharded" pp2dp2_z1 z1_to_z0 11
run z0_to_z1 4 1 1 1 --set checkpoint.resume="$(ck pp1dp4_z0)"
same_losses "1 x 4 unsharded checkpoint resumed with ZeRO-1" pp1dp4_z0 z0_to_z1 11
run z1_to_z1 4 1 1 1 --set checkpoint.resume="$(ck pp2dp2_z1)"
same_losses "2 x 2 ZeRO-1 checkpoint resumed as 1 x 4 ZeRO-1" pp2dp2_z1 z1_to_z1 11
for name in z1_to_z0 z0_to_z1 z1_to_z1; do
  grep -q "resuming from" "$work/$name.log" || fail "$name did not resume"
done

# --- memory per rank as --dry-run predicts it ---------------------------------------------------
# dry NP STAGES ZERO: rank 0's weights+adam MiB (the layout in $log)
dry() {
  $MPIRUN -np "$1" "$train" "$job" "${common[@]}" --set parallel.pipeline_stages="$2" \
    --set parallel.zero="$3" --dry-run >"$log" 2>&1
  awk '$1 == "0" && $2 == "0" { print $6; exit }' "$log"
}
for layout in "4 2" "4 1"; do
  read -r np pp <<<"$layout"
  a=$(dry "$np" "$pp" 0) b=$(dry "$np" "$pp" 1)
  if [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" 'BEGIN { exit !(b < a) }'; then
    pass "--dry-run $pp x $((np / pp)): weights+adam per rank $a MiB -> $b MiB with zero 1"
    grep -q "(ZeRO-1: AdamW state sharded over replicas)" "$log" && pass "the layout names ZeRO-1" ||
      fail "the layout does not name ZeRO-1"
  else
    fail "--dry-run $pp x $((np / pp)): weights+adam per rank '$a' -> '$b' MiB with zero 1"
  fi
done

if "$train" "$job" "${common[@]}" --set parallel.zero=2 --dry-run >"$log" 2>&1; then
  fail "parallel.zero: 2 accepted"
elif grep -q "parallel.zero must be 0 or 1" "$log"; then
  pass "parallel.zero: 2 refused"
else
  result 0 "parallel.zero: 2 refused with its reason"
fi

finish
