#!/usr/bin/env bash
# The main job on the embedded demo: installs what is missing and builds (setup.sh), turns the
# demo chat set into a token shard, fine-tunes a tiny Qwen3 with the real Qwen3 vocabulary on
# 2 pipeline stages, evaluates it, then runs a checkpoint evaluation with a new question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh

build/qwen3-prep build --format chat --tokenizer third_party/qwen3-tokenizer/tokenizer.json \
  --out build/data/sft_demo.h5 jobs/data/sft_demo.jsonl

echo
echo "== training on 2 processes (2 pipeline stages); the answers come at the end"
# from scratch each time, replacing the checkpoints of an earlier demo
$MPIRUN -np 2 build/qwen3-train build/jobs/demo.pb --set checkpoint.resume=NEVER \
  --set checkpoint.overwrite=true

echo
echo "== a checkpoint evaluation run: the model from out/demo/checkpoints/latest"
$MPIRUN -np 2 build/qwen3-train build/jobs/demo.pb --set train.steps=0 \
  --set eval.prompts.user="Who am I talking to?"
echo
echo "demo: loss per step in out/demo/metrics.jsonl, answers in out/demo/eval.jsonl"
