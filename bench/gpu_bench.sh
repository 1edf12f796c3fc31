#!/usr/bin/env bash
# The GPU benchmark in one device call (bench/NOTES.md, "GPU benchmark: how to run"):
#   device run, carry [".deb"]:  bash bench/gpu_bench.sh
# Builds (bench/device_build.sh), then, each part under a hard `timeout` and the whole under
# TOTAL_S: the `gpu` CTest label; PyTorch eager at Qwen3-4B's shape (mb 1, mb 4, a 16-sequence
# step; it also writes the initial weights our trainer starts from, and times SDPA attention);
# our trainer on the same three batches; our attention kernels; torch.compile last, if the time
# left allows (the whole model, else its decoder layers one by one; GPU_BENCH_SKIP_COMPILE=1
# skips it). Everything goes to $OUT/bench.txt; RESULT lines to $OUT/results.txt; the trainer
# and CTest logs to $OUT/logs.tgz. The last thing printed is the table.
set -u   # not -e: a part that fails is reported and the next one runs

# ---- budgets, in seconds (each overridable from the environment) ---------------------------
TOTAL_S=${GPU_BENCH_TOTAL_S:-480}                  # the whole call, the build included
RESERVE_S=${GPU_BENCH_RESERVE_S:-10}               # kept back for the table and the logs
CTEST_S=${GPU_BENCH_CTEST_S:-90}                   # ctest -L gpu
TORCH_EAGER_S=${GPU_BENCH_TORCH_EAGER_S:-100}      # torch eager x3 + weights + SDPA (~50 s)
OURS_MB1_S=${GPU_BENCH_OURS_MB1_S:-60}             # ours mb 1, one micro-batch per step
OURS_SEQ16_S=${GPU_BENCH_OURS_SEQ16_S:-90}         # ours mb 1 x 16 micro-batches per step
OURS_MB4_S=${GPU_BENCH_OURS_MB4_S:-75}             # ours mb 4, one micro-batch per step
OURS_ATTN_S=${GPU_BENCH_OURS_ATTN_S:-30}           # build/bench/attn_bench
COMPILE_S=${GPU_BENCH_COMPILE_S:-200}              # torch.compile of the model (compiling ~125 s), mb 1 and 16-seq
COMPILE_LAYERS_S=${GPU_BENCH_COMPILE_LAYERS_S:-80} # per-layer compile when the whole does not fit
T=${GPU_BENCH_T:-2048}

source bench/bench_lib.sh
skipped=()
skip() { skipped+=("$1"); echo "SKIPPED $1"; }

