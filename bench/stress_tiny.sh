#!/usr/bin/env bash
# N one-process CUDA runs (fp32 mode) of the tiny job at 4 layers, 20 steps with checkpoints at
# 10 and 20 (the run of tests/gpu/test_gpu_train.sh that died in session 14), counting the runs
# that did not exit 0 and printing the end of each one's log (bench/NOTES.md, session 14: with
# QWEN3_CUDA_GEMM_TUNE=1, 5 of 45 such runs exited 1 after their last step):
#   device run, carry [".deb"], after a build:   N=15 QWEN3_CUDA_GEMM_TUNE=1 bash bench/stress_tiny.sh
# STRESS_SETS adds --set options (e.g. "checkpoint.every=0"), each after its own --set.
set -u
source scripts/env.sh
n=${N:-12} bad=0 sets=""
for kv in ${STRESS_SETS:-}; do sets="$sets --set $kv"; done
for i in $(seq "$n"); do
  QWEN3_CUDA_PRECISION=fp32 timeout 120 $MPIRUN -np 1 build/qwen3-train build/jobs/tiny.pb \
    --set data.train=build/data/tiny.h5 --set backend=CUDA --set output_dir="/tmp/stress_$i" \
    --set train.steps=20 --set train.log_every=1 --set checkpoint.every=10 \
    --set checkpoint.keep_last=0 --set model.num_layers=4 $sets > "/tmp/stress_$i.log" 2>&1
  rc=$?
  if [ $rc != 0 ]; then
    bad=$((bad + 1))
    echo "run $i: exit $rc"
    grep -v "step \|checkpoint" "/tmp/stress_$i.log" | tail -n 12
  fi
done
echo "stress (QWEN3_CUDA_GEMM_TUNE=${QWEN3_CUDA_GEMM_TUNE:-0}${sets}): $bad of $n runs failed"
