#!/usr/bin/env bash
# Where one decoding step goes, kernel by kernel, in one device call (bench/NOTES.md, "Decode"):
#   device run, carry [".deb"]:  bash bench/decode_profile.sh
#  1. build; with PROFILE_CTEST=1 the `gpu` CTest label first, with PROFILE_MUTATIONS="NAME..."
#     those mutations of tests/gpu/mutation_check_gpu.sh;
#  2. ours, PROFILE_LAYERS (default 4) decoder layers of Qwen3-4B's width from the job's random
#     init, batch 1: the recorded step's time, as bench/decode_bench.py reports it; again with
#     QWEN3_CUDA_PDL=0 (every kernel waits for the whole one before it);
#  3. the same run under ncu: every kernel of PROFILE_KERNELS launches after the first
#     PROFILE_SKIP (decoding steps by then), its own time and DRAM bytes; bench/ncu_summary.py
#     sums them per kernel and per step, beside the step's time: what is left is gaps between
#     the recorded launches.
# PROFILE_SETS="FIELD=VALUE ..." sets job fields in every run, e.g. "precision.linear=NVFP4" (its
# layers then decode from packed weights: the NVFP4 decoding step kernel by kernel).
# PROFILE_NCU_S (default 150) bounds each ncu run: the NVFP4 run needs more (session 12: two
# tries of 150 s and 40 s profiled nothing).
set -u
TOTAL_S=${PROFILE_TOTAL_S:-420}
RESERVE_S=10
OUT=${OUT:-/tmp/decode_profile_out}
source bench/bench_lib.sh
LAYERS=${PROFILE_LAYERS:-4}
SETS=()
for kv in ${PROFILE_SETS:-}; do SETS+=(--set "$kv"); done

main() {
  build_and_check "${PROFILE_CTEST:-0}" "${PROFILE_MUTATIONS:-}" || return 1
  token_shard
  section "ours, $LAYERS layers, batch 1"
  within 90 python3 bench/decode_bench.py ours --layers "$LAYERS" --batches 1 "${SETS[@]}"
  section "ours, $LAYERS layers, batch 1, kernels launched without overlap (QWEN3_CUDA_PDL=0)"
  (export QWEN3_CUDA_PDL=0
   within 90 python3 bench/decode_bench.py ours --layers "$LAYERS" --batches 1 --tag=-nopdl "${SETS[@]}")
  section "ours, $LAYERS layers, batch 1, under ncu"
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
  local skip
  for skip in "${PROFILE_SKIP:-3000}" 300; do   # 300: if the run had fewer launches than that
    within "${PROFILE_NCU_S:-150}" "$ncu" --target-processes all --launch-skip "$skip" \
      --launch-count "${PROFILE_KERNELS:-400}" \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --log-file "$OUT/ncu.csv" \
      python3 bench/decode_bench.py ours --layers "$LAYERS" --batches 1 "${SETS[@]}" > "$WORK/ncu_run.txt" 2>&1
    tail -n 5 "$WORK/ncu_run.txt"
    python3 bench/ncu_summary.py "$OUT/ncu.csv" --layers "$LAYERS" && break
  done
}

main 2>&1 | tee "$OUT/decode_profile.txt"
echo
echo "gpu label: $(gpu_label_summary)" | tee -a "$OUT/decode_profile.txt"
grep "^RESULT" "$RESULTS" | tee -a "$OUT/decode_profile.txt"
