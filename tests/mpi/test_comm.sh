#!/usr/bin/env bash
# comm_mpi.c under mpirun: tests/mpi/comm_check.c in the layouts 2 stages x 2 replicas, 4 x 1 and
# 1 x 4, then the failures that must end the whole job: a rank that dies, a world the stages do
# not divide, GROUP_TIED without a pipeline, an error inside MPI, MPI_Abort's exit code, a rank
# that stops (every wait for a peer has a time-out); last a message over INT_MAX bytes. Usage: bash tests/mpi/test_comm.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
check=$build/tests/comm_check
require "$check"
mpi=($MPIRUN --allow-run-as-root)

# run LIMIT NP ARGS...: mpirun killed after LIMIT seconds; sets rc, secs and the output in $log
run() {
  local limit=$1 np=$2 start=$SECONDS
  shift 2
  timeout "$limit" "${mpi[@]}" -np "$np" "$check" "$@" >"$log" 2>&1
  rc=$? secs=$((SECONDS - start))
}

# the job must succeed and rank 0 report no failed check
expect_pass() {
  local name=$1
  shift
  run 300 "$@"
  local ok=0
  [ $rc = 0 ] && grep -q ' 0 failed$' "$log" && ok=1
  result $ok "$name (${secs}s)" "exit $rc"
}

# the job must fail within 30 s (timeout's own 124 means it hung) with `message` in its output
expect_abort() {
  local name=$1 message=$2
  shift 2
  run 60 "$@"
  local ok=0
  [ $rc != 0 ] && [ $rc != 124 ] && [ $secs -le 30 ] && grep -qF -- "$message" "$log" && ok=1
  result $ok "$name (exit $rc after ${secs}s)" "expected a non-zero exit within 30 s and '$message'"
}

# the job must end with exactly exit code `code` within 30 s: the code passed to MPI_Abort
expect_code() {
  local name=$1 code=$2
  shift 2
  run 60 "$@"
  local ok=0
  [ $rc = "$code" ] && [ $secs -le 30 ] && ok=1
  result $ok "$name (exit $rc after ${secs}s)" "expected exit $code within 30 s"
}

expect_pass "pp 2 x dp 2: layout, p2p, allreduce, broadcast, barrier" 4 2
expect_pass "pp 4 x dp 1: layout, p2p, allreduce, broadcast, barrier" 4 4
expect_pass "pp 1 x dp 4: layout, allreduce, broadcast, barrier" 4 1

expect_abort "die() on rank 3 ends every rank" "[rank 3/4] error: deliberate failure" 4 2 die 3
expect_abort "die() on rank 0 ends every rank" "[rank 0/4] error: deliberate failure" 4 4 die 0
# under mpirun a plain exit(1) would end the job too; these show that the abort path is MPI_Abort
expect_code "g_abort_hook(4) on rank 2 is MPI_Abort" 4 4 2 hook 2
expect_code "comm_abort(3) on rank 1 is MPI_Abort" 3 4 2 abort 1
expect_abort "world 4 not divisible by pp 3" "parallel.pipeline_stages = 3 does not divide the world size 4" 4 3
expect_abort "GROUP_TIED with pp 1" "GROUP_TIED needs parallel.pipeline_stages > 1" 2 1 tied
# an error inside MPI comes back (MPI_ERRORS_RETURN) and dies naming the call
expect_abort "MPI error names the call" "comm_recv: receive of 8 bytes from stage 0 (tag 0) failed" 2 2 truncate
# a stopped rank: the others give up after QWEN3_COMM_TIMEOUT_S, naming what they waited for
# (rank 0 waits in a receive, ranks 1 and 2 in a barrier: whichever gives up first ends the job)
QWEN3_COMM_TIMEOUT_S=3 expect_abort "a stopped rank ends the job after the time-out" \
  ": no answer within 3 s (QWEN3_COMM_TIMEOUT_S)" 4 4 stall
QWEN3_NCCL_TIMEOUT_S=5 expect_abort "QWEN3_NCCL_TIMEOUT_S is refused, naming its new name" \
  "renamed QWEN3_COMM_TIMEOUT_S" 2 2

# a message over INT_MAX bytes needs about 4.3 GB between the two ranks
avail_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)
if [ "${avail_kb:-0}" -ge $((8 * 1024 * 1024)) ]; then
  expect_pass "pp 2: one message of INT_MAX + 4099 bytes, sent in chunks" 2 2 large
else
  echo "SKIP message over INT_MAX bytes: less than 8 GiB of memory available"
fi

finish
