#!/usr/bin/env bash
# Checkpoints of the tiny job under mpirun (2 pipeline stages): the files on disk (h5ls shows
# every tensor by its Hugging Face name, model.h5 links to them, keep_last), SIGTERM to the ranks
# and SIGUSR1 to mpirun (save at the step reached, exit 0, resume continues), SIGKILL at random
# moments with a checkpoint every step (the previous checkpoint always loads), a stop signal
# while a save is still being written (committed whole; resumes bit for bit), the staging buffer
# allocated ahead (the first save waits for it; a run that never saves joins it), a rank slow to
# write (the commit waits for it while training goes on), a stage file that cannot be written
# (the run fails naming it; `latest` stays), a stale .tmp directory, damage refused naming the
# file and tensor (a flipped byte, a truncated or missing stage file, another model shape), and
# init.checkpoint from qwen3-convert's output.
# Usage: bash tests/mpi/test_checkpoint.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train convert=$build/qwen3-convert job=$build/jobs/tiny.pb
data=$build/data/tiny.h5
require "$train" "$convert" "$job" "$data"
command -v h5ls >/dev/null || { echo "FAIL h5ls not found (hdf5-tools)"; echo "0 passed, 1 failed"; exit 1; }

tiny=(--set data.train="$data" --set train.log_every=1 --set parallel.pipeline_stages=2)

# run OUT [--set a=b ...]: the tiny job on 2 ranks (2 stages), output in $log, exit code in rc
run() {
  local out=$1
  shift
  timeout 120 $MPIRUN -np 2 "$train" "$job" "${tiny[@]}" --set output_dir="$out" "$@" >"$log" 2>&1
  rc=$?
}

# start OUT [--set ...]: the same in the background, for 3000 steps; its pid in job_pid
start() {
  local out=$1
  shift
  $MPIRUN -np 2 "$train" "$job" "${tiny[@]}" --set output_dir="$out" --set train.steps=3000 \
    "$@" >"$log" 2>&1 &
  job_pid=$!
}

