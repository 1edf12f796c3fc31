#!/usr/bin/env bash
# Two device scripts at once on nvidia-h200-x2 (whose time counts as one machine's), one per
# GPU, after one build:
#   device run, kind nvidia-h200-x2, carry [".deb"]:
#     bash bench/pair.sh "TABLE_T=4096 bash bench/train_table.sh" "DECODE_CTEST=1 bash bench/decode.sh"
# The first command gets GPU 0, the second GPU 1 (CUDA_VISIBLE_DEVICES in PCI order, as
# nvidia-smi counts), each its own BENCH_WORK and OUT ($OUT/gpu0, $OUT/gpu1) and BENCH_BUILT=1
# (bench/device_build.sh then only sets the environment). Each one's whole output goes to
# $OUT/gpuN.log; the ends of both are printed, GPU 0's first. The two share the host's cores
# and memory bandwidth: a figure that depends on the host says so in bench/NOTES.md.
set -u
[ $# = 2 ] || { echo "usage: bash $0 'COMMAND FOR GPU 0' 'COMMAND FOR GPU 1'"; exit 2; }
OUT=${OUT:-/tmp/pair_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$(date +%s)
source bench/device_build.sh > "$OUT/build.txt" 2>&1 || { tail -n 30 "$OUT/build.txt"; exit 1; }
[ -x build/qwen3-train ] || { tail -n 30 "$OUT/build.txt"; echo "build FAILED"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export BENCH_BUILT=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
cmds=("$1" "$2")
for i in 0 1; do
  (export CUDA_VISIBLE_DEVICES=$i BENCH_WORK=/tmp/qwen3_bench_gpu$i OUT=$OUT/gpu$i
   mkdir -p "$OUT"
   bash -c "${cmds[i]}" > "$OUT.log" 2>&1
   echo "exit $?" >> "$OUT.log") &
done
wait
for i in 0 1; do
  echo
  echo "######## GPU $i: ${cmds[i]} (whole log: gpu$i.log)"
  tail -n "${PAIR_TAIL:-45}" "$OUT/gpu$i.log"
done
echo "pair: $(( $(date +%s) - t0 )) s"
