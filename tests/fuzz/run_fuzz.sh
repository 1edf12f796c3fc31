#!/usr/bin/env bash
# ctest -L fuzz: runs one libFuzzer target for a short time, starting from its committed seed
# corpus (tests/fuzz/corpus/<target>/, every seed is run first). New inputs go to a scratch
# directory, never into the repository; a crash, sanitizer report, leak, time-out (10 s per input)
# or memory blow-up (2 GB) fails the test, and the input that did it is kept as
# <build>/fuzz/artifacts/<target>-crash-... for `<target> <that file>` to replay.
#   run_fuzz.sh TARGET_BINARY CORPUS_DIR SECONDS ARTIFACT_DIR [libFuzzer flags...]
set -euo pipefail
bin=$1 corpus=$2 seconds=$3 artifacts=$4
shift 4
name=$(basename "$bin")
mkdir -p "$artifacts"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/qwen3-$name-XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$(dirname "$0")/lsan.supp:print_suppressions=0}
# -close_fd_mask=1: the targets' stdout chatter is dropped; reports still go to stderr
set +e
"$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
  -print_final_stats=1 -close_fd_mask=1 -artifact_prefix="$artifacts/$name-" "$@" \
  "$scratch" "$corpus" > "$scratch/../$(basename "$scratch").log" 2>&1
status=$?
set -e
log="$scratch/../$(basename "$scratch").log"
grep -v '^#[0-9]' "$log" | grep -v '^qwen3: error' | tail -n 80
rm -f "$log"
if [ "$status" -ne 0 ]; then
  echo "FAIL: $name exited $status; the input that did it is in $artifacts/"
  exit 1
fi
echo "$name: no crash, sanitizer report or leak in ${seconds}s"