# wait_steps OUT N: until OUT/metrics.jsonl has N steps (at most 60 s)
wait_steps() {
  for _ in $(seq 600); do
    [ "$(cat "$1/metrics.jsonl" 2>/dev/null | wc -l)" -ge "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

# ranks PID: the qwen3-train processes under the mpirun started as PID
ranks() {
  local p
  for p in $(pgrep -P "$1"); do
    [ "$(cat /proc/"$p"/comm 2>/dev/null)" = qwen3-train ] && echo "$p"
    ranks "$p"
  done
}

last_step() { tail -n 1 "$1/metrics.jsonl" | grep -o '"step":[0-9]*' | cut -d: -f2; }
first_step() { head -n 1 "$1/metrics.jsonl" | grep -o '"step":[0-9]*' | cut -d: -f2; }

# --- the files on disk --------------------------------------------------------------------
run "$work/a" --set train.steps=10 --set checkpoint.every=4 --set checkpoint.keep_last=2
ck=$work/a/checkpoints
ok=0
[ $rc = 0 ] && [ "$(readlink "$ck/latest")" = step_00000010 ] && [ -d "$ck/step_00000008" ] &&
  [ ! -e "$ck/step_00000004" ] && ok=1
result $ok "saves at steps 4, 8, 10; keep_last 2 keeps 8 and 10; latest -> step_00000010" \
  "exit $rc; $(ls "$ck" | tr '\n' ' ')"
h5ls -r "$ck/latest/model.h5" >"$log" 2>&1
ok=0
grep -q '^/model.layers.1.mlp.down_proj.weight *External Link {stage_001_of_002.h5//model.layers.1.mlp.down_proj.weight}' "$log" &&
  grep -q '^/model.embed_tokens.weight.adam_v *External Link {stage_000_of_002.h5//' "$log" &&
  [ "$(grep -c 'External Link' "$log")" = $((3 * 24)) ] && ok=1
result $ok "h5ls -r model.h5: 24 tensors x (weights, adam_m, adam_v) linked by name"
h5ls -r "$ck/latest/stage_001_of_002.h5" >"$log" 2>&1
ok=0
grep -q '^/model.norm.weight *Dataset {64}' "$log" &&
  grep -q '^/model.layers.1.self_attn.q_proj.weight.adam_m *Dataset {64, 64}' "$log" &&
  ! grep -q embed_tokens "$log" && ok=1
result $ok "h5ls -r stage 1: HF names and shapes; the tied embedding only in stage 0"
h5dump -A -g / "$ck/latest/model.h5" >"$log" 2>&1
ok=0
grep -A4 'ATTRIBUTE "step"' "$log" | grep -q '(0): 10' &&
  grep -A4 'ATTRIBUTE "samples_seen"' "$log" | grep -q '(0): 160' && ok=1
result $ok "model.h5 holds step 10 and samples_seen 160"

# --- signals: save at the step reached, exit 0, resume continues ----------------------------
for how in "TERM ranks" "USR1 mpirun"; do
  read -r sig target <<<"$how"
  out=$work/sig-$sig
  start "$out"
  ok=0
  if wait_steps "$out" 5; then
    if [ "$target" = ranks ]; then kill -"$sig" $(ranks "$job_pid"); else kill -"$sig" $(pgrep -P "$job_pid" -x mpirun || echo "$job_pid"); fi
  fi
  wait "$job_pid"
  rc=$?
  n=$(last_step "$out")
  [ $rc = 0 ] && grep -q "stopped by a signal after step $n; checkpoint saved" "$log" &&
    [ "$(readlink "$out/checkpoints/latest")" = "$(printf step_%08d "$n")" ] && ok=1
  result $ok "SIG$sig to the $target: exit 0 with a checkpoint of step ${n:-?}" "exit $rc"
  mv "$out/metrics.jsonl" "$out/first.jsonl"
  run "$out" --set train.steps=$((n + 3))
  ok=0
  [ $rc = 0 ] && [ "$(first_step "$out")" = $((n + 1)) ] && [ "$(last_step "$out")" = $((n + 3)) ] && ok=1
  result $ok "SIG$sig: the next run resumes at step $((n + 1))" "exit $rc"
done

# --- SIGKILL at any moment of a run that saves every step: latest always loads ---------------
for delay in 0.3 0.5 0.7; do
  out=$work/kill-$delay
  start "$out" --set checkpoint.every=1 --set checkpoint.keep_last=2
  wait_steps "$out" 3
  sleep "$delay"
  kill -KILL $(ranks "$job_pid") 2>/dev/null
  wait "$job_pid" 2>/dev/null
  # the newest whole step: `latest`, or one step on if the kill came inside its commit
  n=$(ls -d "$out"/checkpoints/step_???????? | while read -r d; do
        [ -e "$d/model.h5" ] && echo "${d##*step_}"; done | sort | tail -n 1 | sed 's/^0*//')
  run "$out" --set train.steps=$((n + 2)) --set checkpoint.every=1 --set checkpoint.keep_last=2
  ok=0
  [ $rc = 0 ] && grep -q "resuming from .*step_$(printf %08d "$n")" "$log" &&
    [ -z "$(ls -d "$out"/checkpoints/*.tmp 2>/dev/null)" ] && ok=1
  result $ok "SIGKILL after ${delay}s: resumes from the newest whole step ($n), stale .tmp removed" "exit $rc"
done

# --- the save in flight: a stop signal waits for it, saves, waits for that; resumes exactly ----
# checkpoint.every=1: the ranks' threads are still writing one step's files while the next step
# trains. SIGTERM must commit that save, save the step reached and commit it before exiting 0;
# a resumed run then logs the same losses, bit for bit, as a run that never stopped.
losses_after() {   # losses_after FILE STEP: "step loss" of the steps after STEP
  grep -o '"step":[0-9]*,"loss":[^,]*' "$1" | awk -F'[:,]' -v s="$2" '$2 > s {print $2, $4}'
}
out=$work/inflight
start "$out" --set checkpoint.every=1 --set checkpoint.keep_last=2
ok=0
wait_steps "$out" 4 && kill -TERM $(ranks "$job_pid")
wait "$job_pid"
rc=$?
n=$(last_step "$out")
[ $rc = 0 ] && [ "$(readlink "$out/checkpoints/latest")" = "$(printf step_%08d "$n")" ] &&
  [ -f "$out/checkpoints/$(printf step_%08d "$n")/stage_001_of_002.h5" ] &&
  [ -d "$out/checkpoints/$(printf step_%08d $((n - 1)))" ] &&
  [ -z "$(ls -d "$out"/checkpoints/*.tmp 2>/dev/null)" ] && ok=1
result $ok "SIGTERM with a save in flight: steps $((n - 1)) and $n committed, no .tmp left" "exit $rc"
mv "$out/metrics.jsonl" "$out/first.jsonl"
run "$out" --set train.steps=$((n + 3)) --set checkpoint.every=1 --set checkpoint.keep_last=2
rc_resumed=$rc
resumed=$(losses_after "$out/metrics.jsonl" "$n")
run "$work/straight" --set train.steps=$((n + 3)) --set checkpoint.every=-1
straight=$(losses_after "$work/straight/metrics.jsonl" "$n")
ok=0
[ $rc_resumed = 0 ] && [ $rc = 0 ] && [ "$(echo "$resumed" | wc -l)" = 3 ] &&
  [ "$resumed" = "$straight" ] && ok=1
result $ok "the save in flight at the signal resumes bit for bit (steps $((n + 1))-$((n + 3)))" \
  "exit $rc_resumed and $rc; resumed: $(echo $resumed); straight: $(echo $straight)"

# --- the staging buffer is allocated ahead, from the start of the run -------------------------
# QWEN3_CKPT_STAGING_DELAY=2: the thread that allocates it sleeps 2 s first, as pinning a large
# model's takes longer (about 20 s for Qwen3-4B). A save at step 1 waits for that thread (training
# pauses >= 1 s), takes its buffer rather than allocating another, and resumes bit for bit; each
# saving rank logs the buffer ready once. A run that has no step left to train (resumed at its
# last step) never saves: it waits for the thread at exit (its line still comes) and exits 0;
# only replica 0, which saves, allocates. A run that saves only on a stop signal
# (checkpoint.every -1) allocates nothing ahead.
ready='checkpoint: [0-9.]* MiB of host staging ready for saves (allocated in [0-9.]* s, in the background)'
out=$work/ahead
QWEN3_CKPT_STAGING_DELAY=2 run "$out" --set train.steps=3 --set checkpoint.every=1 \
  --set checkpoint.keep_last=0
paused=$(grep -o 'checkpoint: step 1 saved .*paused [0-9.]* s' "$log" | grep -o '[0-9.]* s$' |
  cut -d' ' -f1)
ok=0
[ $rc = 0 ] && [ "$(grep -c "rank 0/2\] $ready" "$log")" = 1 ] &&
  [ "$(grep -c "rank 1/2\] $ready" "$log")" = 1 ] && ! grep -q 'warning:.*staging' "$log" &&
  awk -v p="${paused:-0}" 'BEGIN { exit !(p >= 1) }' &&
  [ "$(readlink "$out/checkpoints/latest")" = step_00000003 ] && ok=1
