#!/usr/bin/env bash
# Hostile and broken input (issue 10, part 2): every bad value, file and situation is refused
# before any work with a message naming the field or file and what is allowed, exits non-zero
# without hanging and, for an invalid job, without Open MPI's MPI_ABORT banner; the run's
# outputs are never silently empty, checkpoint.dir is locked and never overwritten unasked, and
# stop signals checkpoint at the next step boundary with nothing lost.
# Usage: bash tests/mpi/test_hostile.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train job=$build/jobs/tiny.pb data=$build/data/tiny.h5
require "$train" "$job" "$data"
T=30   # seconds any one refusal may take

# refused NAME NP MESSAGE ARGS...: qwen3-train ARGS on NP processes (mpirun) fails quickly with
# MESSAGE, no MPI_ABORT banner, and creates no output_dir
refused() {
  local name=$1 np=$2 message=$3
  shift 3
  rm -rf "$work/out"
  local launch=($MPIRUN -np "$np")
  [ "$np" = 1 ] && launch=()   # one process: a singleton, without mpirun's start-up
  timeout $T "${launch[@]}" "$train" "$@" --set output_dir="$work/out" >"$log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ]; then
    result 0 "$name: hung (killed after ${T}s)"
  elif [ $rc -ne 0 ] && grep -qF -- "$message" "$log" && ! grep -q "MPI_ABORT" "$log" &&
       [ ! -e "$work/out" ]; then
    pass "$name: exit $rc, \"$message\""
  else
    result 0 "$name: exit $rc, expected a refusal naming \"$message\" without MPI_ABORT"
  fi
}
base=(--set data.train="$data")

# ---- invalid jobs: every rank exits 1, no banner ------------------------------------------------
refused "2 ranks, invalid job" 2 "model.num_heads (4) must be a multiple of model.num_kv_heads (3)" \
  "$job" "${base[@]}" --set model.num_kv_heads=3
refused "2 ranks, unknown option" 2 "unknown or incomplete option '--frobnicate'" "$job" --frobnicate
refused "2 ranks, bad --set" 2 "allowed values are GPIPE|ONE_F_ONE_B" "$job" --set parallel.schedule=X
refused "job is /dev/zero" 2 "/dev/zero: not a job file" /dev/zero

# ---- counts: overflow-safe, with stated upper limits ------------------------------------------------
refused "max_new_tokens INT_MAX" 1 "eval.max_new_tokens must be in [0, 1048576] (is 2147483647)" \
  "$job" "${base[@]}" --set eval.prompts.ids=1,2,3 --set eval.max_new_tokens=2147483647
refused "max_new_tokens beyond max_seq_len" 1 "eval.max_new_tokens must be in [0, model.max_seq_len - 1 = 63] (is 64)" \
  "$job" "${base[@]}" --set eval.prompts.ids=1,2,3
refused "prompt + max_new_tokens" 1 "eval.prompts[0]: 3 prompt ids + eval.max_new_tokens 62 is more than model.max_seq_len 64" \
  "$job" "${base[@]}" --set eval.prompts.ids=1,2,3 --set eval.max_new_tokens=62
refused "layers_per_stage wrapping" 3 "parallel.layers_per_stage[0] is 2147483647; each stage holds between 1 and the model's 3 layers" \
  "$job" "${base[@]}" --set model.num_layers=3 --set parallel.pipeline_stages=3 \
  --set parallel.layers_per_stage=2147483647,2147483647,5
refused "layers_per_stage wrapping, --dry-run" 3 "parallel.layers_per_stage[0] is 2147483647" \
  "$job" "${base[@]}" --dry-run --set model.num_layers=3 --set parallel.pipeline_stages=3 \
  --set parallel.layers_per_stage=2147483647,2147483647,5
refused "micro-batch tokens" 1 "data.micro_batch_size x data.seq_len is 137438953408 tokens; at most 16777216" \
  "$job" "${base[@]}" --set data.micro_batch_size=2147483647
refused "train.steps INT_MAX" 1 "train.steps must be in [0, 1000000000]" "$job" "${base[@]}" --set train.steps=2147483647
refused "hidden_size INT_MAX" 1 "model.hidden_size must be in [1, 65536] (is 2147483647)" \
  "$job" "${base[@]}" --set model.hidden_size=2147483647
refused "micro_batches" 1 "parallel.micro_batches must be in [1, 65536]" "$job" "${base[@]}" --set parallel.micro_batches=100000000

