#!/usr/bin/env bash
# Decode at Qwen3-4B's shape in one device call (bench/NOTES.md, "Decode"):
#   device run, carry [".deb"]:  bash bench/decode.sh
#  1. build (bench/device_build.sh); with DECODE_CTEST=1 the `gpu` CTest label first, with
#     DECODE_MUTATIONS="NAME..." those mutations of tests/gpu/mutation_check_gpu.sh;
#  2. PyTorch (bench/decode_bench.py torch): random-init weights and prompts saved for ours,
#     transformers' generate, eager; with DECODE_COMPILE=1 also its static cache under
#     torch.compile(mode="reduce-overhead");
#  3. ours on the same weights and prompts; batch 1 again with QWEN3_CUDA_PDL=0 (no programmatic
#     dependent launch) and with --timing (per-stage times); with DECODE_NVFP4=1 also the job's
#     NVFP4 recipe (precision.linear NVFP4: its layers decode from packed weights where the
#     backend has them, ops.h nvfp4_gemv_packed), labelled ours-nvfp4, and the same from the
#     training's bf16 operands (eval.packed_nvfp4 false), ours-nvfp4-unpacked.
# DECODE_BATCHES (default 1,8) are the batch sizes. Everything goes to $OUT/decode.txt; the
# table is printed last.
set -u
TOTAL_S=${DECODE_TOTAL_S:-400}
RESERVE_S=10
OUT=${OUT:-/tmp/decode_out}
source bench/bench_lib.sh
BATCHES=${DECODE_BATCHES:-1,8}

main() {
  build_and_check "${DECODE_CTEST:-0}" "${DECODE_MUTATIONS:-}" || return 1
  token_shard

  section "PyTorch: weights, prompts, generate"
  rm -rf "$WORK/hf4b"
  local compile=()
  [ "${DECODE_COMPILE:-0}" = 1 ] && compile=(--compile)
  within 240 python3 bench/decode_bench.py torch --hf-dir "$WORK/hf4b" --batches "$BATCHES" \
    --budget 200 "${compile[@]}"

  section "ours"
  within 120 python3 bench/decode_bench.py ours --hf-dir "$WORK/hf4b" --batches "$BATCHES"
  section "ours, batch 1, every kernel waiting for the whole one before it (QWEN3_CUDA_PDL=0)"
  (export QWEN3_CUDA_PDL=0
   within 60 python3 bench/decode_bench.py ours --hf-dir "$WORK/hf4b" --batches 1 --tag=-nopdl)
  section "ours, batch 1, --timing"
  within 60 python3 bench/decode_bench.py ours --hf-dir "$WORK/hf4b" --batches 1 --timing
  if [ "${DECODE_NVFP4:-0}" = 1 ]; then
    section "ours, NVFP4 linears"
    within 120 python3 bench/decode_bench.py ours --hf-dir "$WORK/hf4b" --batches "$BATCHES" \
      --set precision.linear=NVFP4 --tag=-nvfp4
    section "ours, NVFP4 linears decoded from the training's bf16 operands (eval.packed_nvfp4 false)"
    within 120 python3 bench/decode_bench.py ours --hf-dir "$WORK/hf4b" --batches "$BATCHES" \
      --set precision.linear=NVFP4 --set eval.packed_nvfp4=false --tag=-nvfp4-unpacked
  fi
}

main 2>&1 | tee "$OUT/decode.txt"
echo
echo "gpu label: $(gpu_label_summary)" | tee -a "$OUT/decode.txt"
python3 - "$RESULTS" <<'PY' | tee -a "$OUT/decode.txt"
import sys
sys.path.insert(0, "bench")
from bench_common import print_table, read_results
print_table(read_results(sys.argv[1]),
            [("system", "system", None), ("batch", "batch", None),
             ("prefill tok/s", "prefill_tok_s", "{:.0f}".format),
             ("decode tok/s", "decode_tok_s", "{:.1f}".format),
             ("ms per token step", "ms_per_token", "{:.2f}".format)], "decode_tok_s")
PY
