#!/usr/bin/env bash
# NVFP4 on the GPU in one device call (bench/NOTES.md, "NVFP4 on the GPU"):
#   device run, carry [".deb"]:  bash bench/nvfp4_step.sh
#  1. build (bench/device_build.sh) and the `gpu` CTest label;
#  2. the NVFP4 kernels alone (build/bench/nvfp4_bench): each quantizer layout at Qwen3-4B shapes
#     beside a device-to-device copy of the same bytes, and the NVFP4 GEMM beside a plain bf16 one;
#  3. the Qwen3-4B training step, T 2048, BF16 against NVFP4 (the job's default recipe: every
#     layer but the first 2 and the last 15%), the same weights (written by PyTorch, whose eager
#     step is the baseline), one micro-batch per step and 8 per step; the issue bounds NVFP4 /
#     BF16 by 1.15; NVFP4_ACCUMS (default "1 8") are the micro-batches per step measured, and
#     NVFP4_RUNS (default "BF16 NVFP4") the precisions: NVFP4-base is NVFP4 with
#     bf16_first_layers 0 (the base recipe, the default before session 13), an -untuned suffix
#     runs with QWEN3_CUDA_GEMM_TUNE=0 (cuBLASLt's first candidate for every GEMM shape), a
#     -pass suffix (NVFP4 only) with QWEN3_NVFP4_WEIGHT_AMAX_PASS=1 (the weights' amax pass);
#  4. with NVFP4_MUTATIONS="name ...", those GPU mutations (tests/gpu/mutation_check_gpu.sh).
# Everything goes to $OUT/bench.txt; the table is printed last.
set -u
TOTAL_S=${NVFP4_TOTAL_S:-560}
RESERVE_S=10
OUT=${OUT:-/tmp/nvfp4_out}
source bench/bench_lib.sh

main() {
  section "build"
  source bench/device_build.sh || true
  [ -x build/qwen3-train ] || { echo "build FAILED"; return 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

  section "ctest -L gpu"
  gpu_label "${NVFP4_CTEST_S:-150}"

  section "NVFP4 kernels (build/bench/nvfp4_bench)"
  within 40 build/bench/nvfp4_bench | tee "$WORK/kernels.txt"

  section "weights (PyTorch, with its eager step as the baseline) and a token shard"
  rm -rf "$WORK/hf4b"
  within 100 python3 bench/torch_train_bench.py eager --mb 1 --accum 1 --warmup 1 --steps 2 \
    --save-hf "$WORK/hf4b" --budget 90
  timeout -k 5 60 python3 bench/ours_train_bench.py shard --out "$WORK/random_2m.h5"

  local run accum b sets
  for accum in ${NVFP4_ACCUMS:-1 8}; do
    for run in ${NVFP4_RUNS:-BF16 NVFP4}; do
      section "ours: $run, mb 1, $accum micro-batch(es) per step"
      b=$(budget 75 30)
      [ "$b" = 0 ] && { echo "SKIPPED (time)"; continue; }
      sets=(--set precision.linear="${run%%-*}")
      case $run in *-base*) sets+=(--set precision.bf16_first_layers=0) ;; esac
      tune=1 pass=0
      case $run in *-untuned*) tune=0 ;; esac
      case $run in *-pass*) pass=1 ;; esac
      QWEN3_CUDA_GEMM_TUNE=$tune QWEN3_NVFP4_WEIGHT_AMAX_PASS=$pass timeout -k 5 "$b" \
        python3 bench/ours_train_bench.py train --mb 1 --accum "$accum" \
        --budget $((b - 5)) --init-hf "$WORK/hf4b" --shard "$WORK/random_2m.h5" \
        --work "$WORK" --label "ours-$run" -- "${sets[@]}"
    done
  done

  # NVFP4_MUTATIONS="name ...": those of tests/gpu/mutation_check_gpu.sh, with the time left
  if [ -n "${NVFP4_MUTATIONS:-}" ]; then
    section "GPU mutations: $NVFP4_MUTATIONS"
    # shellcheck disable=SC2086
    within 200 bash tests/gpu/mutation_check_gpu.sh build $NVFP4_MUTATIONS
  fi
}

