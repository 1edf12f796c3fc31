#!/usr/bin/env bash
# Where our Qwen3-4B step goes on the GPU, in one device call (bench/NOTES.md):
#   device run, carry [".deb"]:  bash bench/gpu_profile.sh
# Builds (bench/device_build.sh), makes the random token shard, then trains the 4B shape at
# T = 2048, mb 1 for PROFILE_STEPS steps with --timing (a synchronize around every stage of the
# block table: each stage's own time, the sum slightly pessimistic; the first step left out)
# from the job's seeded init (1-2 minutes of host time), or from $WORK/hf4b when an earlier
# script of the call left weights of the shape there (decode.sh does). Arguments are more
# trainer arguments (e.g. --set data.seq_len=4096 --set data.micro_batch_size=4).
# Also prints, with bench/hf_fixture_bf16.py, how far PyTorch's own bf16 is from the fp32
# reference on the Hugging Face fixtures (PROFILE_FIXTURES=0 leaves that out). Output:
# $OUT/profile.txt.
set -u
OUT=${OUT:-/tmp/gpu_profile_out}
WORK=${BENCH_WORK:-/tmp/qwen3_bench}
STEPS=${PROFILE_STEPS:-8}
mkdir -p "$OUT" "$WORK"
{
  source bench/device_build.sh || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ "${PROFILE_FIXTURES:-1}" = 1 ]; then
    echo "== PyTorch bf16 against the fp32 fixtures"
    timeout -k 5 120 python3 bench/hf_fixture_bf16.py
  fi
  echo "== token shard"
  timeout -k 5 60 python3 bench/ours_train_bench.py shard --out "$WORK/random_2m.h5"
  init=()
  [ -f "$WORK/hf4b/model.safetensors" ] && init=(--set init.hf_dir="$WORK/hf4b")
  echo "== ours, --timing, $STEPS steps ${init[*]} $*"
  timeout -k 5 "${PROFILE_TRAIN_S:-200}" mpirun --allow-run-as-root --bind-to none -np 1 \
    build/qwen3-train build/jobs/bench_4b.pb --timing --set train.steps="$STEPS" \
    --set output_dir="$WORK/profile" --set data.train="$WORK/random_2m.h5" "${init[@]}" "$@"
  echo "exit $?"
} 2>&1 | tee "$OUT/profile.txt"
