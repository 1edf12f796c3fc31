#!/usr/bin/env bash
# Several variants of this tree in one device call: this tree ("main"), this tree with each
# PATCH applied alone, and (with two or more) with all of them together, each built in a copy of
# its own in the call; then one benchmark command runs once in every tree on each GPU (at most
# two), GPU 0 taking the trees in order and GPU 1 in reverse, so that neither a GPU nor the
# drift of the call decides (session 20 measured five GEMV trees this way in 240 s). On one GPU
# the trees run in order and then in reverse, the reverse pass starting no tree after
# VARIANTS_DEADLINE seconds of the call (default 480: a device call ends at 600).
#
#   device run, kind nvidia-h200-x2 (or nvidia-h200), carry [".deb"]:
#     bash bench/variants.sh bench/pending/a.patch bench/pending/b.patch
#
# VARIANTS_CMD: the command each tree runs in its root (default: decoding 36 layers of Qwen3-4B's
# shape from packed NVFP4 weights, batches 1 and 4, and nvfp4_bench's MLP chain). Prints each
# run's RESULT lines under "== GPU g: TREE", then a table of decode_tok_s by tree and GPU. A patch
# that does not apply to this tree stops the call before anything is built; "all" is left out
# when the patches do not apply together.
set -u
[ $# -ge 1 ] || { echo "usage: bash $0 PATCH [PATCH...]"; exit 2; }
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$gpus" -ge 1 ] || { echo "no GPU here: run it on the device machine"; exit 2; }
[ "$gpus" -gt 2 ] && gpus=2
OUT=${OUT:-/tmp/variants_out}
mkdir -p "$OUT"
root=$PWD
copy_tree() {   # copy_tree DIR: this tree without its builds
  rm -rf "$1" && mkdir -p "$1"
  tar --exclude=./build --exclude=./.git --exclude=./.ab_base -cf - . | tar -C "$1" -xf -
}
names=(main) dirs=("$root")
for p in "$@"; do
  [ -f "$p" ] || { echo "no patch $p"; exit 2; }
  git apply --check "$p" || { echo "$p does not apply to this tree"; exit 2; }
  name=$(basename "$p" .patch)
  copy_tree "/tmp/variant_$name"
  (cd "/tmp/variant_$name" && git apply "$root/$p")
  names+=("$name") dirs+=("/tmp/variant_$name")
done
if [ $# -ge 2 ]; then
  copy_tree /tmp/variant_all
  if (cd /tmp/variant_all && for p in "$@"; do git apply "$root/$p" || exit 1; done); then
    names+=(all) dirs+=(/tmp/variant_all)
  else
    echo "the patches do not apply together: no \"all\" tree"
  fi
fi
t0=$(date +%s)
source bench/device_build.sh > "$OUT/build_main.txt" 2>&1 || { tail -n 30 "$OUT/build_main.txt"; exit 1; }
jobs=$(( $(nproc) / (${#dirs[@]} - 1 > 0 ? ${#dirs[@]} - 1 : 1) ))
for i in $(seq 1 $(( ${#dirs[@]} - 1 ))); do
  (cd "${dirs[i]}" && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DQWEN3_CUDA_ARCHS=90a \
     > "$OUT/build_${names[i]}.txt" 2>&1 && cmake --build build -j"$jobs" >> "$OUT/build_${names[i]}.txt" 2>&1 \
     || echo "${names[i]} did not build: $OUT/build_${names[i]}.txt") &
done
wait
echo "built ${#dirs[@]} trees in $(( $(date +%s) - t0 )) s"
cmd=${VARIANTS_CMD:-'python3 bench/decode_bench.py ours --layers 36 --batches 1,4 --set precision.linear=NVFP4 --tag=-nvfp4 2>&1 | grep ^RESULT; timeout 60 build/bench/nvfp4_bench --repeats 20 2>&1 | grep decode_mlp_chain'}
run_gpu() {   # run_gpu G COLUMN INDEX...: the command in each tree, in that order, on GPU G
  local g=$1 col=$2
  shift 2
  for i in "$@"; do
    [ $(( $(date +%s) - t0 )) -lt "${VARIANTS_DEADLINE:-480}" ] || { echo "(deadline: no more trees)"; return; }
    echo "== GPU $col: ${names[i]}"
    (cd "${dirs[i]}" && CUDA_VISIBLE_DEVICES=$g BENCH_WORK=/tmp/variants_work_$g bash -c "$cmd") 2>&1 \
      | grep -E "^RESULT" || echo "(no RESULT line)"
  done
}
order=$(seq 0 $(( ${#dirs[@]} - 1 )))
if [ "$gpus" -ge 2 ]; then
  run_gpu 0 0 $order > "$OUT/gpu0.txt" 2>&1 &
  run_gpu 1 1 $(echo "$order" | tac) > "$OUT/gpu1.txt" 2>&1 &
  wait
else   # the reverse pass on the same GPU stands in for GPU 1's column
  run_gpu 0 0 $order > "$OUT/gpu0.txt" 2>&1
  run_gpu 0 1 $(echo "$order" | tac) > "$OUT/gpu1.txt" 2>&1
  gpus=2
fi
for g in $(seq 0 $(( gpus - 1 ))); do cat "$OUT/gpu$g.txt"; done
echo
echo "decode_tok_s (batch 1, batch 4) by tree, GPU 0 | GPU 1 (one GPU: forward pass | reverse pass):"
for name in "${names[@]}"; do
  row="$name:"
  for g in $(seq 0 $(( gpus - 1 ))); do
    row+=" $(awk -v t="== GPU $g: $name" '$0 == t {on = 1; next} /^== / {on = 0}
           on && /decode_tok_s=/ {for (i = 1; i <= NF; i++) if ($i ~ /^decode_tok_s=/)
           printf "%s ", substr($i, 14)}' "$OUT/gpu$g.txt")|"
  done
  echo "$row"
done