# ---- ranges: probabilities, tolerances, ids; NaN and unnamed enums in a binary job ----------------
refused "top_p" 1 "eval.top_p must be in (0, 1] (is 1.5)" "$job" "${base[@]}" --set eval.top_p=1.5
refused "top_k past the vocabulary" 1 "eval.top_k must be in [0, model.vocab_size = 256]" "$job" "${base[@]}" --set eval.top_k=1000
refused "kv_tolerance" 1 "eval.kv_tolerance must be >= 0 (is -1)" "$job" "${base[@]}" --set eval.kv_tolerance=-1
refused "beta2 = 1" 1 "optim.beta2 must be in [0, 1) (is 1)" "$job" "${base[@]}" --set optim.beta2=1
refused "stop id outside the vocabulary" 1 "eval.stop_ids[1] = 256 is outside the vocabulary [0, 256)" \
  "$job" "${base[@]}" --set eval.stop_ids=3,256
refused "--set inf" 1 "expected a finite number" "$job" "${base[@]}" --set optim.lr=inf
# optim { lr: NaN } appended to the binary job (field 10, field 1 as a fixed64 double)
{ cat "$job"; printf '\x52\x09\x09\x00\x00\x00\x00\x00\x00\xf8\x7f'; } >"$work/nan.pb"
refused "NaN in a .pb" 2 "optim.lr is nan; only finite numbers are allowed" "$work/nan.pb" "${base[@]}"
# parallel { schedule: 9 } and backend: 7, numbers the enums do not name
{ cat "$job"; printf '\x3a\x02\x18\x09\x18\x07'; } >"$work/enum.pb"
refused "unnamed enum values in a .pb" 1 "parallel.schedule is 9, which names no value; allowed values are GPIPE|ONE_F_ONE_B" \
  "$work/enum.pb" "${base[@]}"
grep -qF "backend is 7, which names no value; allowed values are AUTO|CPU|CUDA" "$log" \
  && pass "  ... and backend 7 listed too" || result 0 "backend 7 not listed"

# ---- input files: opened with the run's own readers before any work --------------------------------
echo '{"model": {"type": "BPE", "vocab": ' >"$work/bad_tokenizer.json"
refused "malformed tokenizer" 2 "tokenizer: " "$job" "${base[@]}" --set tokenizer="$work/bad_tokenizer.json"
grep -qF "bad_tokenizer.json" "$log" && ! grep -q "step " "$log" \
  && pass "  ... named, before the first step" || result 0 "malformed tokenizer not named before training"
refused "tokenizer is a directory" 1 "tokenizer: '$work' is not a regular file" "$job" "${base[@]}" --set tokenizer="$work"
printf 'garbage' >"$work/garbage.h5"
refused "garbage training shard" 2 "data.train[0]: $work/garbage.h5" "$job" --set data.train="$work/garbage.h5"
refused "garbage validation shard, found before training" 1 "data.valid[0]: $work/garbage.h5" \
  "$job" "${base[@]}" --set data.valid="$work/garbage.h5"
# 80 documents of one token: windows of the stream, but nothing to pack (no target in a document)
seq 1 80 | "$build/qwen3-prep" build --format ids --vocab-size 256 --quiet --out "$work/ones.h5" -
refused "data.pack without a document of 2 tokens" 1 "data.train[0]: $work/ones.h5 holds no document of 2 tokens or more: data.pack has nothing to train on" \
  "$job" --set data.train="$work/ones.h5" --set data.pack=true
fix=tests/fixtures/hf/gqa6_untied_hd8
mkdir -p "$work/hf_other" && sed 's/"rope_theta": 100000.0/"rope_theta": 500000.0/' "$fix/config.json" >"$work/hf_other/config.json"
refused "init.hf_dir config.json vs the job" 1 "init.hf_dir: $work/hf_other/config.json says rope_theta 500000, but the job's model.rope_theta is 100000" \
  "$build/jobs/eval_hf.pb" --set model.hf_config="$fix/config.json" --set init.hf_dir="$work/hf_other" \
  --set data.valid="$data"
refused "init.hf_dir without tensors" 1 "init.hf_dir: " "$build/jobs/eval_hf.pb" --set model.hf_config="$work/hf_other/config.json" \
  --set init.hf_dir="$work/hf_other" --set data.valid="$data"
echo '{"hidden_size": ' >"$work/hf_bad.json"
refused "malformed hf_config" 1 "model.hf_config: $work/hf_bad.json" "$job" "${base[@]}" --set model.hf_config="$work/hf_bad.json"
refused "resume from a missing checkpoint" 1 "checkpoint.resume: /nonexistent/ck: no such checkpoint directory" \
  "$job" "${base[@]}" --set checkpoint.resume=/nonexistent/ck

# ---- checkpoint.dir: writable, locked, never overwritten unasked ------------------------------------
short=(--set train.steps=3 --set train.log_every=1)
: >"$work/afile"
rm -rf "$work/o"
timeout $T "$train" "$job" "${base[@]}" "${short[@]}" --set output_dir="$work/o" \
  --set checkpoint.dir="$work/afile/ck" >"$log" 2>&1
