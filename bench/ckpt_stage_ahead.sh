#!/usr/bin/env bash
# The staging buffer of saves, allocated ahead (issue "Slurm for real", part 3), in one device
# call after a build (bench/device_build.sh), carry [".deb"]:
#   bash bench/ckpt_stage_ahead.sh [LAYERS] [STEPS]
# Trains Qwen3-4B's width with LAYERS decoder layers (default 12: an 18 GB checkpoint, which
# the device's disk holds) from the job's random init for STEPS steps (default 150) and saves
# once, at the end. The staging buffer (weights and both AdamW moments in pinned host memory) is
# allocated by a thread from the start; it prints when that was ready, the step times while it
# ran and after, and how long the save paused training. Output: $OUT/ckpt_stage_ahead.txt.
set -u
OUT=${OUT:-/tmp/ckpt_out}
WORK=/tmp/qwen3_bench
LAYERS=${1:-12}
STEPS=${2:-150}
mkdir -p "$OUT" "$WORK"
{
  [ -f "$WORK/random_2m.h5" ] || python3 bench/ours_train_bench.py shard --out "$WORK/random_2m.h5"
  rm -rf "$WORK/stage_ahead"
  SECONDS=0
  timeout -k 5 300 mpirun --allow-run-as-root --bind-to none -np 1 build/qwen3-train \
    build/jobs/bench_4b.pb --set model.num_layers="$LAYERS" --set train.steps="$STEPS" \
    --set checkpoint.every=0 --set checkpoint.keep_last=1 --set output_dir="$WORK/stage_ahead" \
    --set checkpoint.dir="$WORK/stage_ahead/checkpoints" --set data.train="$WORK/random_2m.h5" \
    > "$WORK/stage_ahead.log" 2>&1
  echo "exit $? after $SECONDS s"
  grep -E "staging|paused|error" "$WORK/stage_ahead.log"
  python3 - "$WORK/stage_ahead/metrics.jsonl" <<'PY'
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"step_seconds"' in l]
s = [r["step_seconds"] for r in steps[1:]]   # the first step pays for cuBLASLt's set-up
print(f"steps 2-{len(steps)}: median {statistics.median(s):.4f} s, max {max(s):.4f} s "
      f"(step {steps[1 + s.index(max(s))]['step']}), sum {sum(s):.1f} s")
print("RESULT system=stage-ahead max_step_s=%.4f median_step_s=%.4f" % (max(s), statistics.median(s)))
PY
  du -sh "$WORK/stage_ahead/checkpoints" 2>/dev/null
  rm -rf "$WORK/stage_ahead/checkpoints"
} 2>&1 | tee "$OUT/ckpt_stage_ahead.txt"
