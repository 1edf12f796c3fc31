#!/usr/bin/env bash
# N one-process CUDA runs (fp32 mode) of the tiny job at 4 layers, 20 steps with checkpoints at
# 10 and 20 (the run of tests/gpu/test_gpu_train.sh), counting the runs that did not exit 0 and
# printing the end of each one's log (bench/NOTES.md, sessions 14-15):
#   device run, carry [".deb"], after a build:   N=30 bash bench/stress_tiny.sh
# Each call works in a directory of its own (removed when every run passed), so two at once
# (bench/pair.sh) do not collide. STRESS_SETS adds --set options (e.g. "checkpoint.every=0"),
# each after its own --set. STRESS_DIRECT=1: the process writes its standard output and error to
# a file itself (mpirun starts a shell that redirects them), not through mpirun's forwarding.
set -u
source scripts/env.sh
n=${N:-12} bad=0 sets="" tmp=$(mktemp -d /tmp/stress.XXXXXX)
for kv in ${STRESS_SETS:-}; do sets="$sets --set $kv"; done
for i in $(seq "$n"); do
  log=$tmp/$i.log child=$tmp/$i.child.log
  cmd=(build/qwen3-train build/jobs/tiny.pb
    --set data.train=build/data/tiny.h5 --set backend=CUDA --set output_dir="$tmp/$i"
    --set train.steps=20 --set train.log_every=1 --set checkpoint.every=10
    --set checkpoint.keep_last=0 --set model.num_layers=4 $sets)
  if [ "${STRESS_DIRECT:-0}" = 1 ]; then
    QWEN3_CUDA_PRECISION=fp32 timeout 120 $MPIRUN -np 1 bash -c 'exec "$@" > "$0" 2>&1' \
      "$child" "${cmd[@]}" > "$log" 2>&1
  else
    QWEN3_CUDA_PRECISION=fp32 timeout 120 $MPIRUN -np 1 "${cmd[@]}" > "$log" 2>&1
  fi
  rc=$?
  if [ $rc != 0 ]; then
    bad=$((bad + 1))
    echo "run $i: exit $rc"
    for f in "$log" "$child"; do
      [ -f "$f" ] && { echo "  -- $f"; grep -v "step \|checkpoint" "$f" | tail -n 12; }
    done
  fi
done
how="QWEN3_CUDA_GEMM_TUNE=${QWEN3_CUDA_GEMM_TUNE:-1 (default)}${sets}"
[ "${STRESS_DIRECT:-0}" = 1 ] && how="$how, direct"
[ -n "${UCX_MEM_EVENTS:-}" ] && how="$how, UCX_MEM_EVENTS=$UCX_MEM_EVENTS"
echo "stress ($how): $bad of $n runs failed"
[ $bad = 0 ] && rm -rf "$tmp"
