#!/usr/bin/env bash
# A kernel change against its baseline in one device call: the same benchmark from this tree and
# from this tree with the CUDA kernel files of a baseline commit, both built in the call, run
# alternately (new, old, new, old), so that the machine's drift between calls does not decide.
#
#   here:    bash bench/kernel_ab.sh prepare REF [PATH...]  (REF: the baseline commit, e.g. HEAD)
#            writes the baseline's files under PATH (default kernels/cuda) that differ from this
#            tree into .ab_base/
#   device:  bash bench/kernel_ab.sh run [TARGET [ARGS...]]      carry [".deb", ".ab_base"]
#            TARGET a benchmark of build/bench (default attn_bench), ARGS its arguments
#            (default: none; attn_bench's --budget 8 2048 4096 8192); AB_ROUNDS pairs (default 2)
#            With AB_CMD="COMMAND" the baseline tree builds everything into its build/ and each
#            round runs COMMAND in each tree's root instead (a driver such as
#            bench/decode_bench.py, which runs its own tree's build/qwen3-train); TARGET unused.
#
# Prints the `gpu` label's summary first when AB_CTEST=1 (the new tree's), then each run's
# RESULT lines under "== new" or "== old". .ab_base/ is ignored by git and travels only when a
# call carries it.
set -u
case "${1:-}" in
  prepare)
    ref=${2:?usage: bash $0 prepare REF [PATH...]}
    shift 2
    paths=("${@:-kernels/cuda}")
    rm -rf .ab_base && mkdir -p .ab_base
    n=0
    for f in $(git diff --name-only "$ref" -- "${paths[@]}"); do
      mkdir -p ".ab_base/$(dirname "$f")"
      git show "$ref:$f" > ".ab_base/$f" 2>/dev/null || { rm -f ".ab_base/$f"; continue; }
      n=$((n + 1))
    done
    git rev-parse --short "$ref" > .ab_base/REF
    echo "prepared .ab_base/ from $ref: $n file(s) of ${paths[*]} differ from this tree"
    [ "$n" -gt 0 ] || echo "warning: nothing differs: the two builds will be the same"
    ;;
  run)
    shift
    [ -f .ab_base/REF ] || { echo "no .ab_base/REF: run 'bash $0 prepare REF' here and carry .ab_base"; exit 2; }
    target=${1:-attn_bench}
    [ $# -gt 0 ] && shift
    args=("$@")
    # attn_bench's arguments only for attn_bench: another target given them prints nothing
    [ ${#args[@]} -gt 0 ] || [ "$target" != attn_bench ] || args=(--budget 8 2048 4096 8192)
    nvidia-smi -L 2>/dev/null || { echo "no GPU here: run it on the device machine"; exit 2; }
    source bench/device_build.sh >/tmp/ab_build.txt 2>&1 || { tail -n 20 /tmp/ab_build.txt; exit 1; }
    base=/tmp/kernel_ab
    rm -rf "$base" && mkdir -p "$base"
    tar --exclude=./build --exclude=./.git --exclude=./.ab_base -cf - . | tar -C "$base" -xf -
    (cd .ab_base && find . -type f ! -name REF) | while read -r f; do cp ".ab_base/$f" "$base/$f"; done
    build_dir=b build_target=(--target "$target")
    [ -n "${AB_CMD:-}" ] && build_dir=build build_target=()
    ( cd "$base" && cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DQWEN3_CUDA_ARCHS=90a \
        >/dev/null && cmake --build "$build_dir" "${build_target[@]}" -j"$(nproc)" >/dev/null 2>&1 ) &
    builder=$!
    if [ "${AB_CTEST:-0}" = 1 ]; then
      (cd build && timeout 200 ctest -L gpu --output-on-failure) > /tmp/ab_ctest.txt 2>&1
      grep -E "tests passed|tests failed|\*\*\*Skipped|Failed" /tmp/ab_ctest.txt | tail -n 6
    fi
    wait "$builder" || { echo "the baseline ($(cat .ab_base/REF)) did not build"; exit 1; }
    echo "baseline: $(cat .ab_base/REF)"
    for _ in $(seq "${AB_ROUNDS:-2}"); do
      for side in new old; do
        echo "== $side"
        if [ -n "${AB_CMD:-}" ]; then
          root=.
          [ "$side" = old ] && root=$base
          (cd "$root" && bash -c "$AB_CMD") 2>&1 | grep -E "^RESULT" || echo "(no RESULT line)"
          continue
        fi
        bin=build/bench/$target
        [ "$side" = old ] && bin=$base/b/bench/$target
        "$bin" "${args[@]}" 2>&1 | grep -E "^RESULT" || echo "(no RESULT line)"
      done
    done
    ;;
  *)
    echo "usage: bash $0 prepare REF   |   bash $0 run [TARGET [ARGS...]]" >&2
    exit 2
    ;;
esac
