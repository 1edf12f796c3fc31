#!/usr/bin/env bash
# One device call: build, the unit tests on that machine, then the checkpoint and tokenizer
# benchmarks beside their baselines (safetensors / torch.save; Hugging Face tokenizers).
# Results go to $OUT. Usage (from the repo root, on the device): bash bench/device_run.sh
source bench/device_build.sh
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
echo "machine: $card; $(nproc) cores of $cpu; $(df -h /tmp | tail -1 | awk '{print $4}') free on /tmp"
(cd build && ctest -L unit 2>&1 | tail -n 4)
{
  echo "# checkpoint save/load, Qwen3-4B shape, one pipeline rank of 8 ($card host, $cpu, /tmp)"
  for stage in 0 4; do
    build/bench/ckpt_bench /tmp/ckpt_bench "$stage" 8; rm -rf /tmp/ckpt_bench
    python3 bench/ckpt_baseline.py /tmp/ckpt_base "$stage" 8; rm -rf /tmp/ckpt_base
  done
} 2>&1 | tee "$OUT/ckpt.txt"
bash bench/tokenizer_bench.sh build 2>&1 | tee "$OUT/tokenizer.txt"