# A part cut short may leave a process of ours on the GPU (a trainer rank whose harness was
# killed hard, a test's rank): end those, by id, so that the next part has the GPU to itself.
# Only on this run's GPUs (CUDA_VISIBLE_DEVICES, as indices, with CUDA_DEVICE_ORDER=PCI_BUS_ID
# so that CUDA and nvidia-smi count alike): another GPU of the machine may be running other work.
reap_gpu() {
  local pid name
  nvidia-smi ${CUDA_VISIBLE_DEVICES:+-i "$CUDA_VISIBLE_DEVICES"} \
    --query-compute-apps=pid,process_name --format=csv,noheader 2>/dev/null |
    while IFS=', ' read -r pid name; do
      case "$name" in
        *qwen3-train* | "$PWD"/build/*) echo "ending leftover GPU process $pid ($name)"; kill -9 "$pid" 2>/dev/null;;
      esac
    done
}

main() {
  echo "# qwen3-train GPU benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'); budget ${TOTAL_S} s"
  echo "budgets (s): ctest $CTEST_S, torch eager $TORCH_EAGER_S, ours mb1 $OURS_MB1_S, ours 16-seq" \
       "$OURS_SEQ16_S, ours mb4 $OURS_MB4_S, ours attention $OURS_ATTN_S, torch.compile" \
       "$COMPILE_S (per-layer $COMPILE_LAYERS_S), reserve $RESERVE_S"

  section "build"
  local t0
  t0=$(date +%s)
  source bench/device_build.sh || true   # errexit inside is ignored here: a failed build is reported below
  local built=1
  [ -x build/qwen3-train ] && [ -x build/qwen3-prep ] && [ -f build/jobs/bench_4b.pb ] || built=0
  echo "build: $(( $(date +%s) - t0 )) s, $([ $built = 1 ] && echo ok || echo 'FAILED: no build/qwen3-train, qwen3-prep or jobs/bench_4b.pb')"

  section "card"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "$(nproc) cores of $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //');" \
       "$(python3 -c 'from importlib.metadata import version as v; print("torch", v("torch"), "transformers", v("transformers"))' 2>&1 | tail -1)"
  local ours_label=ours-${QWEN3_CUDA_PRECISION:-bf16}

  section "ctest -L gpu"
  local ctest_summary="not run" b
  b=$(budget "$CTEST_S" 15)
  if [ "$built" = 0 ]; then
    skip "ctest -L gpu (no build)"
  elif [ "$b" = 0 ]; then
    skip "ctest -L gpu (time)"
  else
    (cd build && timeout -k 5 "$b" ctest -L gpu --output-on-failure --timeout "$b") > "$WORK/ctest.txt" 2>&1
    local rc=$?
    tail -n 40 "$WORK/ctest.txt"
    ctest_summary=$(grep -E "tests passed|No tests were found|tests failed" "$WORK/ctest.txt" | tail -n 1)
    [ "$rc" = 124 ] && ctest_summary="timed out after ${b} s; ${ctest_summary:-no summary}"
    ctest_summary=${ctest_summary:-"exit $rc, no summary line"}
    local nskip
    nskip=$(grep -c '\*\*\*Skipped' "$WORK/ctest.txt")
    [ "$nskip" -gt 0 ] && ctest_summary="$ctest_summary ($nskip of them skipped)"
    reap_gpu
  fi

  section "torch eager: mb 1, mb 4, 16 sequences per step; initial weights; SDPA attention"
  b=$(budget "$TORCH_EAGER_S" 30)
  local rc st
  if [ "$b" = 0 ]; then
    skip "torch eager + SDPA (time)"
    st=skipped
  else
    rm -rf "$WORK/hf4b"
    timeout -k 5 "$b" python3 bench/torch_train_bench.py eager --mb 1 --accum 1 \
      --also 4:1,1:16 --T "$T" --save-hf "$WORK/hf4b" --attn-T 2048,4096,8192 --budget $(( b - 5 ))
    rc=$?
    echo "exit $rc"
    st=failed; [ "$rc" = 124 ] && st=timeout
  fi
  mark torch-eager 1 1 "$st"; mark torch-eager 4 1 "$st"; mark torch-eager 1 16 "$st"

  section "ours: token shard"
  if [ "$built" = 1 ]; then
    timeout -k 5 60 python3 bench/ours_train_bench.py shard --out "$WORK/random_2m.h5"
    [ -f "$WORK/hf4b/model.safetensors" ] ||
      echo "note: no $WORK/hf4b/model.safetensors: our runs use the job's random init (1-2 min of host time each)"
  fi
  # GPU_BENCH_AB="VAR=VALUE": mb 1 with one micro-batch a step once more under that setting
  # (labelled ours-...+VAR=VALUE), beside the default run of the same call
  local cfg mb acc want env label
  for cfg in "1 1 $OURS_MB1_S" "1 16 $OURS_SEQ16_S" "4 1 $OURS_MB4_S" \
             ${GPU_BENCH_AB:+"1 1 $OURS_MB1_S $GPU_BENCH_AB"}; do
    read -r mb acc want env <<< "$cfg"
    label=$ours_label${env:++$env}
    section "ours: mb $mb, $acc micro-batch(es) per step, T $T${env:+, $env}"
    b=$(budget "$want" 25)
    if [ "$built" = 0 ]; then
      skip "ours mb=$mb accum=$acc (no build)"
      mark "$label" "$mb" "$acc" no-build
      continue
    elif [ "$b" = 0 ]; then
      skip "ours mb=$mb accum=$acc${env:+ $env} (time)"
      mark "$label" "$mb" "$acc" skipped
      continue
    fi
    env ${env:-} timeout -k 10 "$b" python3 bench/ours_train_bench.py train --mb "$mb" \
      --accum "$acc" --T "$T" --budget $(( b - 10 )) --init-hf "$WORK/hf4b" \
      --shard "$WORK/random_2m.h5" --work "$WORK" --label "$label"
    rc=$?
    echo "exit $rc"
    mark "$label" "$mb" "$acc" "exit-$rc"
    reap_gpu
  done

  section "ours: attention (build/bench/attn_bench)"
  b=$(budget "$OURS_ATTN_S" 10)
  if [ ! -x build/bench/attn_bench ]; then
    skip "ours attention (no build/bench/attn_bench)"
  elif [ "$b" = 0 ]; then
    skip "ours attention (time)"
  else
    timeout -k 5 "$b" build/bench/attn_bench --budget $(( b * 3 / 4 - 5 )) 2048 4096 8192
    echo "exit $?"
    # the mma.sync kernels beside them (what runs where wgmma does not: not Hopper, documents)
    timeout -k 5 "$(( b / 4 ))" env QWEN3_CUDA_WGMMA=0 build/bench/attn_bench \
      --budget $(( b / 4 - 5 )) 2048
    echo "exit $?"
  fi

  section "torch.compile, mb 1"
  local kind=${GPU_BENCH_COMPILE:-auto} l
  l=$(left)
  if [ "${GPU_BENCH_SKIP_COMPILE:-0}" = 1 ]; then
    skip "torch.compile (GPU_BENCH_SKIP_COMPILE=1)"
    mark torch-compile 1 1 skipped
  else
    if [ "$kind" = auto ]; then
      kind=none
      (( l >= COMPILE_LAYERS_S )) && kind=layers
      (( l >= COMPILE_S )) && kind=model
    fi
    case "$kind" in
      model) b=$(budget "$COMPILE_S" 60); mode=compile ;;
      layers) b=$(budget "$COMPILE_LAYERS_S" 40); mode=compile-layers ;;
      *) b=0 ;;
    esac
    if [ "$b" = 0 ]; then
      skip "torch.compile (time: $l s left; the whole model needs $COMPILE_S, per layer $COMPILE_LAYERS_S)"
      mark torch-compile 1 1 skipped
    else
      [ "$kind" = layers ] && echo "only $l s left: compiling the decoder layers one by one" \
        "(torch-compile-layers), not the whole model"
      timeout -k 5 "$b" python3 bench/torch_train_bench.py "$mode" --mb 1 --accum 1 --also 1:16 \
        --T "$T" --budget $(( b - 5 ))
      rc=$?
      echo "exit $rc"
      st=failed; [ "$rc" = 124 ] && st=timeout
      mark "torch-$mode" 1 1 "$st"; mark "torch-$mode" 1 16 "$st"
    fi
  fi

  section "summary"
  rm -rf "$WORK/hf4b" "$WORK"/out_*/ckpt   # 8 GB of weights; a machine may be kept warm
  tar -czf "$OUT/logs.tgz" -C "$WORK" --exclude='*.h5' --exclude='hf4b' --exclude='ckpt' . 2>/dev/null
  echo "finished in $(( $(date +%s) - start )) s of $TOTAL_S"
  echo "ctest -L gpu: $ctest_summary"
  if [ ${#skipped[@]} -gt 0 ]; then
    printf 'skipped: %s\n' "${skipped[@]}"
  else
    echo "skipped: nothing"
  fi
  python3 - "$RESULTS" <<'PY'
import sys
sys.path.insert(0, "bench")
from bench_common import read_results
rows = read_results(sys.argv[1])
attn = [r for r in rows if "accum" not in r]
train = sorted((r for r in rows if "accum" in r),   # one batch's systems side by side
               key=lambda r: (int(r["T"]), int(r["accum"]), int(r["mb"])))
g = lambda r, k, f="{}": f.format(float(r[k])) if k in r else ""
if attn:
    print("\nAttention, causal, B=1, 32 q / 8 kv heads, head_dim 128 (FLOPs: fwd 2 T^2 heads hd, bwd 2.5x)")
    print("| system | T | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOP/s | bwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in attn:
        if "status" in r:
            print(f"| {r['system']} | {r['T']} | {r['status']} | | | | | |")
            continue
        print(f"| {r['system']} | {r['T']} | {g(r, 'fwd_ms', '{:.3f}')} | {g(r, 'bwd_ms', '{:.3f}')} "
              f"| {g(r, 'fwdbwd_ms', '{:.3f}')} | {g(r, 'fwd_tflops', '{:.0f}')} "
              f"| {g(r, 'bwd_tflops', '{:.0f}')} | {g(r, 'fwdbwd_tflops', '{:.0f}')} |")
print("\nPeak: torch = max_memory_allocated; ours = nvidia-smi memory.used (CUDA context included)."
      "\nOver-state = peak - (params + grads + AdamW moments): torch bf16 as held, ours fp32 (16 B/param; 18 with the bf16 weight copy)."
      "\nMFU = tok/s x (6 N + 6 L T heads hd) / 989e12; * = the budget ran out in warm-up.")
print("Over-state, allocated: torch's as above; ours from what the trainer allocated (no context).")
print("\n| system | mb | T | accum | tok/s | MFU | peak GiB | over-state GiB | over-state, allocated GiB | step s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in train:
    name = r["system"] + (f" (compiling {float(r['compile_s']):.0f} s)" if "compile_s" in r else "")
    head = f"| {name} | {r['mb']} | {r['T']} | {r['accum']} "
    if "status" in r:
        print(head + f"| {r['status']} | | | | | |")
        continue
    star = "*" if r.get("partial") == "1" else ""
    alloc = g(r, 'over_state_alloc_gib', '{:.1f}') or g(r, 'over_state_gib', '{:.1f}')
    print(head + f"| {float(r['tok_s']):.0f}{star} | {100 * float(r['mfu']):.1f}% "
          f"| {g(r, 'peak_gib', '{:.1f}')} | {g(r, 'over_state_gib', '{:.1f}')} | {alloc} "
          f"| {g(r, 'step_s', '{:.3f}')} |")
PY
}

main 2>&1 | tee "$OUT/bench.txt"
