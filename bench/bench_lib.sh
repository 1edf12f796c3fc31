# Sourced by the device scripts of bench/ (gpu_bench.sh, multi_gpu.sh, headline.sh) after they
# set TOTAL_S (seconds for the whole call) and RESERVE_S (kept back for the table and the logs):
# OUT and WORK made, RESULTS emptied and exported for the Python halves (GPU_BENCH_RESULTS), and
# the clock every part's budget comes from. BENCH_WORK names another WORK, for a second script
# running beside this one on another GPU of the machine (CUDA_VISIBLE_DEVICES).
OUT=${OUT:-/tmp/gpu_bench_out}
WORK=${BENCH_WORK:-/tmp/qwen3_bench}
RESULTS=$OUT/results.txt
export GPU_BENCH_RESULTS=$RESULTS
mkdir -p "$OUT" "$WORK"
: > "$RESULTS"
rm -f "$WORK/ctest_summary"   # gpu_label's, from an earlier call
start=$(date +%s)

# seconds left for parts (TOTAL_S less what has run and the reserve)
left() { echo $(( TOTAL_S - RESERVE_S - ($(date +%s) - start) )); }
# budget WANT MIN: WANT, or what is left when less; 0 when that is under MIN (the part is skipped)
budget() {
  local b=$1 l
  l=$(left)
  (( l < b )) && b=$l
  (( b < $2 )) && b=0
  echo "$b"
}
section() { echo; echo "== $1 (at $(( $(date +%s) - start )) s, $(left) s left)"; }
# within WANT CMD...: CMD under `timeout` for WANT seconds, or for what is left when that is at
# least a quarter of WANT; else it says the part is skipped (and returns 124, as a time-out)
within() {
  local b
  b=$(budget "$1" $(( $1 / 4 )))
  shift
  if [ "$b" = 0 ]; then echo "SKIPPED $1 (time)"; return 124; fi
  timeout -k 5 "$b" "$@"
}

# mark SYSTEM MB ACCUM STATUS: a table row for a training configuration at the script's T that
# printed no RESULT line
mark() {
  grep -q "^RESULT system=$1 mb=$2 T=$T accum=$3 " "$RESULTS" ||
    echo "RESULT system=$1 mb=$2 T=$T accum=$3 status=$4" >> "$RESULTS"
}

# gpu_label WANT: the `gpu` CTest label under `within WANT`, its log in $WORK/ctest.txt (tail
# printed) and its summary line, with how many tests skipped (a skipped test is not a pass), in
# $WORK/ctest_summary; gpu_label_summary prints that line, or "not run".
gpu_label() {
  (cd build && within "$1" ctest -L gpu --output-on-failure) > "$WORK/ctest.txt" 2>&1
  tail -n 30 "$WORK/ctest.txt"
  local line skipped
  line=$(grep -E "tests passed|tests failed" "$WORK/ctest.txt" | tail -n 1)
  skipped=$(grep -c '\*\*\*Skipped' "$WORK/ctest.txt")
  [ "$skipped" -gt 0 ] && line="$line ($skipped of them skipped)"
  echo "${line:-no summary line}" > "$WORK/ctest_summary"
}
gpu_label_summary() { cat "$WORK/ctest_summary" 2>/dev/null || echo "not run"; }

# build_and_check CTEST MUTATIONS: the build (bench/device_build.sh, whose exports stay) and the
# card's name; with CTEST 1 the `gpu` label, with MUTATIONS ("NAME ...", from
# tests/gpu/mutation_check_gpu.sh) those mutations, within MUTATIONS_S seconds (default 200).
# Returns 1 when the build failed.
build_and_check() {
  section "build"
  source bench/device_build.sh || true
  [ -x build/qwen3-train ] || { echo "build FAILED"; return 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ "${1:-0}" = 1 ]; then
    section "ctest -L gpu"
    gpu_label 300
  fi
  if [ -n "${2:-}" ]; then
    section "mutations: $2"
    # shellcheck disable=SC2086
    within "${MUTATIONS_S:-200}" bash tests/gpu/mutation_check_gpu.sh build $2
  fi
}

# token_shard: $WORK/random_2m.h5, the random tokens every 4B job names (an evaluation of
# prompts reads none, but the job must name a shard that exists)
token_shard() {
  section "token shard"
  timeout -k 5 60 python3 bench/ours_train_bench.py shard --out "$WORK/random_2m.h5"
}
