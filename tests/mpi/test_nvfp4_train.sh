#!/usr/bin/env bash
# The NVFP4 recipe in training: the tiny job (4 layers, all NVFP4) and the same job in high
# precision both learn, and NVFP4 stays close: its final loss within 0.15 of BF16's and its loss
# within 0.07 of BF16's on average over the 60 steps; NVFP4 on 1 process and on 2 pipeline stages
# agrees to 1e-5 relative at every step (its stochastic rounding is keyed by step, layer, tensor
# and micro-batch, not by rank).
#
# The bounds, measured with seeds 3 (used here), 1 and 2: the recipe's final gap 0.040 (0.074,
# 0.071), mean gap 0.032 (0.023, 0.033); with the Hadamard transform dropped from one Wgrad
# operand final 0.323 (0.088, 0.319), mean 0.157 (0.054, 0.141). Seed 3 separates the two by 2x
# on either side of both bounds; tests/unit/test_nvfp4_linear.c catches such a bug exactly.
# Usage: bash tests/mpi/test_nvfp4_train.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
out=$work

common=(--set model.num_layers=4 --set train.steps=60 --set train.log_every=1
        --set data.train="$build/data/tiny.h5" --set checkpoint.resume=NEVER
        --set checkpoint.every=1000000 --set precision.bf16_last_layers=0
        --set init.seed=3 --set data.seed=3)

# run NAME NP PRECISION [ARGS...]
run() {
  if timeout 600 $MPIRUN -np "$2" "$build/qwen3-train" "$build/jobs/tiny.pb" "${common[@]}" \
      --set precision.linear="$3" --set parallel.pipeline_stages="$2" "${@:4}" \
      --set output_dir="$out/$1" >"$out/$1.log" 2>&1; then
    pass "$1: ran on $2 process(es)"
  else
    fail "$1: failed"; tail -n 20 "$out/$1.log"
  fi
}
losses() { grep -o '"loss":[^,}]*' "$out/$1/metrics.jsonl" | cut -d: -f2; }

run bf16 1 BF16
run nvfp4 1 NVFP4
run nvfp4_pp2 2 NVFP4
# precision.bf16_final_fraction: the whole run (1) is the BF16 run; half of it (0.5) is the
# NVFP4 run for 30 steps, then leaves it
run nvfp4_final_all 1 NVFP4 --set precision.bf16_final_fraction=1
run nvfp4_final_half 1 NVFP4 --set precision.bf16_final_fraction=0.5
# the weights' amax from AdamW's parts (ops.h adamw_update) against the quantizer's own pass
QWEN3_NVFP4_WEIGHT_AMAX_PASS=1 run nvfp4_amax_pass 1 NVFP4
run nvfp4_1x16 1 NVFP4 --set precision.weight_2d=false --set train.steps=6
QWEN3_NVFP4_WEIGHT_AMAX_PASS=1 run nvfp4_1x16_amax_pass 1 NVFP4 --set precision.weight_2d=false \
  --set train.steps=6
# ZeRO-1 over 2 replicas: a shard may end inside a matrix, so the parts stay unused there
zero=(--set parallel.pipeline_stages=1 --set parallel.zero=1 --set train.steps=6)
run nvfp4_zero 2 NVFP4 "${zero[@]}"
QWEN3_NVFP4_WEIGHT_AMAX_PASS=1 run nvfp4_zero_amax_pass 2 NVFP4 "${zero[@]}"

for name in bf16 nvfp4; do
  first=$(losses $name | head -n 1) last=$(losses $name | tail -n 1)
  if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.7 * a) }'; then
    pass "$name learns: loss $first -> $last"
  else
    fail "$name does not learn: loss $first -> $last"
  fi
done
# how far NVFP4's loss is above BF16's: at the last step and on average over the 60 steps
verdict=$(paste <(losses bf16) <(losses nvfp4) | awk -v fb=0.15 -v mb=0.07 '
  { n++; d = $2 - $1; sum += d; final = d; rel = 100 * d / $1 }
  END { mean = n ? sum / n : 1e9
        ok = n == 60 && final <= fb && mean <= mb
        printf "%s final gap %+.4f (%+.2f%%, bound %g), mean gap %+.4f (bound %g) over %d steps",
               ok ? "ok" : "bad", final, rel, fb, mean, mb, n }')
case $verdict in
  ok*) pass "NVFP4 - BF16 loss:${verdict#ok}" ;;
  *) fail "NVFP4 - BF16 loss:${verdict#bad}" ;;