main 2>&1 | tee "$OUT/bench.txt"
echo
echo "gpu label: $(gpu_label_summary)" | tee -a "$OUT/bench.txt"
python3 - "$RESULTS" <<'PY' | tee -a "$OUT/bench.txt"
import sys
sys.path.insert(0, "bench")
from bench_common import read_results
rows = read_results(sys.argv[1])
quant = [r for r in rows if r.get("op") == "quantize"]
gemm = [r for r in rows if r.get("op") == "gemm"]
train = [r for r in rows if "mb" in r]
if quant:
    print("\n| quantize | rounding | rows x cols | x -> xq | us | GB/s | of the copy's |")
    print("|---|---|---|---|---|---|---|")
    for r in quant:
        print(f"| {r['layout']} | {r['rounding']} | {r['rows']} x {r['cols']} | {r['x']} -> {r['xq']} "
              f"| {float(r['us']):.1f} | {float(r['GBps']):.0f} | {float(r['of_copy']):.2f} |")
fused = [r for r in rows if r.get("op") == "quantize_rows_cols"]
if fused:
    print("\n| dY both ways (rows + cols, RHT) | rounding | rows x cols | us | two calls us | of the copy's |")
    print("|---|---|---|---|---|---|")
    for r in fused:
        print(f"| fused | {r['rounding']} | {r['rows']} x {r['cols']} | {float(r['us']):.1f} "
              f"| {float(r['two_calls_us']):.1f} | {float(r['of_copy']):.2f} |")
modes = [r for r in rows if r.get("op") == "gemm_scalars"]
if modes:
    print("\n| GEMM scalars | pass | heuristic's rank | us | cuBLASLt algo / tile / split-K / stages |")
    print("|---|---|---|---|---|")
    for r in modes:
        got = f"{float(r['us']):.1f}" if "us" in r else "unsupported"
        print(f"| {r['mode']} | {r['pass']} | {r.get('rank', 0)} | {got} | {r.get('algo', '')} / "
              f"{r.get('tile', '')} / {r.get('splitk', '')} / {r.get('stages', '')} |")
if gemm:
    print("\n| GEMM | m n k | c | NVFP4 us | plain bf16 us | ratio |")
    print("|---|---|---|---|---|---|")
    for r in gemm:
        print(f"| {r['pass']} | {r['m']} {r['n']} {r['k']} | {r['c']} | {float(r['nvfp4_us']):.1f} "
              f"| {float(r['plain_us']):.1f} | {float(r['ratio']):.3f} |")
step = {(r["system"], r.get("accum")): float(r["step_s"]) for r in train if "step_s" in r}
print("\n| system | mb | accum | tok/s | MFU | step s | allocated GiB over state |")
print("|---|---|---|---|---|---|---|")
for r in train:
    if "step_s" not in r:
        print(f"| {r['system']} | {r['mb']} | {r['accum']} | {r.get('status', '?')} | | | |")
        continue
    print(f"| {r['system']} | {r['mb']} | {r['accum']} | {float(r['tok_s']):.0f} | "
          f"{100 * float(r['mfu']):.1f}% | {float(r['step_s']):.3f} | "
          f"{float(r.get('over_state_alloc_gib', 'nan')):.1f} |")
for accum in sorted({k[1] for k in step}, key=int):
    for system in sorted({k[0] for k in step if k[0].startswith("ours-NVFP4")}):
        nv = system[len("ours-"):]
        bf16 = "BF16" + nv[len("NVFP4"):].replace("-base", "").replace("-pass", "")
        a, b = step.get((f"ours-{bf16}", accum)), step.get((system, accum))
        if a and b:
            print(f"{nv} / {bf16} step time, {accum} micro-batch(es) per step: {b / a:.3f}x (goal <= 1.15x)")
PY