result $ok "staging allocated ahead: logged once per saving rank, the save at step 1 waited for it (paused ${paused:-?} s)" \
  "exit $rc"
run "$work/ahead-resumed" --set train.steps=3 --set checkpoint.every=-1 \
  --set checkpoint.resume="$out/checkpoints/step_00000001"
ok=0
[ $rc = 0 ] && [ "$(losses_after "$out/metrics.jsonl" 1 | wc -l)" = 2 ] &&
  [ "$(losses_after "$out/metrics.jsonl" 1)" = "$(losses_after "$work/ahead-resumed/metrics.jsonl" 1)" ] &&
  ok=1
result $ok "the save at step 1 into the buffer allocated ahead resumes bit for bit (steps 2-3)" \
  "exit $rc"
QWEN3_CKPT_STAGING_DELAY=2 run "$work/ahead-nosave" --set train.steps=3 \
  --set checkpoint.resume="$out/checkpoints/step_00000003" --set parallel.pipeline_stages=1
ok=0
[ $rc = 0 ] && [ "$(grep -c "$ready" "$log")" = 1 ] && grep -q "rank 0/2\] $ready" "$log" &&
  [ -z "$(ls -d "$work/ahead-nosave/checkpoints/step_"* 2>/dev/null)" ] && ok=1
result $ok "a run with no step left (2 replicas): exit 0 once replica 0's allocation is joined" \
  "exit $rc"
QWEN3_CKPT_STAGING_DELAY=2 run "$work/ahead-signal-only" --set train.steps=2 \
  --set checkpoint.every=-1
ok=0
[ $rc = 0 ] && ! grep -q "$ready" "$log" && ok=1
result $ok "a run that saves only on a stop signal (checkpoint.every -1) allocates nothing ahead" \
  "exit $rc"

# --- one rank's disk is slow: the commit waits for it, training goes on meanwhile ------------
# Rank 1's writer sleeps 2 s before writing (QWEN3_CKPT_WRITE_DELAY in its environment alone).
# Rank 0's file is written at once, but step 20 may become `latest` only when rank 1's is synced
# too: the commit comes 2 s or more after the save began, the steps after 20 train meanwhile, and
# every save is committed whole.
out=$work/slow
timeout 120 $MPIRUN -np 2 bash -c \
  '[ "${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}" = 1 ] && export QWEN3_CKPT_WRITE_DELAY=2; exec "$@"' \
  _ "$train" "$job" "${tiny[@]}" --set output_dir="$out" --set train.steps=40 \
  --set checkpoint.every=20 >"$log" 2>&1
