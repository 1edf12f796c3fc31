#!/usr/bin/env bash
# Issue "GPU speed", goal 1 in one device call: training at Qwen3-4B's shape, steps of
# TABLE_TOKENS tokens (gradient accumulation, the optimizer in the step) at each micro-batch of
# TABLE_MBS, torch.compile and ours, at one sequence length:
#   device run, carry [".deb"]:  TABLE_T=4096 bash bench/train_table.sh
# torch.compile runs first (static shapes: one compilation per micro-batch, ~100 s each, so
# TABLE_TORCH_MBS may name fewer; in the order given, the last one is cut when time runs out) and
# writes the initial weights our runs load; then ours at each micro-batch, and once more with
# each job setting of TABLE_OURS_SETS ("LABEL:KEY=VALUE[,KEY=VALUE]" separated by spaces, e.g.
# "noclip:optim.grad_clip=0"; torch's runs do not clip, ours clips at 1.0 by default) on the
# configurations of TABLE_VARIANT_CONFIGS ("MB:ACCUM ...", default all), and TABLE_TORCH_CLIP=1
# adds torch's clip_grad_norm_(1.0) runs. TABLE_EXTRA ("MB:ACCUM ...") adds configurations of
# other step sizes to both systems (e.g. "1:1", one micro-batch a step). TABLE_CTEST=1 runs the
# `gpu` label first. Everything goes to $OUT/train_table.txt; the table is printed last.
set -u
TOTAL_S=${TABLE_TOTAL_S:-570}
RESERVE_S=10
OUT=${OUT:-/tmp/train_table_out}
source bench/bench_lib.sh
T=${TABLE_T:-2048}
TOKENS=${TABLE_TOKENS:-32768}
read -r -a MBS <<< "${TABLE_MBS:-1 2 4}"
read -r -a TORCH_MBS <<< "${TABLE_TORCH_MBS:-${TABLE_MBS:-1 2 4}}"   # a compilation each: ~100 s
OURS_S=${TABLE_OURS_S:-55}   # one configuration of ours: start-up (~20 s) and a few steps

main() {
  build_and_check "${TABLE_CTEST:-0}" "" || return 1
  token_shard
  local mb configs=() torch_configs=() spec
  for mb in "${MBS[@]}" "${TORCH_MBS[@]}"; do
    (( TOKENS % (mb * T) == 0 )) || { echo "TABLE_TOKENS $TOKENS is not a multiple of $mb x $T"; return 1; }
  done
  for mb in "${MBS[@]}"; do configs+=("$mb:$(( TOKENS / (mb * T) ))"); done
  for mb in "${TORCH_MBS[@]}"; do torch_configs+=("$mb:$(( TOKENS / (mb * T) ))"); done
  configs+=(${TABLE_EXTRA:-}) torch_configs+=(${TABLE_EXTRA:-})
  spec=$(IFS=,; echo "${torch_configs[*]:1}")
  local n_var=${#configs[@]}
  [ -n "${TABLE_VARIANT_CONFIGS:-}" ] && n_var=$(wc -w <<< "$TABLE_VARIANT_CONFIGS")
  local n_ours=$(( ${#configs[@]} + n_var * $(wc -w <<< "${TABLE_OURS_SETS:-}") ))

  section "torch.compile (static shapes), ${torch_configs[*]} (MB:ACCUM), T $T; initial weights"
  rm -rf "$WORK/hf4b"
  local clip=()
  [ "${TABLE_TORCH_CLIP:-0}" = 1 ] && clip=(--clip-too)
  within $(( $(left) - n_ours * OURS_S )) python3 bench/torch_train_bench.py compile \
    --mb "${torch_configs[0]%%:*}" --accum "${torch_configs[0]##*:}" ${spec:+--also "$spec"} --T "$T" \
    --save-hf "$WORK/hf4b" --budget $(( $(left) - n_ours * OURS_S - 10 )) "${clip[@]}"
  echo "exit $?"
  for spec in "${torch_configs[@]}"; do mark torch-compile "${spec%%:*}" "${spec##*:}" no-time; done

  local variant label sets
  for variant in "ours-bf16:" ${TABLE_OURS_SETS:-}; do
    label=${variant%%:*}
    sets=()
    [ -n "${variant#*:}" ] && { label=ours-bf16+$label; IFS=, read -r -a sets <<< "${variant#*:}"; }
    for spec in "${configs[@]}"; do
      [ "$label" != ours-bf16 ] && [ -n "${TABLE_VARIANT_CONFIGS:-}" ] &&
        [[ " $TABLE_VARIANT_CONFIGS " != *" $spec "* ]] && continue
      section "$label: mb ${spec%%:*}, ${spec##*:} micro-batches a step, T $T"
      local extra=()
      for kv in "${sets[@]}"; do extra+=(--set "$kv"); done
      within "$OURS_S" python3 bench/ours_train_bench.py train --mb "${spec%%:*}" \
        --accum "${spec##*:}" --T "$T" --budget $(( OURS_S - 5 )) --init-hf "$WORK/hf4b" \
        --shard "$WORK/random_2m.h5" --work "$WORK" --label "$label" -- "${extra[@]}"
      echo "exit $?"
    done
  done
  rm -rf "$WORK/hf4b" "$WORK"/out_*/ckpt
}

main 2>&1 | tee "$OUT/train_table.txt"
echo
echo "gpu label: $(gpu_label_summary)" | tee -a "$OUT/train_table.txt"
python3 - "$RESULTS" <<'PY' | tee -a "$OUT/train_table.txt"
import sys
sys.path.insert(0, "bench")
from bench_common import print_table, read_results
rows = read_results(sys.argv[1])
for r in rows:   # allocated memory over the model state: torch's max_memory_allocated, ours' count
    if "over_state_alloc_gib" in r:
        r["over_state_gib"] = r["over_state_alloc_gib"]
print_table(rows,
            [("system", "system", None), ("mb", "mb", None), ("T", "T", None),
             ("accum", "accum", None), ("step s", "step_s", "{:.3f}".format),
             ("tok/s", "tok_s", "{:.0f}".format), ("MFU", "mfu", "{:.1%}".format),
             ("allocated over the model state, GiB", "over_state_gib", "{:.1f}".format)],
            "tok_s")
PY
