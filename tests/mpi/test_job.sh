#!/usr/bin/env bash
# The job spec and the single-process run: --print-job, --dry-run, every kind of invalid job
# refused before any work with a message naming its field or file, and the tiny job trained as
# shipped until its loss is at most half of the first step's.
# Usage: bash tests/mpi/test_job.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train job=$build/jobs/tiny.pb
require "$train" "$job" "$build/data/tiny.h5"

# refused NAME MESSAGE ARGS...: qwen3-train ARGS fails, says MESSAGE, and starts no work
refused() {
  local name=$1 message=$2
  shift 2
  rm -rf "$work/out"
  timeout 60 "$train" "$@" --set output_dir="$work/out" >"$log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qF -- "$message" "$log" && [ ! -e "$work/out" ]; then
    pass "$name: refused with \"$message\""
  else
    result 0 "$name: exit $rc, expected a refusal naming \"$message\""
  fi
}

refused "heads not divisible by kv heads" "model.num_heads (4) must be a multiple of model.num_kv_heads (3)" \
  "$job" --set model.num_kv_heads=3
refused "odd head_dim" "model.head_dim must be even" "$job" --set model.head_dim=15
refused "seq_len 0" "data.seq_len must be > 0" "$job" --set data.seq_len=0
refused "more stages than layers" "parallel.pipeline_stages (3) is more than the model's 2 layers" \
  "$job" --set parallel.pipeline_stages=3
refused "stages not dividing the processes" "must divide the number of processes (1)" \
  "$job" --set model.num_layers=4 --set parallel.pipeline_stages=2
refused "missing data file" "data.train[0]: cannot read '/nonexistent/shard.h5'" \
  "$job" --set data.train=/nonexistent/shard.h5
refused "missing config file" "model.hf_config" "$job" --set model.hf_config=/nonexistent/config.json
refused "layers_per_stage not summing" "parallel.layers_per_stage sums to 3" \
  "$job" --set model.num_layers=4 --set parallel.pipeline_stages=2 --set parallel.layers_per_stage=1,2
refused "unknown field" "'qwen3.Optim' has no field 'learning_rate'" "$job" --set optim.learning_rate=1
refused "bad enum" "allowed values are GPIPE|ONE_F_ONE_B" "$job" --set parallel.schedule=ZERO_BUBBLE
refused "bad number" "expected a finite number" "$job" --set optim.lr=fast
refused "BF16 switch of a BF16 job" "precision.linear is not NVFP4, so there is nothing to switch" \
  "$job" --set precision.bf16_final_fraction=0.2
refused "BF16 switch past the end" "precision.bf16_final_fraction must be in [0, 1] (is 1.5)" \
  "$job" --set precision.linear=NVFP4 --set precision.bf16_final_fraction=1.5
refused "NVFP4 widths" "precision.linear NVFP4 needs model.hidden_size (72) to be a multiple of 16" \
  "$job" --set precision.linear=NVFP4 --set model.hidden_size=72
refused "nothing to evaluate" "neither data.valid nor eval.prompts" "$job" --set train.steps=0
head -c 25 "$job" >"$work/truncated.pb"
refused "truncated job" "truncated.pb: not a valid binary qwen3.Job" "$work/truncated.pb"
printf 'garbage\377\377\377\377' >"$work/garbage.pb"
refused "garbage job" "garbage.pb: not a valid binary qwen3.Job" "$work/garbage.pb"
refused "missing job" "/nonexistent.pb: cannot read the job file" /nonexistent.pb
# every problem of a job is listed, not just the first
timeout 60 "$train" "$job" --set model.num_kv_heads=3 --set data.seq_len=0 >"$log" 2>&1
n=$(grep -c "invalid job:" "$log")
[ "$n" -ge 2 ] && pass "all errors listed at once ($n)" || result 0 "expected 2 errors listed, got $n"

"$train" "$job" --print-job --set optim.lr=0.001 >"$log" 2>&1
grep -q "lr: 0.001" "$log" && grep -q "beta2: 0.95" "$log" && grep -q "schedule: ONE_F_ONE_B" "$log" \
  && pass "--print-job shows overrides and defaults" || result 0 "--print-job"
"$train" "$job" --dry-run --set model.num_layers=4 >"$log" 2>&1
grep -q "^0 .*0-3 .*MiB.*embedding final-norm lm-head loss" "$log" && grep -q "global batch: 16 sequences" "$log" \
  && pass "--dry-run prints the layout and memory" || result 0 "--dry-run"
# eval.prompts' generation: every prompt decodes together, so --dry-run counts the KV cache of all
# of them at the longest one's length, and the last stage's logits of a step (fp32 twice on the
# CPU): 3 prompts, the longest 9 ids, 1015 new tokens: 2 (K, V) x 2 layers x 3 x 1024 x 32 x 4
# bytes + 3 x 256 x 8 = 1.51 MiB
printf 'eval { prompts { ids: [1, 2, 3, 4, 5] } prompts { ids: [1, 2, 3, 4, 5, 6, 7, 8, 9] } prompts { ids: [7, 7] } max_new_tokens: 1015 }\n' |
  protoc --encode=qwen3.Job -Iproto proto/job.proto >"$work/prompts.pb" &&
  cat "$job" "$work/prompts.pb" >"$work/gen.pb"