rc=$?
after=$(grep -o 'checkpoint: step 20 saved .*committed [0-9.]* s' "$log" | grep -o '[0-9.]* s$' |
  cut -d' ' -f1)
ok=0
[ $rc = 0 ] && [ "$(readlink "$out/checkpoints/latest")" = step_00000040 ] &&
  awk -v a="${after:-0}" 'BEGIN { exit !(a >= 2) }' &&
  grep -B1000 'checkpoint: step 20 saved' "$log" | grep -q 'step 2[1-9]/40' && ok=1
result $ok "a slow rank: step 20 committed ${after:-?} s after its save (>= 2), training on meanwhile" \
  "exit $rc"

# --- a write that fails on a writer thread: the run dies naming the file; `latest` stays -------
# The ranks run under a file size limit of 256 KiB with SIGXFSZ ignored, so that write() fails
# with EFBIG: model.h5, metrics and the lock fit, a stage file does not, and the ranks' threads
# find that out after checkpoint_save returned. (MPI over TCP here: Open MPI's shared-memory
# transport would size its own files beyond the limit.)
out=$work/full
run "$out" --set train.steps=2 --set checkpoint.every=2
OMPI_MCA_btl=self,tcp timeout 120 $MPIRUN -np 2 bash -c 'trap "" XFSZ; ulimit -f 256; exec "$@"' _ \
  "$train" "$job" "${tiny[@]}" --set output_dir="$out" --set train.steps=8 \
  --set checkpoint.every=5 >"$log" 2>&1
rc=$?
ok=0
[ $rc != 0 ] && [ $rc != 124 ] && [ "$(readlink "$out/checkpoints/latest")" = step_00000002 ] &&
  [ ! -e "$out/checkpoints/step_00000005" ] && ! grep -q "step 8/" "$log" &&
  grep -q "checkpoint: step 5 was not saved: $out/checkpoints/step_00000005.tmp/stage_00[01]_of_002.h5: cannot write tensor '.*File too large" "$log" &&
  ok=1
result $ok "a stage file that cannot be written: the run fails naming it, latest stays at step 2" \
  "exit $rc; latest -> $(readlink "$out/checkpoints/latest")"

# --- a stale .tmp directory is ignored, then removed ------------------------------------------
cp -r "$ck/step_00000010" "$ck/step_00000011.tmp"
rm "$ck/step_00000011.tmp/model.h5" "$ck/step_00000011.tmp/stage_001_of_002.h5"
run "$work/a" --set train.steps=12 --set checkpoint.every=4 --set checkpoint.keep_last=2
ok=0
[ $rc = 0 ] && grep -q "resuming from $ck/step_00000010" "$log" && [ ! -e "$ck/step_00000011.tmp" ] &&
  [ "$(readlink "$ck/latest")" = step_00000012 ] && ok=1
result $ok "a stale step_00000011.tmp: resume from latest (10), removed by the next save" "exit $rc"

# --- a run ended between its commit's rename and `latest`: AUTO continues from the newer step ---
ln -sfn step_00000010 "$ck/latest"   # as if the run had died right after renaming step 12 in
run "$work/a" --set train.steps=13 --set checkpoint.every=4 --set checkpoint.keep_last=2
ok=0
[ $rc = 0 ] && grep -q "step_00000012 is whole but \`latest\` does not name it" "$log" &&
  grep -q "resuming from $ck/step_00000012" "$log" && ok=1
result $ok "latest left at step 10 with step 12 whole: AUTO resumes from 12, saying so" "exit $rc"
# an evaluation run of init.checkpoint's weights names the step they were saved at
run "$work/eval12" --set train.steps=0 --set checkpoint.resume=NEVER \
  --set init.checkpoint="$ck/step_00000012" --set data.valid="$build/data/tiny.h5" \
  --set eval.valid_batches=2
ok=0
[ $rc = 0 ] && grep -q "evaluating tiny at step 12" "$log" &&
  grep -q '"step":12' "$work/eval12/metrics.jsonl" && ok=1
result $ok "an evaluation run of init.checkpoint step 12 logs step 12" "exit $rc"