esac

if [ "$(losses nvfp4_final_all)" = "$(losses bf16)" ] && [ "$(losses bf16 | wc -l)" = 60 ]; then
  pass "NVFP4 with precision.bf16_final_fraction 1 trains exactly as BF16 (60 losses equal)"
else
  fail "NVFP4 with precision.bf16_final_fraction 1 differs from BF16"
fi
if [ "$(losses nvfp4_final_half | head -n 30)" = "$(losses nvfp4 | head -n 30)" ] &&
    [ "$(losses nvfp4_final_half | sed -n 31p)" != "$(losses nvfp4 | sed -n 31p)" ] &&
    grep -q "step 31: every linear in BF16 from here to step 60" "$out/nvfp4_final_half.log"; then
  pass "precision.bf16_final_fraction 0.5: steps 1-30 are the NVFP4 run's, BF16 from step 31 on"
else
  fail "precision.bf16_final_fraction 0.5: not NVFP4 for steps 1-30 and BF16 from 31"
fi
# The same tensor scales, so the same run: every loss and gradient norm equal to the 9 digits
# metrics.jsonl prints (one tensor scale off moves them far more), with the 16x16 weight recipe
# and with the 1x16 one (two quantizations a matrix from the same parts), from step 2 on using
# parts AdamW wrote (step 1 has none: its own pass); and under ZeRO-1, which keeps the pass.
trace() { grep -o '"loss":[^,}]*\|"grad_norm":[^,}]*' "$out/$1/metrics.jsonl"; }
for pair in "nvfp4 nvfp4_amax_pass 60" "nvfp4_1x16 nvfp4_1x16_amax_pass 6" \
    "nvfp4_zero nvfp4_zero_amax_pass 6"; do
  set -- $pair
  if [ "$(trace $1)" = "$(trace $2)" ] && [ "$(losses $1 | wc -l)" = "$3" ]; then
    pass "$1: the weights' amax from AdamW's parts gives its own pass's run ($3 steps equal)"
  else
    fail "$1: the weights' amax from AdamW's parts changes the run"
    paste <(trace $1) <(trace $2) | head -n 6
  fi
done
verdict=$(paste <(losses nvfp4) <(losses nvfp4_pp2) | awk '
  { n++; d = $1 - $2; if (d < 0) d = -d; r = d / $1; if (r > worst) worst = r }
  END { if (n != 60) print "steps " n; else if (worst > 1e-5) print "worst " worst; else print "ok " worst + 0 }')
case $verdict in
  ok*) pass "NVFP4 on 1 and 2 processes agree at all 60 steps (worst ${verdict#ok })" ;;
  *) fail "NVFP4 on 1 and 2 processes differ ($verdict)" ;;
esac

# a diverged run stops at the first non-finite gradient norm, before its update, naming the
# NVFP4 operand that met the non-finite value (its tensor scale is kept on the device)
timeout 120 $MPIRUN -np 1 "$build/qwen3-train" "$build/jobs/tiny.pb" "${common[@]}" \
  --set precision.linear=NVFP4 --set optim.lr=1e30 --set optim.warmup_steps=0 \
  --set output_dir="$out/diverged" >"$out/diverged.log" 2>&1
rc=$?
if [ "$rc" != 0 ] && grep -Eq "error: step [0-9]+: the gradient norm is nan; stopping: the NVFP4 quantization of model\.layers\.[0-9]+\.[a-z_]+\.[a-z_]+\.weight's [a-z (A-Za-z)]+ met a non-finite value" "$out/diverged.log"; then
  pass "a diverged NVFP4 run stops, naming the operand: $(grep -o 'step [0-9]*: the gradient.*' "$out/diverged.log" | head -n 1)"
else
  fail "a diverged NVFP4 run (exit $rc) did not stop with the operand named"; tail -n 5 "$out/diverged.log"