rc=$?
[ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qF "checkpoint.dir: cannot create '$work/afile/ck'" "$log" &&
  ! grep -q "step 1/" "$log" && ! grep -q MPI_ABORT "$log" \
  && pass "unwritable checkpoint.dir refused before training" || result 0 "unwritable checkpoint.dir (exit $rc)"
if mkdir -p "$work/ro" && mount -t tmpfs -o ro,size=64k tmpfs "$work/ro" 2>/dev/null; then
  rm -rf "$work/o"
  timeout $T "$train" "$job" "${base[@]}" "${short[@]}" --set output_dir="$work/o" \
    --set checkpoint.dir="$work/ro" >"$log" 2>&1
  rc=$?
  umount "$work/ro"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qF "checkpoint.dir: '$work/ro' is not writable" "$log" \
    && ! grep -q "step 1/" "$log" && pass "read-only checkpoint.dir refused before training" \
    || result 0 "read-only checkpoint.dir (exit $rc)"
else
  echo "SKIP read-only checkpoint.dir: cannot mount a tmpfs here"
fi

ck=$work/ck
run_short() {   # run_short OUT ARGS...: the tiny job for 3 steps into checkpoint dir $ck
  local out=$1
  shift
  timeout 60 "$train" "$job" "${base[@]}" "${short[@]}" --set output_dir="$out" \
    --set checkpoint.dir="$ck" "$@" >"$log" 2>&1
}
run_short "$work/a" && [ -d "$ck/step_00000003" ] && pass "a 3-step run saves step 3" || result 0 "3-step run"
run_short "$work/b" --set train.steps=5 && [ -d "$ck/step_00000005" ] && pass "resume AUTO continues to step 5" \
  || result 0 "resume to step 5"
stamp=$(stat -c %Y.%s "$ck/step_00000003/model.h5")
run_short "$work/c" --set checkpoint.resume=NEVER
rc=$?
[ $rc -ne 0 ] && grep -qF "checkpoint.dir: '$ck' already holds step 5, and this run starts after step 0 (checkpoint.resume NEVER)" "$log" &&
  grep -qF "checkpoint.overwrite: true" "$log" && [ "$(stat -c %Y.%s "$ck/step_00000003/model.h5")" = "$stamp" ] &&
  [ "$(readlink "$ck/latest")" = step_00000005 ] \
  && pass "resume NEVER over existing steps refused, steps untouched" || result 0 "resume NEVER (exit $rc)"
run_short "$work/d" --set checkpoint.resume="$ck/step_00000003"
rc=$?
[ $rc -ne 0 ] && grep -qF "already holds step 5, and this run starts after step 3" "$log" &&
  [ "$(readlink "$ck/latest")" = step_00000005 ] \
  && pass "resuming an older step refused (latest not moved back)" || result 0 "older resume (exit $rc)"
run_short "$work/e" --set checkpoint.resume=NEVER --set checkpoint.overwrite=true
rc=$?
[ $rc -eq 0 ] && [ "$(readlink "$ck/latest")" = step_00000003 ] && [ ! -e "$ck/step_00000005" ] \
  && pass "checkpoint.overwrite: true starts over (step 5 of the old run removed)" || result 0 "overwrite (exit $rc)"

# the lock: a second run in the same checkpoint.dir refuses naming the first (pid, host)
long=(--set train.steps=100000 --set train.log_every=1 --set checkpoint.every=-1)
timeout 60 $MPIRUN -np 2 "$train" "$job" "${base[@]}" "${long[@]}" --set output_dir="$work/l1" \
  --set checkpoint.dir="$work/lk" >"$work/l1.log" 2>&1 &
first=$!
for _ in $(seq 100); do grep -q "step *2/" "$work/l1.log" 2>/dev/null && break; sleep 0.1; done
timeout $T "$train" "$job" "${base[@]}" "${short[@]}" --set output_dir="$work/l2" \
  --set checkpoint.dir="$work/lk" >"$log" 2>&1
rc=$?
holder=$(cat "$work/lk/.lock" 2>/dev/null)
[ $rc -ne 0 ] && grep -qF "checkpoint.dir: '$work/lk' is in use by another run ($holder" "$log" &&
  grep -q "^pid [0-9]* on host " "$work/lk/.lock" && ! grep -q MPI_ABORT "$log" \
  && pass "second run in a locked checkpoint.dir refused naming the holder ($holder)" \
  || result 0 "lock (exit $rc, holder '$holder')"

mpirun_of() { pgrep -P "$1" -x mpirun; }   # the mpirun under a `timeout ... &`

# ---- stop signals: checkpoint at the next step boundary, nothing lost -----------------------------
# last_step OUT: the last step in OUT/metrics.jsonl; saved_step CK: the step `latest` names
last_step() { grep -o '"step":[0-9]*' "$1/metrics.jsonl" | tail -n 1 | cut -d: -f2; }
saved_step() { readlink "$1/latest" | sed 's/step_0*//'; }
stopped() {   # stopped NAME PID LOG OUT CK EXPECTED_RC: wait, then check what was kept
  local name=$1 pid=$2 lg=$3 out=$4 ckd=$5 want=$6
  wait "$pid"
  local rc=$?
  local last saved
  last=$(last_step "$out") saved=$(saved_step "$ckd")
  if [ "$rc" = "$want" ] && grep -q "stopped by a signal" "$lg" && [ -n "$saved" ] && [ "$last" = "$saved" ]; then
    pass "$name: exit $rc, checkpoint at step $saved = the last logged step"
  else
    cp "$lg" "$log"
    result 0 "$name: exit $rc (want $want), last logged step '$last', saved '$saved'"
  fi
}
kill -USR1 "$(mpirun_of $first)"
stopped "SIGUSR1 to mpirun" "$first" "$work/l1.log" "$work/l1" "$work/lk" 0

start_long() {   # start_long NAME: the 2-rank job in the background; sets $pid once step 2 is out
  timeout 60 $MPIRUN -np 2 "$train" "$job" "${base[@]}" "${long[@]}" --set output_dir="$work/$1" \
    --set checkpoint.dir="$work/$1/ck" >"$work/$1.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q "step *2/" "$work/$1.log" 2>/dev/null && break; sleep 0.1; done
}
start_long u2
kill -USR2 "$(mpirun_of $pid)"
stopped "SIGUSR2 to mpirun" "$pid" "$work/u2.log" "$work/u2" "$work/u2/ck" 0
start_long t1
kill -TERM $(pgrep -P "$(mpirun_of $pid)" -x qwen3-train)
stopped "SIGTERM to the ranks" "$pid" "$work/t1.log" "$work/t1" "$work/t1/ck" 0
# SIGTERM to mpirun: Open MPI 4.1 sends the ranks SIGTERM (SIGKILL 1 s later) and exits 1 itself
start_long t2
kill -TERM "$(mpirun_of $pid)"
stopped "SIGTERM to mpirun (Open MPI: mpirun exits 1, the ranks save)" "$pid" "$work/t2.log" "$work/t2" "$work/t2/ck" 1

# ---- a full disk: refused before work, or the run stops naming the file ---------------------------
if mkdir -p "$work/full" && mount -t tmpfs -o size=64k tmpfs "$work/full" 2>/dev/null; then
  mkdir -p "$work/full/out"
  dd if=/dev/zero of="$work/full/fill" bs=4k count=64 2>/dev/null
  timeout $T "$train" "$job" "${base[@]}" "${short[@]}" --set output_dir="$work/full/out" >"$log" 2>&1
  rc=$?
  umount "$work/full"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qF "output_dir: '$work/full/out' is not writable (full disk?)" "$log" &&
    ! grep -q "step 1/" "$log" && pass "full output_dir refused before training" || result 0 "full tmpfs (exit $rc)"
else
  echo "SKIP full tmpfs: cannot mount a tmpfs here (the /dev/full cases below still run)"
fi
devfull() {   # devfull NAME FILE ARGS...: FILE in output_dir is /dev/full; the run stops naming it
  local name=$1 file=$2
  shift 2
  rm -rf "$work/df"
  mkdir -p "$work/df"
  ln -s /dev/full "$work/df/$file"
  timeout $T "$train" "$job" "${base[@]}" --set output_dir="$work/df" "$@" >"$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qF "output_dir: cannot write '$work/df/$file': No space left on device" "$log" \
    && pass "$name: exit $rc naming $file" || result 0 "$name: exit $rc"
}
devfull "full disk under metrics.jsonl" metrics.jsonl "${short[@]}" --set checkpoint.every=-1
devfull "full disk under scores.jsonl" scores.jsonl --set train.steps=0 --set data.valid="$data" \
  --set eval.valid_batches=1 --set checkpoint.resume=NEVER
# the console log is an output too: a full standard output fails the run, saying so on stderr
rm -rf "$work/df"
timeout $T "$train" "$job" "${base[@]}" "${short[@]}" --set output_dir="$work/df" \
  --set checkpoint.every=-1 >/dev/full 2>"$log"
rc=$?
[ $rc -eq 1 ] && grep -qF "the console log (standard output) is incomplete: a write of it failed (No space left on device)" "$log" \
  && pass "full standard output: exit 1 naming the console log" || result 0 "full standard output: exit $rc"
devfull "full disk under eval.jsonl" eval.jsonl --set train.steps=0 --set eval.prompts.ids=1,2,3 \
  --set eval.max_new_tokens=4 --set checkpoint.resume=NEVER
finish
