#!/usr/bin/env bash
# Evaluation scoring at Qwen3-4B's shape in one device call (bench/NOTES.md, "Scoring"):
#   device run, carry [".deb"]:  bash bench/score.sh
#  1. build (bench/device_build.sh); with SCORE_CTEST=1 the `gpu` CTest label first, and the
#     GPU mutations named in SCORE_MUTATIONS ("NAME ...", tests/gpu/mutation_check_gpu.sh);
#  2. PyTorch (bench/score_bench.py torch): random-init weights saved for ours, then its scoring
#     (forward and per-token NLL, bf16, SDPA, inference mode) at each SCORE_MBS (default 1,4);
#  3. ours: an evaluation run over the random token shard from the same weights, each mb.
# Everything goes to $OUT/score.txt; the table (tok/s and forward MFU) is printed last.
set -u
TOTAL_S=${SCORE_TOTAL_S:-420}
RESERVE_S=10
OUT=${OUT:-/tmp/score_out}
source bench/bench_lib.sh
MBS=${SCORE_MBS:-1,4}

main() {
  build_and_check "${SCORE_CTEST:-0}" "${SCORE_MUTATIONS:-}" || return 1
  token_shard
  section "PyTorch: weights, scoring"
  rm -rf "$WORK/hf4b_score"
  within 200 python3 bench/score_bench.py torch --hf-dir "$WORK/hf4b_score" --mbs "$MBS"
  section "ours"
  within 200 python3 bench/score_bench.py ours --hf-dir "$WORK/hf4b_score" --mbs "$MBS"
}

main 2>&1 | tee "$OUT/score.txt"
echo
echo "gpu label: $(gpu_label_summary)" | tee -a "$OUT/score.txt"
python3 - "$RESULTS" <<'PY' | tee -a "$OUT/score.txt"
import sys
sys.path.insert(0, "bench")
from bench_common import print_table, read_results
print_table(read_results(sys.argv[1]),
            [("system", "system", None), ("mb", "mb", None), ("T", "T", None),
             ("tok/s", "tok_s", "{:.0f}".format),
             ("forward MFU", "fwd_mfu", lambda v: f"{100 * v:.1f}%")], "tok_s")
PY