fi

# a way to look: the trained checkpoint's linear weights as NVFP4 codes and scales
if "$build/qwen3-nvfp4" quantize "$out/nvfp4/checkpoints" "$out/dump.h5" >"$log" 2>&1 &&
    grep -q "28 tensors quantized (16x16 blocks)" "$log" &&
    "$build/qwen3-nvfp4" show "$out/dump.h5" model.layers.3.mlp.down_proj.weight >"$log" 2>&1 &&
    grep -q "S_dec" "$log"; then
  pass "qwen3-nvfp4 quantizes the checkpoint's 28 linear weights and shows them"
else
  result 0 "qwen3-nvfp4 on the checkpoint"
fi

# Decoding from packed NVFP4 weights (a KV cache packs the layers' matrices; ops.h nvfp4_pack
# and nvfp4_gemv_packed), checked against eval.check_kv's full replay, which runs the GEMM on the
# same quantized values: the prefill of a 1-token prompt reads the packed weights (at most
# NVFP4_PACKED_DECODE_ROWS rows) and must give the replay's logits to fp32 rounding; the later
# steps quantize one token's activations where the replay quantizes the whole sequence's (a
# tensor scale of their own), so they differ by NVFP4 rounding (eval.kv_tolerance raised for
# that), and the greedy tokens must agree.
timeout 120 $MPIRUN -np 1 "$build/qwen3-train" "$build/jobs/tiny.pb" "${common[@]}" \
  --set precision.linear=NVFP4 --set train.steps=0 --set eval.prompts.ids=72 \
  --set eval.max_new_tokens=8 --set eval.temperature=0 --set eval.check_kv=true \
  --set eval.kv_tolerance=0.5 --set output_dir="$out/decode" >"$log" 2>&1
rc=$?
verdict=$(python3 - "$out/decode/eval.jsonl" <<'PY' 2>&1
import json, sys
r = json.loads(open(sys.argv[1]).readline())
d = r["kv_logit_diff_per_step"]
ok = len(d) == 8 and d[0] <= 1e-5 and r["kv_first_mismatch"] == -1
print(("ok" if ok else "bad") + f" prefill logits within {d[0]:.1e} of the replay's, later steps "
      f"up to {max(d[1:]):.3f}, first mismatch {r['kv_first_mismatch']}")
PY
)
if [ "$rc" = 0 ] && [ "${verdict%% *}" = ok ]; then
  pass "decoding from packed NVFP4 weights: ${verdict#ok }"
else
  fail "decoding from packed NVFP4 weights (exit $rc): $verdict"; tail -n 5 "$log"
fi

# The same for three prompts decoding together (1, 2 and 3 ids): each prefill and every decoding
# step of the three, at most NVFP4_PACKED_DECODE_ROWS token rows, reads the packed weights.
printf 'eval { prompts { ids: [72] } prompts { ids: [101, 7] } prompts { ids: [5, 9, 33] } }\n' |
  protoc --encode=qwen3.Job -Iproto proto/job.proto >"$out/three_prompts.pb" || fail "protoc"
cat "$build/jobs/tiny.pb" "$out/three_prompts.pb" >"$out/three.pb"
timeout 120 $MPIRUN -np 1 "$build/qwen3-train" "$out/three.pb" "${common[@]}" \
  --set precision.linear=NVFP4 --set train.steps=0 --set eval.max_new_tokens=8 \
  --set eval.temperature=0 --set eval.check_kv=true --set eval.kv_tolerance=0.5 \
  --set output_dir="$out/decode3" >"$log" 2>&1
rc=$?
verdict=$(python3 - "$out/decode3/eval.jsonl" <<'PY' 2>&1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "kv_logit_diff_per_step" in l]
ok = len(rows) == 3 and all(len(r["kv_logit_diff_per_step"]) == 8 and
                            r["kv_logit_diff_per_step"][0] <= 1e-5 and
                            r["kv_first_mismatch"] == -1 for r in rows)
print(("ok" if ok else "bad") + " prefill logits within " +
      ", ".join(f"{r['kv_logit_diff_per_step'][0]:.1e}" for r in rows) +
      f" of the replays', first mismatches {[r['kv_first_mismatch'] for r in rows]}")
