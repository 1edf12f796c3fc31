#!/usr/bin/env bash
# Where a decoding step's time goes: each kind of work's cost inside the recorded step, found by
# leaving it out (session 18: the attention 16.3 us a layer, q/k-norm + RoPE 4.9, an add or a
# norm ~0.7 or less). bench/decode_bench.py ours (36 layers of Qwen3-4B's shape from random
# init, batch 1) runs in a copy of this tree patched to skip, while decoding:
#   QWEN3_SKIP_STAGES="name,..."  the block's stages of those names (worker/block.c's table);
#   QWEN3_SKIP_APPEND=1           the KV append (the attention reads the stale row);
#   QWEN3_SKIP_QUANTIZE=1         packed decoding's input quantization (the GEMV reads a stale
#                                 operand; NVFP4 only).
# The tokens are wrong; the time saved is what the skipped launches cost in the chain. The
# patch never touches this tree.
#   device run, carry [".deb"]:  bash bench/decode_stages.sh
# DECODE_STAGES_SET (default "precision.linear=NVFP4") are decode_bench.py's --set arguments.
# Prints a table last: each variant's ms a token and the us a layer it saves.
set -u
OUT=${OUT:-/tmp/decode_stages_out}
mkdir -p "$OUT"
log=$OUT/decode_stages.txt
copy=/tmp/decode_stages
rm -rf "$copy" && mkdir -p "$copy"
tar --exclude=./build --exclude=./.git --exclude=./.ab_base -cf - . | tar -C "$copy" -xf -
cd "$copy" || exit 1
python3 - <<'PY' || exit 1
def patch(path, edits):
    s = open(path).read()
    for old, new in edits:
        if s.count(old) != 1:
            raise SystemExit(f"decode_stages.sh: {path} no longer has its line: {old.strip()}")
        s = s.replace(old, new)
    open(path, "w").write("#include <stdlib.h>\n#include <string.h>\n" + s)
patch("worker/block.c", [
    ("static void stage_forward(struct worker *w, int i, void **a, int live, int layer, int n) {\n",
     "static void stage_forward(struct worker *w, int i, void **a, int live, int layer, int n) {\n"
     "  const char *skip = getenv(\"QWEN3_SKIP_STAGES\");\n"
     "  if (skip && w->kv && strstr(skip, QWEN3_BLOCK[i].name)) return;\n"),
    ("  w->be->kv_append(", "  if (!getenv(\"QWEN3_SKIP_APPEND\")) w->be->kv_append("),
])
patch("worker/nvfp4_linear.c", [
    ("    be->nvfp4_quantize(xq, dec_x, x, act, n, in_dim, NVFP4_ROWS_INT, 0, 0, -1);",
     "    if (!getenv(\"QWEN3_SKIP_QUANTIZE\"))\n"
     "      be->nvfp4_quantize(xq, dec_x, x, act, n, in_dim, NVFP4_ROWS_INT, 0, 0, -1);"),
])
PY
# the one build, of the patched copy (which carries .deb/ too)
source bench/device_build.sh > "$OUT/build.txt" 2>&1 || { tail -n 20 "$OUT/build.txt"; exit 1; }
set -u
sets=()
for kv in ${DECODE_STAGES_SET:-precision.linear=NVFP4}; do sets+=(--set "$kv"); done
: > "$log"
for v in none STAGES=attention STAGES=qk_norm_rope APPEND=1 QUANTIZE=1 \
         STAGES=input_norm,post_norm STAGES=attn_residual,mlp_residual STAGES=mlp_merge \
         STAGES=qkv_proj STAGES=gate_up STAGES=down_proj STAGES=o_proj; do
  env=()
  [ "$v" != none ] && env=("QWEN3_SKIP_$v")
  r=$(env "${env[@]}" python3 bench/decode_bench.py ours --layers 36 --batches 1 "${sets[@]}" \
        --tag="-skip" 2>&1 | grep -E "^RESULT" | tail -n 1)
  echo "$v $r" | tee -a "$log"
done
echo "== decode_stages: skipped, ms a token, us a layer saved (36 layers)"
awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^ms_per_token=/) { split($i, a, "="); ms[NR] = a[2] }
       name[NR] = $1 }
     END { for (k = 1; k <= NR; k++)
             if (ms[k] == "" || ms[1] == "") printf "%-36s   failed\n", name[k]
             else printf "%-36s %8s %8.1f\n", name[k], ms[k], (ms[1] - ms[k]) * 1000 / 36 }' "$log"
