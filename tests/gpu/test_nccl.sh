#!/usr/bin/env bash
# NCCL between GPUs (label `gpu`; needs 2 GPUs or more, else it says so and exits 77, skipped).
# The tiny job with 4 layers, 20 steps, in the exact fp32 mode and in the bf16 mode, on each
# layout that the GPUs allow: 2 stages (1F1B and GPipe), 2 replicas (their sums started during
# backward, the default, and all after it), 2 replicas with ZeRO-1, and with 4 GPUs 4 stages,
# 2 stages x 2 replicas with ZeRO-1 and 4 replicas. Each runs with tensors over NCCL (QWEN3_NCCL=1,
# and the log must say NCCL is on) and over MPI through the host (QWEN3_NCCL=0): every step's
# loss, learning rate and gradient norm must be equal as text. Both transports sum two members
# alike (a + b), and a pipeline's transfers carry bits; with more than two replicas NCCL's sum
# order may differ from MPI's, so 4 replicas are compared within 1e-6 relative instead.
# Then: more processes than GPUs fall back to MPI with a message, and QWEN3_NCCL=1 refuses
# them; a rank killed with SIGKILL mid-run ends every rank within 30 s, naming the rank.
# Usage: bash tests/gpu/test_nccl.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train job=$build/jobs/tiny.pb data=$build/data/tiny.h5
require "$train" "$job" "$data"
require_gpus 2 test_nccl
if ! grep -q '^NCCL_LIBRARY:[A-Z]*=/' "$build/CMakeCache.txt"; then
  fail "this CUDA build has no NCCL (CMake found no nccl.h or libnccl: set NCCL_ROOT)"
  finish; exit
fi
unset QWEN3_CUDA_TF32 QWEN3_COMM_TIMEOUT_S QWEN3_NCCL_SEND_BUFFERS

# run NP OUT [--set a=b ...]: 20 steps of the 4-layer tiny job on the GPUs, every step logged
run() {
  local np=$1 out=$2
  shift 2
  timeout 300 $MPIRUN -np "$np" -x QWEN3_NCCL -x QWEN3_CUDA_PRECISION "$train" "$job" \
    --set data.train="$data" --set backend=CUDA --set output_dir="$out" \
    --set model.num_layers=4 --set train.steps=20 --set train.log_every=1 \
    --set data.micro_batch_size=2 --set parallel.micro_batches=4 \
    --set checkpoint.resume=NEVER --set checkpoint.every=-1 "$@" >"$log" 2>&1
  rc=$?
}

# numbers OUT: "step loss lr grad_norm" of every logged step, as the trainer wrote them
numbers() {
  grep -o '"step":[0-9]*,"loss":[^,]*,"lr":[^,]*,"grad_norm":[^,]*' "$1/metrics.jsonl" |
    tr -d '"' | tr ',:' '  ' | awk '{print $2, $4, $6, $8}'
}

# same NAME A B TOLERANCE: 20 steps each; equal as text (TOLERANCE 0), else every number within
# TOLERANCE relative; prints the worst relative difference of loss and gradient norm
same() {
  local a b ok=0 worst
  a=$(numbers "$2") b=$(numbers "$3")
  worst=$(paste <(echo "$a") <(echo "$b") | awk '{ for (i = 2; i <= 4; i++) {
            d = ($i - $(i + 4)) / ($i == 0 ? 1 : $i); if (d < 0) d = -d; if (d > w) w = d } }
            END { printf "%.2e", w }')
  if [ "$(echo "$a" | wc -l)" = 20 ] && [ "$(echo "$b" | wc -l)" = 20 ]; then
    if [ "$4" = 0 ]; then [ "$a" = "$b" ] && ok=1
    else awk -v w="$worst" -v t="$4" 'BEGIN { exit !(w <= t) }' && ok=1; fi
  fi
  result $ok "$1 (worst relative difference $worst)" \
    "$(paste <(echo "$a") <(echo "$b") | head -n 3 | tr '\n' ';')"
}