"$train" "$work/gen.pb" --dry-run --set model.max_seq_len=4096 >"$log" 2>&1
want=$(awk 'BEGIN { printf "%.1f", (2 * 2 * 3 * 1024 * 32 * 4 + 3 * 256 * 8) / 1048576 }')
grep -q "generation (eval.prompts): 3 sequences of up to 1024 tokens (the longest prompt, 9 tokens.* $want MiB" "$log" \
  && pass "--dry-run counts generation's KV cache and logits ($want MiB)" \
  || result 0 "--dry-run generation memory: expected $want MiB, got: $(grep generation "$log")"
"$train" "$work/gen.pb" --dry-run --set model.max_seq_len=4096 --set eval.kv_cache=false >"$log" 2>&1
grep -q "generation (eval.prompts): 3 sequences of up to 1024 tokens, no KV cache" "$log" \
  && pass "--dry-run: no KV cache with eval.kv_cache false" \
  || result 0 "--dry-run generation without a KV cache: $(grep generation "$log")"
# a save stages the weights and both moments in fp32: 12 bytes per parameter of the stage
staging=$(awk '/^0 / { printf "%.1f", 12 * $5 / 1048576 }' "$log")
grep -q "checkpoint saves: .* up to $staging MiB, held from the start of the run" "$log" \
  && pass "--dry-run prints a save's host staging memory ($staging MiB), held from the start" \
  || result 0 "--dry-run staging"

# the tiny job as shipped: the loss falls to at most half of the first step's
abs=$(cd "$build" && pwd)   # the job's output_dir is relative: run it from the scratch dir
if (cd "$work" && timeout 600 $MPIRUN -np 1 "$abs/qwen3-train" "$abs/jobs/tiny.pb" \
      --set data.train="$abs/data/tiny.h5" >"$log" 2>&1); then
  first=$(grep -o '"loss":[^,}]*' "$work/out/tiny/metrics.jsonl" | head -n 1 | cut -d: -f2)
  last=$(grep -o '"loss":[^,}]*' "$work/out/tiny/metrics.jsonl" | tail -n 1 | cut -d: -f2)
  awk -v a="$first" -v b="$last" 'BEGIN { exit !(b <= a / 2) }' \
    && pass "tiny job: loss $first -> $last (at most half)" || result 0 "tiny job: loss $first -> $last"
else
  result 0 "the tiny job failed"
fi
# evaluation every eval.every steps during training: validation lines in metrics.jsonl
if timeout 300 "$train" "$job" --set train.steps=10 --set eval.every=5 --set train.log_every=1 \
    --set data.train="$build/data/tiny.h5" --set data.valid="$build/data/tiny.h5" \
    --set eval.valid_batches=2 --set output_dir="$work/ev" >"$log" 2>&1 &&
    [ "$(grep -c '"val_loss"' "$work/ev/metrics.jsonl")" = 2 ] &&
    grep -q '"step":5,"val_loss"' "$work/ev/metrics.jsonl"; then
  pass "eval.every=5: validation at steps 5 and 10"
else
  result 0 "eval.every during training"
fi
# ... each with its speed, in the log line and in metrics.jsonl
speeds=$(grep -o '"val_tokens_per_s":[0-9.e+]*' "$work/ev/metrics.jsonl" | cut -d: -f2)
if [ "$(echo "$speeds" | awk '$1 > 0' | wc -l)" = 2 ] &&
    [ "$(grep -c 'validation at step .* in [0-9.]* s, [0-9]* tok/s' "$log")" = 2 ]; then
  pass "validation speed: $(echo $speeds) tok/s in metrics.jsonl and the log"
else
  result 0 "validation speed: '$(echo $speeds)' in metrics.jsonl, $(grep -c 'validation at step' "$log") log lines"
fi
# long work shows where it is: with QWEN3_PROGRESS_SECONDS=0, every micro-batch of a validation
# but the last (3 micro-batches of 8 windows) and every round of a generation (8 tokens)
if QWEN3_PROGRESS_SECONDS=0 timeout 300 "$train" "$work/gen.pb" --set train.steps=0 \
    --set eval.max_new_tokens=8 --set data.train="$build/data/tiny.h5" \
    --set data.valid="$build/data/tiny.h5" --set eval.valid_batches=3 \
    --set output_dir="$work/progress" >"$log" 2>&1 &&
    [ "$(grep -c 'validation at step 0: \(8\|16\) of 24 windows, [0-9]* tok/s, eta' "$log")" = 2 ] &&
    [ "$(grep -c 'generation: [0-9]* tokens of 3 sequences ([0-9] finished), [0-9]* tok/s, at most' "$log")" -ge 7 ]; then
  pass "progress lines of a validation and a generation"
else
  result 0 "progress lines: $(grep -c 'validation at step 0: ' "$log") of validation, $(grep -c 'generation: ' "$log") of generation"
fi
QWEN3_PROGRESS_SECONDS=soon refused "bad QWEN3_PROGRESS_SECONDS" \
  "QWEN3_PROGRESS_SECONDS=soon: expected a number of seconds >= 0" "$job"
# ... and the evaluation leaves training alone: every step's loss as without it
train_losses() { grep -v val_loss "$1/metrics.jsonl" | grep -o '"loss":[^,}]*'; }
if timeout 300 "$train" "$job" --set train.steps=10 --set train.log_every=1 \
    --set data.train="$build/data/tiny.h5" --set output_dir="$work/ev0" >"$log" 2>&1 &&
    [ "$(train_losses "$work/ev0" | wc -l)" = 10 ] &&
    diff <(train_losses "$work/ev0") <(train_losses "$work/ev") >/dev/null; then
  pass "evaluation during training changes no step's training loss"
else
  result 0 "evaluation during training changed the training losses: $(paste -d' ' <(train_losses "$work/ev0") <(train_losses "$work/ev") | tr '\n' ' ')"
fi
finish