# --- damage is refused, naming the file and the tensor ------------------------------------
# expect_refused NAME MESSAGE... [-- --set ...]: resuming a damaged copy fails with every MESSAGE
expect_refused() {
  local name=$1 ok=1 m
  shift
  local msgs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do msgs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  run "$work/bad" --set train.steps=14 --set checkpoint.resume="$bad" "$@"
  [ $rc != 0 ] && [ $rc != 124 ] || ok=0
  for m in "${msgs[@]}"; do grep -qF -- "$m" "$log" || ok=0; done
  result $ok "$name: refused" "exit $rc, expected: ${msgs[*]}"
}
fresh_copy() { rm -rf "$work/bad" "$work/bad-ck"; cp -r "$ck/step_00000012" "$work/bad-ck"; bad=$work/bad-ck; }

fresh_copy
f=$bad/stage_000_of_002.h5
# where the embedding's data starts in the file: its first 16 bytes, found by content
h5dump -d /model.embed_tokens.weight -b LE -o "$work/raw.bin" "$f" >/dev/null
at=$(LC_ALL=C grep -obUaP "$(od -An -tx1 -N16 "$work/raw.bin" | tr -d ' \n' | sed 's/../\\x&/g')" "$f" | head -n 1 | cut -d: -f1)
at=$((${at:-0} + 1000))
byte=$(od -An -tu1 -j "$at" -N1 "$f" | tr -d ' ')
printf "\\x$(printf %02x $((byte ^ 16)))" | dd of="$f" bs=1 seek="$at" conv=notrunc status=none
expect_refused "a flipped byte in the embedding" "stage_000_of_002.h5: tensor 'model.embed_tokens.weight' fails its checksum" "Fletcher32"

fresh_copy
truncate -s $(($(stat -c %s "$bad/stage_001_of_002.h5") / 2)) "$bad/stage_001_of_002.h5"
expect_refused "a truncated stage file" "stage_001_of_002.h5: cannot open, truncated or damaged (it holds tensor 'model.layers.1" "truncated file"

fresh_copy
rm "$bad/stage_000_of_002.h5"
expect_refused "a missing stage file" "stage_000_of_002.h5: missing (it holds tensor 'model.embed_tokens.weight')"

fresh_copy
# found before the model is built (trainer/job_validate.c), in checkpoint.c's words
expect_refused "another hidden size" "checkpoint.resume: $work/bad-ck/model.h5: a checkpoint of another model shape: its hidden_size is 64, the job's model has 128" -- --set model.hidden_size=128
expect_refused "more layers" "model.h5: a checkpoint of another model shape: its num_hidden_layers is 2, the job's model has 3" -- --set model.num_layers=3
expect_refused "fewer layers" "model.h5: a checkpoint of another model shape: its num_hidden_layers is 2, the job's model has 1" -- --set model.num_layers=1 --set parallel.pipeline_stages=1
expect_refused "no checkpoint there" "$work/nowhere: no such checkpoint directory" -- --set checkpoint.resume="$work/nowhere"

# tensors are read chunk by chunk as the writer stores them; a stage file laid out otherwise
# (h5repack: contiguous, no checksum) is read through HDF5 and gives the same next step
fresh_copy
run "$work/as-written" --set train.steps=13 --set checkpoint.resume="$bad" --set checkpoint.every=-1
a=$(grep -o '"step":13,"loss":[^,]*' "$work/as-written/metrics.jsonl")
for f in "$bad"/stage_*.h5; do h5repack -f NONE -l CONTI "$f" "$f.re" && mv "$f.re" "$f"; done
run "$work/repacked" --set train.steps=13 --set checkpoint.resume="$bad" --set checkpoint.every=-1
b=$(grep -o '"step":13,"loss":[^,]*' "$work/repacked/metrics.jsonl")
ok=0
[ $rc = 0 ] && [ -n "$a" ] && [ "$a" = "$b" ] && ok=1
result $ok "stage files repacked contiguous without checksums load alike (step 13: ${b:-none})" "exit $rc; $a"

# --- init.checkpoint from qwen3-convert's output ----------------------------------------------
ok=0
"$convert" h52hf "$ck" "$work/hf" --dtype fp32 >"$log" 2>&1 &&
  "$convert" hf2h5 "$work/hf" "$work/conv" >>"$log" 2>&1 && ok=1
result $ok "qwen3-convert h52hf then hf2h5 of the trained checkpoint"
run "$work/init" --set train.steps=2 --set init.checkpoint="$work/conv"
ok=0
# starting from step 12's weights, the first loss is near step 12's, far below a fresh start's
loss=$(head -n 1 "$work/init/metrics.jsonl" 2>/dev/null | grep -o '"loss":[0-9.]*' | cut -d: -f2)
[ $rc = 0 ] && awk -v l="${loss:-9}" 'BEGIN { exit !(l < 4) }' && ok=1
result $ok "init.checkpoint starts from the converted weights (first loss ${loss:-?})" "exit $rc"

finish
