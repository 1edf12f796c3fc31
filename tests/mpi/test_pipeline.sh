#!/usr/bin/env bash
# Pipeline and data parallelism must not change the numbers: the tiny job (4 layers) with the
# same global batch, run on 1, 2 and 4 processes as pure pipelines (GPipe and 1F1B) and with
# activation recompute, gives every step's loss bit for bit equal to the single process's (every
# sum runs in the same order: gradients accumulate per micro-batch in schedule-independent order,
# the gradient norm is summed per layer group in a fixed order); as 2 stages x 2 replicas and
# 1 x 2 and 1 x 4, where the replicas' gradients are summed by MPI in another order than one
# process accumulates them, within 1e-7 relative. The replicas' sums started layer by layer
# during backward (parallel.overlap_reduction, the default) give the losses of one sum after it.
# Then a rank that fails brings the whole job down fast, naming itself.
# Usage: bash tests/mpi/test_pipeline.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
out=$work

common=(--set model.num_layers=4 --set train.steps=20 --set train.log_every=1
        --set data.train="$build/data/tiny.h5" --set data.micro_batch_size=2
        --set checkpoint.resume=NEVER)

# run NAME NP STAGES MICRO_BATCHES SCHEDULE [--set ...]
run() {
  local name=$1 np=$2 pp=$3 mb=$4 sched=$5
  shift 5
  if timeout 600 $MPIRUN -np "$np" "$build/qwen3-train" "$build/jobs/tiny.pb" "${common[@]}" \
      --set output_dir="$out/$name" --set checkpoint.dir="$out/$name/ckpt" \
      --set parallel.pipeline_stages="$pp" --set parallel.micro_batches="$mb" \
      --set parallel.schedule="$sched" "$@" >"$out/$name.log" 2>&1; then
    pass "$name: $np processes ran"
  else
    fail "$name: $np processes failed"
    tail -n 20 "$out/$name.log"
  fi
}

# losses of a metrics.jsonl, one per line
losses() { grep -o '"loss":[^,}]*' "$1/metrics.jsonl" | cut -d: -f2; }

# same_losses NAME TOL: every step within TOL relative of the single-process run; TOL 0 asks for
# the same bits (metrics.jsonl prints every double with 17 significant digits)
same_losses() {
  local verdict
  verdict=$(paste <(losses "$out/single") <(losses "$out/$1") | awk -v tol="$2" '
    { n++; d = $1 - $2; if (d < 0) d = -d; r = d / ($1 < 0 ? -$1 : $1); if (r > worst) worst = r
      if ($1 != $2) differ++ }
    END { if (n != 20) print "steps " n
          else if (tol == 0 && differ) print "worst " worst " (" differ " steps not bit-identical)"
          else if (worst > tol) print "worst " worst
          else print "ok " worst + 0 }')
  case $verdict in
    ok*) if [ "$2" = 0 ]; then
           pass "$1: 20 steps equal the single process bit for bit"
         else
           pass "$1: 20 steps within $2 of the single process (worst relative difference ${verdict#ok })"
         fi ;;
    *) fail "$1: losses differ from the single process ($verdict)"
       paste <(losses "$out/single") <(losses "$out/$1") | head -n 5 ;;
  esac
}

run single 1 1 4 ONE_F_ONE_B
run pp2_1f1b 2 2 4 ONE_F_ONE_B
run pp2_gpipe 2 2 4 GPIPE
run pp4_1f1b 4 4 4 ONE_F_ONE_B
run pp4_gpipe 4 4 4 GPIPE
run pp2_dp2 4 2 2 ONE_F_ONE_B
run pp1_dp2 2 1 2 ONE_F_ONE_B
run pp2_recompute 2 2 4 ONE_F_ONE_B --set parallel.recompute=true
# the replicas' sums after backward instead of layer by layer during it
run pp2_dp2_after 4 2 2 ONE_F_ONE_B --set parallel.overlap_reduction=false
run pp1_dp2_after 2 1 2 ONE_F_ONE_B --set parallel.overlap_reduction=false
run pp1_dp4 4 1 1 ONE_F_ONE_B
run pp1_dp4_after 4 1 1 ONE_F_ONE_B --set parallel.overlap_reduction=false
for name in pp2_1f1b pp2_gpipe pp4_1f1b pp4_gpipe pp2_recompute; do
  same_losses "$name" 0
done
for name in pp2_dp2 pp1_dp2 pp1_dp4; do
  same_losses "$name" 1e-7
done
if cmp -s <(losses "$out/pp2_1f1b") <(losses "$out/pp2_recompute"); then
  pass "activation recompute changes no bit of the losses"
else
  fail "activation recompute changes the losses"
fi
# two members sum alike in one call or many (a + b); four may not, but Open MPI's do here
for name in pp2_dp2 pp1_dp2 pp1_dp4; do
  if cmp -s <(losses "$out/$name") <(losses "$out/${name}_after"); then
    pass "$name: the replicas' sums during backward give the losses of the sums after it"
  else
    fail "$name: the replicas' sums during backward change the losses"
    paste <(losses "$out/$name") <(losses "$out/${name}_after") | head -n 5
  fi
done

first=$(losses "$out/single" | head -n 1) last=$(losses "$out/single" | tail -n 1)
if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }'; then
  pass "the loss falls ($first -> $last)"
else
  fail "the loss does not fall ($first -> $last)"
fi

# a failed rank ends every rank within 30 s, and the output names it
start=$SECONDS
timeout 60 $MPIRUN -np 4 "$build/qwen3-train" "$build/jobs/tiny.pb" "${common[@]}" \
  --set train.steps=1000 --set output_dir="$out/fail" --set parallel.pipeline_stages=4 \
  --fail-at 2:3 >"$out/fail.log" 2>&1
rc=$? secs=$((SECONDS - start))
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$secs" -le 30 ] &&
   grep -q "rank 2/4.*failing on purpose at step 3" "$out/fail.log"; then
  pass "rank 2 failing at step 3 ends the job in ${secs}s (exit $rc), naming rank 2"
else
  fail "failure: exit $rc after ${secs}s"
  tail -n 20 "$out/fail.log"
fi

finish
