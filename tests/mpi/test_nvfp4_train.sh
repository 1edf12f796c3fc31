#!/usr/bin/env bash
# The NVFP4 recipe in training: the tiny job (4 layers, all NVFP4) and the same job in high
# precision both learn; the gap between their final losses is reported; NVFP4 on 1 process and
# on 2 pipeline stages agrees to 1e-5 relative at every step (its stochastic rounding is keyed by
# step, layer, tensor and micro-batch, not by rank).
# Usage: bash tests/mpi/test_nvfp4_train.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
out=$work

common=(--set model.num_layers=4 --set train.steps=60 --set train.log_every=1
        --set data.train="$build/data/tiny.h5" --set checkpoint.resume=NEVER
        --set checkpoint.every=1000000 --set precision.bf16_last_layers=0)

# run NAME NP PRECISION
run() {
  if timeout 600 $MPIRUN -np "$2" "$build/qwen3-train" "$build/jobs/tiny.pb" "${common[@]}" \
      --set precision.linear="$3" --set parallel.pipeline_stages="$2" \
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

for name in bf16 nvfp4; do
  first=$(losses $name | head -n 1) last=$(losses $name | tail -n 1)
  if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.7 * a) }'; then
    pass "$name learns: loss $first -> $last"
  else
    fail "$name does not learn: loss $first -> $last"
  fi
done
echo "final loss gap NVFP4 - BF16: $(awk -v a="$(losses nvfp4 | tail -n 1)" -v b="$(losses bf16 | tail -n 1)" \
  'BEGIN { printf "%+.4f (%+.2f%%)", a - b, 100 * (a - b) / b }')"

verdict=$(paste <(losses nvfp4) <(losses nvfp4_pp2) | awk '
  { n++; d = $1 - $2; if (d < 0) d = -d; r = d / $1; if (r > worst) worst = r }
  END { if (n != 60) print "steps " n; else if (worst > 1e-5) print "worst " worst; else print "ok " worst + 0 }')
case $verdict in
  ok*) pass "NVFP4 on 1 and 2 processes agree at all 60 steps (worst ${verdict#ok })" ;;
  *) fail "NVFP4 on 1 and 2 processes differ ($verdict)" ;;
esac

# a way to look: the trained checkpoint's linear weights as NVFP4 codes and scales
if "$build/qwen3-nvfp4" quantize "$out/nvfp4/checkpoints" "$out/dump.h5" >"$log" 2>&1 &&
    grep -q "28 tensors quantized (16x16 blocks)" "$log" &&
    "$build/qwen3-nvfp4" show "$out/dump.h5" model.layers.3.mlp.down_proj.weight >"$log" 2>&1 &&
    grep -q "S_dec" "$log"; then
  pass "qwen3-nvfp4 quantizes the checkpoint's 28 linear weights and shows them"
else
  result 0 "qwen3-nvfp4 on the checkpoint"
fi

# the precision policy is visible before any work
if "$build/qwen3-train" "$build/jobs/tiny.pb" --set precision.linear=NVFP4 --print-job |
    grep -q "linear: NVFP4"; then
  pass "--print-job shows the precision policy"
else
  fail "--print-job does not show precision.linear"
fi
finish
