# Sourced by every tests/mpi/test_*.sh (run as `bash SCRIPT BUILD_DIR` from the repository root):
# the build directory, MPI allowed as root and oversubscribed, one thread per rank (a run is
# bit-reproducible only with the same thread counts), a scratch directory removed at exit, and
# the PASS/FAIL lines with the closing "N passed, M failed" that CI reads.
build=${1:?usage: bash $0 BUILD_DIR}
source scripts/env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
work=$(mktemp -d)
log=$work/log
trap 'rm -rf "$work"' EXIT
passed=0 failed=0

result() {   # result OK NAME [DETAIL]: one PASS/FAIL line; on failure the end of $log too
  if [ "$1" = 1 ]; then
    echo "PASS $2"
    passed=$((passed + 1))
  else
    echo "FAIL $2${3:+: $3}"
    [ -s "$log" ] && sed 's/^/    /' "$log" | tail -n 20
    failed=$((failed + 1))
  fi
}
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }

require() {   # require FILE...: stop at once when the build lacks one
  for f in "$@"; do
    [ -e "$f" ] || { echo "FAIL $f not built"; echo "0 passed, 1 failed"; exit 1; }
  done
}

# require_gpus N NAME: skipped (exit 77, saying why) unless this is a CUDA build and at least N
# GPUs are visible; sets gpus to their number
require_gpus() {
  if ! grep -q '^CMAKE_CUDA_COMPILER:[A-Z]*=/' "$build/CMakeCache.txt" 2>/dev/null; then
    echo "$2: this build has no CUDA backend; skipped"; exit 77
  fi
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  # CUDA_VISIBLE_DEVICES narrows what a rank can use (a job beside another on the machine)
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    local visible
    visible=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
    [ "$visible" -lt "$gpus" ] && gpus=$visible
  fi
  if [ "$gpus" -lt "$1" ]; then echo "$2: $gpus GPU(s), needs $1; skipped"; exit 77; fi
}

finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