# layout NAME NP TOLERANCE [--set ...]: the run over NCCL against the same run over MPI
layout() {
  local name=$1 np=$2 tol=$3
  shift 3
  QWEN3_NCCL=0 run "$np" "$work/${name}_mpi" "$@"
  result $((rc == 0)) "$name, tensors over MPI: 20 steps" "exit $rc"
  QWEN3_NCCL=1 run "$np" "$work/${name}_nccl" "$@"
  local ok=0
  [ $rc = 0 ] && grep -q "comm: NCCL .* on" "$log" && ok=1
  result $ok "$name, tensors over NCCL: 20 steps, NCCL on" "exit $rc"
  same "$name: NCCL gives MPI's numbers" "$work/${name}_mpi" "$work/${name}_nccl" "$tol"
}

for prec in fp32 bf16; do
  export QWEN3_CUDA_PRECISION=$prec
  layout "$prec 2 stages 1F1B" 2 0 --set parallel.pipeline_stages=2
  layout "$prec 2 replicas" 2 0 --set parallel.pipeline_stages=1
  if [ "$prec" = fp32 ]; then
    layout "$prec 2 stages GPipe" 2 0 --set parallel.pipeline_stages=2 --set parallel.schedule=GPIPE
    layout "$prec 2 replicas ZeRO-1" 2 0 --set parallel.pipeline_stages=1 --set parallel.zero=1
    layout "$prec 2 replicas, sums after backward" 2 0 --set parallel.pipeline_stages=1 \
      --set parallel.overlap_reduction=false
  fi
  if [ "$gpus" -ge 4 ]; then
    layout "$prec 4 stages" 4 0 --set parallel.pipeline_stages=4
    layout "$prec 2 stages x 2 replicas ZeRO-1" 4 0 --set parallel.pipeline_stages=2 \
      --set parallel.zero=1
    layout "$prec 4 replicas" 4 1e-6 --set parallel.pipeline_stages=1
  fi
done
export QWEN3_CUDA_PRECISION=fp32

# more ranks than GPUs: NCCL cannot pair them; MPI carries the tensors, or QWEN3_NCCL=1 refuses
np=$((gpus * 2))
QWEN3_NCCL= run "$np" "$work/shared" --set parallel.pipeline_stages=2
ok=0
[ $rc = 0 ] && grep -q "share a GPU" "$log" && ok=1
result $ok "$np ranks on $gpus GPUs: tensors over MPI, saying that ranks share a GPU" "exit $rc"
QWEN3_NCCL=1 run "$np" "$work/shared_required" --set parallel.pipeline_stages=2
ok=0
[ $rc != 0 ] && grep -q "QWEN3_NCCL=1, but NCCL cannot carry" "$log" && ok=1
result $ok "$np ranks on $gpus GPUs with QWEN3_NCCL=1: refused" "exit $rc"

# a rank killed mid-run: every rank ends within 30 s, and the log names the rank
kill_test() {
  local out=$work/killed
  QWEN3_NCCL=1 timeout 120 $MPIRUN -np 2 -x QWEN3_NCCL -x QWEN3_CUDA_PRECISION "$train" "$job" \
    --set data.train="$data" --set backend=CUDA --set output_dir="$out" \
    --set model.num_layers=4 --set train.steps=100000 --set train.log_every=1 \
    --set parallel.pipeline_stages=2 --set checkpoint.resume=NEVER --set checkpoint.every=-1 \
    >"$log" 2>&1 &
  local mpirun_pid=$! victim="" t
  for t in $(seq 1 600); do   # until step 5 is logged (60 s at most)
    [ "$(grep -c '"step"' "$out/metrics.jsonl" 2>/dev/null)" -ge 5 ] && break
    sleep 0.1
  done
  local p
  for p in $(pgrep -f "$train $job"); do
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1' && victim=$p
  done
  if [ -z "$victim" ]; then
    kill -9 "$mpirun_pid" 2>/dev/null
    fail "kill test: no rank 1 process found (the job did not start?)"
    return
  fi
  local t0 code ms left
  t0=$(date +%s%N)
  kill -9 "$victim"
  wait "$mpirun_pid"
  code=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  left=$(pgrep -f "$train $job" | wc -l)
  ok=0
  [ $code != 0 ] && [ "$code" != 124 ] && [ "$left" = 0 ] && [ "$ms" -lt 30000 ] &&
    grep -qi "rank 1" "$log" && ok=1
  result $ok "rank 1 killed at step 5+: the job ended in $ms ms (exit $code, $left left), naming rank 1"
  pkill -9 -f "$train $job" 2>/dev/null
}
kill_test

finish
