#!/usr/bin/env bash
# Several GPUs in one device call (bench/NOTES.md, "Several GPUs"):
#   device run, kind nvidia-h200-x2 (or x4, x8), carry [".deb"]:  bash bench/multi_gpu.sh
# Builds with NCCL (bench/device_build.sh), shows how the GPUs are linked, runs the `gpu` CTest
# label (test_nccl.sh compares NCCL with MPI on every layout the GPUs allow), the transport's
# bandwidth against NCCL alone (bench/comm_bench), then Qwen3-4B-shaped training on 1 GPU and
# on all of them in each layout of MULTI_GPU_LAYOUTS ("np:pp:zero:accum[:key=value] ..."; one
# sequence of T tokens per micro-batch; key=value is one more --set of the job). Every part runs
# under its own `timeout`, or is skipped when too little time is left. RESULT lines go to
# $OUT/results.txt, logs to $OUT/logs.tgz; the last thing printed is the table.
set -u
TOTAL_S=${MULTI_GPU_TOTAL_S:-560}
RESERVE_S=15
CTEST_S=${MULTI_GPU_CTEST_S:-200}
COMM_S=${MULTI_GPU_COMM_S:-90}       # comm_bench p2p and coll together
RUN_S=${MULTI_GPU_RUN_S:-75}          # each 4B training run, start-up included
T=${MULTI_GPU_T:-2048}
OUT=${OUT:-/tmp/multi_gpu_out}
source bench/bench_lib.sh

section "build"
source bench/device_build.sh || true
[ -x build/qwen3-train ] || { echo "build FAILED"; exit 1; }
export NCCL_NVLS_ENABLE=0   # the machine's rule (KINDS.md): no NVLink multicast
gpus=$(nvidia-smi -L | grep -c '^GPU')
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>&1 | head -n $((gpus + 3))
acc=$((8 / gpus))
LAYOUTS=${MULTI_GPU_LAYOUTS:-"$gpus:$gpus:0:8 $gpus:1:0:$acc $gpus:1:0:$acc:parallel.overlap_reduction=false $gpus:1:1:$acc"}

section "ctest -L gpu (test_nccl's checks printed in full)"
b=$(budget "$CTEST_S" 30)
[ "$b" = 0 ] && echo "SKIPPED ctest (time)" ||
(cd build && timeout -k 5 "$b" ctest -L "${MULTI_GPU_CTEST_LABEL:-gpu}" -V --timeout "$b") \
  > "$OUT/ctest.txt" 2>&1
grep -E "^[0-9]+: (PASS|FAIL)|tests passed|tests failed|Test +#" "$OUT/ctest.txt" |
  grep -v ": PASS CPU" | grep -E "nccl|NCCL|FAIL|Test +#|tests" | tail -n 60
ctest_summary=$(grep -E "tests passed|tests failed" "$OUT/ctest.txt" | tail -n 1)

if [ -x build/bench/comm_bench ]; then
  section "transport bandwidth: ours against NCCL alone"
  # one mode a process (the layout and NCCL are set up once), both within one budget
  comm_end=$(( $(date +%s) + $(budget "$COMM_S" 10) ))
  : > "$OUT/comm_bench.txt"
  for mode in p2p coll; do
    b=$(( comm_end - $(date +%s) ))
    (( b < 10 )) && { echo "SKIPPED comm_bench $mode (time)"; continue; }
    timeout -k 5 "$b" mpirun --allow-run-as-root --bind-to none -np "$gpus" -x NCCL_NVLS_ENABLE \
      build/bench/comm_bench "$mode" 2>&1 | tee -a "$OUT/comm_bench.txt" | grep -v "^ *#" | tail -n 40
  done
  grep "^RESULT" "$OUT/comm_bench.txt" >> "$RESULTS"
fi

section "Qwen3-4B: initial weights (PyTorch, one GPU) and a token shard"
rm -rf "$WORK/hf4b"
within 120 python3 bench/torch_train_bench.py eager --mb 1 --accum 8 --T "$T" \
  --warmup 1 --steps 2 --save-hf "$WORK/hf4b" --budget 110
timeout -k 5 60 python3 bench/ours_train_bench.py shard --out "$WORK/random_2m.h5"

run4b() {   # run4b NP PP ZERO ACCUM [KEY=VALUE]
  local b label=ours-${QWEN3_CUDA_PRECISION:-bf16}
  b=$(budget "$RUN_S" 30)
  [ "$b" = 0 ] && { echo "SKIPPED np=$1 pp=$2 zero=$3 $5 (time)"; return; }
  local extra=()
  [ -n "${5:-}" ] && extra=(-- --set "$5") label="$label+${5##*.}"
  timeout -k 5 "$b" python3 bench/ours_train_bench.py train --np "$1" --pp "$2" --zero "$3" \
    --mb 1 --accum "$4" --T "$T" --warmup 1 --steps 2 --budget $((b - 5)) \
    --init-hf "$WORK/hf4b" --label "$label" "${extra[@]}"
}
section "Qwen3-4B: ours on one GPU, 8 sequences per step"
run4b 1 1 0 8
for l in $LAYOUTS; do
  IFS=: read -r np pp zero accum set <<< "$l"
  section "Qwen3-4B: ours on $np GPUs, $pp stage(s) x $((np / pp)) replica(s), ZeRO $zero, $accum micro-batches $set"
  run4b "$np" "$pp" "$zero" "$accum" "$set"
done

tar czf "$OUT/logs.tgz" -C "$WORK" --exclude='*.h5' --exclude='*.safetensors' --exclude=ckpt . \
  2>/dev/null
section "table"
echo "gpu label: ${ctest_summary:-no summary}"
grep "^RESULT" "$RESULTS" | sed 's/^RESULT //' | awk '{
  delete f; for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  if (f["system"] == "comm") { printf "%-14s %-6s %10s B  ours %8s GB/s  nccl %8s GB/s\n",
      f["op"], "np=" f["np"], f["bytes"], f["ours_busbw"], f["nccl_busbw"]; next }
  printf "%-14s np=%-2s pp=%-2s zero=%-2s accum=%-3s tok/s %7s  per GPU %7s  MFU %6s  alloc %6s GiB %s\n",
    f["system"], f["np"] ? f["np"] : 1, f["pp"] ? f["pp"] : 1, f["zero"] ? f["zero"] : 0, f["accum"],
    f["tok_s"], f["tok_s_gpu"] ? f["tok_s_gpu"] : f["tok_s"], f["mfu"], f["alloc_peak_gib"],
    f["status"] }'