PY
)
if [ "$rc" = 0 ] && [ "${verdict%% *}" = ok ]; then
  pass "three prompts decoding together from packed NVFP4 weights: ${verdict#ok }"
else
  fail "three prompts decoding together from packed NVFP4 weights (exit $rc): $verdict"
  tail -n 5 "$log"
fi

# the job reaches the plan: by default (eval.packed_nvfp4) a generation packs the NVFP4 layers'
# weights for decoding, and --dry-run counts them; eval.packed_nvfp4 false leaves them out (the
# check above passes on either path: it cannot tell them apart)
for packed in true false; do
  "$build/qwen3-train" "$build/jobs/tiny.pb" "${common[@]}" --set precision.linear=NVFP4 \
    --set train.steps=0 --set eval.prompts.ids=72,101 --set eval.max_new_tokens=8 \
    --set eval.packed_nvfp4=$packed --dry-run >"$log" 2>&1
  if grep -q "packed for decoding" "$log"; then got=true; else got=false; fi
  result "$([ $got = $packed ] && echo 1 || echo 0)" \
    "eval.packed_nvfp4 $packed: --dry-run $([ $packed = true ] && echo counts || echo "leaves out") packed weights" \
    "$(grep generation "$log")"
done

# the precision policy is visible before any work
if "$build/qwen3-train" "$build/jobs/tiny.pb" --set precision.linear=NVFP4 --print-job |
    grep -q "linear: NVFP4"; then
  pass "--print-job shows the precision policy"
else
  fail "--print-job does not show precision.linear"
fi

# A checkpoint records the first BF16 layers its run used as a number: the default (-1) is 1
# block at 8 layers (2 from 16 on), and a job stored without the field was written when the
# default was 0. A resumed run names a change of its NVFP4 layers against the checkpoint's; the
# same layers, written out or by default, say nothing.
eight() {   # NAME STEPS ARGS...
  timeout 120 $MPIRUN -np 1 "$build/qwen3-train" "$build/jobs/tiny.pb" "${common[@]}" \
    --set model.num_layers=8 --set precision.linear=NVFP4 --set train.steps="$2" "${@:3}" \
    --set output_dir="$out/$1" >"$out/$1.log" 2>&1
}
from=(--set checkpoint.resume="$out/eight/checkpoints/step_00000002")
prompt=(--set eval.prompts.ids=72 --set eval.max_new_tokens=2)   # what an evaluation evaluates
changed="was trained with NVFP4 linears in layers \[1, 8) of 8 (precision.bf16_first_layers 1, bf16_last_layers 0); this job trains NVFP4 linears in layers \[0, 8) of 8 (precision.bf16_first_layers 0, bf16_last_layers 0): the resumed run's linears change precision"
evaluated="was trained with NVFP4 linears in layers \[1, 8) of 8 (precision.bf16_first_layers 1, bf16_last_layers 0); this job evaluates with NVFP4 linears in layers \[0, 8) of 8 (precision.bf16_first_layers 0, bf16_last_layers 0): its linears run in another precision than they trained in"
if eight eight 2 && eight resume_default 3 "${from[@]}" && eight resume_one 3 "${from[@]}" \
      --set precision.bf16_first_layers=1 && eight resume_zero 3 "${from[@]}" \
      --set precision.bf16_first_layers=0 && eight eval_default 0 "${from[@]}" "${prompt[@]}" &&
    eight eval_zero 0 "${from[@]}" "${prompt[@]}" --set precision.bf16_first_layers=0 &&
    ! grep -q "another precision\|change precision" "$out/resume_default.log" \
      "$out/resume_one.log" "$out/eval_default.log" &&
    grep -q "$changed" "$out/resume_zero.log" && grep -q "$evaluated" "$out/eval_zero.log"; then
  pass "8 layers: the checkpoint records 1 first BF16 layer by default; resuming or evaluating with 0 says so"
else
  fail "8 layers: the first BF16 layers are not recorded, or a change is not named"
  tail -n 3 "$out"/eight.log "$out"/resume_*.log "$out"/eval_*.log
fi
finish
