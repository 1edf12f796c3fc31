#!/usr/bin/env bash
# The headline job (jobs/qwen3_4b_dgx.txtpb) on the GPUs of one device call (bench/NOTES.md,
# "Several GPUs"):  device run, kind nvidia-h200-x2 (or more), carry [".deb"]:  bash bench/headline.sh
#  1. throughput of its layouts on all the GPUs, BF16 and the job's NVFP4, at the job's global
#     batch of 64 sequences (bench/ours_train_bench.py: tokens/s, per GPU, MFU, memory);
#  2. a checkpoint save and an exact resume, both runs started by jobs/slurm/train.sbatch: 4 steps
#     saving at 2 and 4, then a run resumed from step 2 must log steps 3 and 4 equal as text; the
#     saves' seconds from the log;
#  3. an evaluation run from the resumed run's checkpoint (validation loss, greedy generation with
#     the KV cache checked against a full replay).
# Weights start from random ones PyTorch writes (torch_train_bench.py --save-hf, which also times
# PyTorch eager on one GPU: the baseline). HEADLINE_LAYOUTS: "np:pp:zero:linear ...".
set -u
TOTAL_S=${HEADLINE_TOTAL_S:-570}
RESERVE_S=15
OUT=${OUT:-/tmp/headline_out}
source bench/bench_lib.sh
export NCCL_NVLS_ENABLE=0   # the machine's rule (KINDS.md): no NVLink multicast

section "build"
source bench/device_build.sh || true
[ -x build/qwen3-train ] || { echo "build FAILED"; exit 1; }
gpus=$(nvidia-smi -L | grep -c '^GPU')
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
job=build/jobs/qwen3_4b_dgx.pb
GLOBAL=64
LAYOUTS=${HEADLINE_LAYOUTS:-"$gpus:1:1:BF16 $gpus:$gpus:0:BF16 $gpus:1:0:BF16 $gpus:1:1:NVFP4"}

section "weights (PyTorch, one GPU, with its eager step as the baseline) and a token shard"
rm -rf "$WORK/hf4b"
within 100 python3 bench/torch_train_bench.py eager --mb 1 --accum 8 \
  --warmup 1 --steps 1 --save-hf "$WORK/hf4b" --budget 90
timeout -k 5 60 python3 bench/ours_train_bench.py shard --out "$WORK/random_2m.h5"
data=$WORK/random_2m.h5

for l in $LAYOUTS; do
  IFS=: read -r np pp zero linear <<< "$l"
  dp=$((np / pp)) accum=$((GLOBAL / (np / pp)))
  section "throughput: $np GPUs, $pp stage(s) x $dp replica(s), ZeRO $zero, $linear, $accum micro-batches"
  b=$(budget 90 40)
  [ "$b" = 0 ] && { echo "SKIPPED (time)"; continue; }
  timeout -k 5 "$b" python3 bench/ours_train_bench.py train --job "$job" --np "$np" --pp "$pp" \
    --zero "$zero" --mb 1 --accum "$accum" --warmup 1 --steps 1 --budget $((b - 5)) \
    --init-hf "$WORK/hf4b" --label "dgx-$linear" -- --set precision.linear="$linear"
done

# run NP NAME [--set ...]: the job's own layout and precision, 16 sequences a step, through the
# Slurm batch script as a plain script (no Slurm here: its launcher falls back to mpirun, with
# SLURM_NTASKS processes, as inside an allocation); log in NAME.log
run() {
  local np=$1 name=$2
  shift 2
  within 240 env SLURM_NTASKS="$np" bash jobs/slurm/train.sbatch "$job" \
    --set data.train="$data" --set init.hf_dir="$WORK/hf4b" \
    --set parallel.micro_batches=$((16 / np)) --set output_dir="$WORK/$name" "$@" \
    > "$WORK/$name.log" 2>&1
  echo "$name: exit $?"
  grep -E "step +[0-9]+/|checkpoint|saved|resumed|error" "$WORK/$name.log" | tail -n 12
}
numbers() {   # "step loss lr grad_norm" of steps 3 and 4
  grep -o '"step":[34],"loss":[^,]*,"lr":[^,]*,"grad_norm":[^,]*' "$WORK/$1/metrics.jsonl"
}

section "save at steps 2 and 4, then resume from step 2"
rm -rf "$WORK/straight" "$WORK/resumed"
run "$gpus" straight --set train.steps=4 --set checkpoint.every=2 --set checkpoint.keep_last=0 \
  --set checkpoint.resume=NEVER
rm -rf "$WORK/straight/checkpoints/step_00000004"   # the disk holds two 4B checkpoints, not three
run "$gpus" resumed --set train.steps=4 --set checkpoint.every=2 --set checkpoint.keep_last=1 \
  --set checkpoint.resume="$WORK/straight/checkpoints/step_00000002"
a=$(numbers straight) b=$(numbers resumed)
if [ -n "$a" ] && [ "$a" = "$b" ]; then verdict="equal as text"; else verdict="DIFFER"; fi
echo "steps 3-4 straight: $a"
echo "steps 3-4 resumed:  $b"
echo "RESULT system=resume np=$gpus steps_3_4=$(echo "$verdict" | tr ' ' _)" | tee -a "$RESULTS"

section "evaluation of the resumed run's step 4 on one GPU"
cat > "$WORK/eval.txtpb" <<EOF
eval { valid_batches: 4 prompts { ids: [1, 2, 3, 4, 5, 6, 7, 8] } max_new_tokens: 16
       temperature: 0 check_kv: true kv_tolerance: 0.1 }
EOF
protoc --encode=qwen3.Job -Iproto proto/job.proto < "$WORK/eval.txtpb" > "$WORK/eval_part.pb"
# a job file is a protobuf message: two concatenated are merged, the second's fields winning
cat "$job" "$WORK/eval_part.pb" > "$WORK/eval.pb"
within 120 mpirun --allow-run-as-root -np 1 build/qwen3-train "$WORK/eval.pb" \
  --set train.steps=0 --set checkpoint.resume=NEVER --set data.train="$data" --set data.valid="$data" \
  --set init.checkpoint="$WORK/resumed/checkpoints/latest" --set output_dir="$WORK/eval" \
  > "$WORK/eval.log" 2>&1
echo "eval: exit $?"
grep -v "^ *$" "$WORK/eval.log" | tail -n 12

tar czf "$OUT/logs.tgz" -C "$WORK" --exclude='*.h5' --exclude='*.safetensors' \
  --exclude=checkpoints . 2>/dev/null
section "table"
grep "^RESULT" "$RESULTS" | sed 's/^RESULT //' | awk '{
  delete f; for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  if (f["system"] == "resume") { print "exact resume (steps 3-4): " f["steps_3_4"]; next }
  printf "%-12s np=%-2s pp=%-2s zero=%-2s accum=%-3s tok/s %7s  per GPU %7s  MFU %6s  alloc %6s GiB %s\n",
    f["system"], f["np"] ? f["np"] : 1, f["pp"] ? f["pp"] : 1, f["zero"] ? f["zero"] : 0,
    f["accum"], f["tok_s"], f["tok_s_gpu"] ? f["tok_s_gpu"] : f["tok_s"], f["mfu"],
    f["alloc_peak_gib"], f["status"] }'
