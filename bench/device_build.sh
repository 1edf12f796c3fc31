#!/usr/bin/env bash
# Builds qwen3-train on the lent GPU machine (Ubuntu, no root package installs): the Debian
# packages it lacks travel as .deb files in .deb/ (apt-get download, see bench/NOTES.md) and are
# unpacked into a prefix of their own. Source it: it exports PATH, LD_LIBRARY_PATH and
# PKG_CONFIG_PATH for the build and the runs that follow. BENCH_BUILT=1 skips the build (a script
# run beside another on a second GPU of the machine, after the call built once).
set -euo pipefail
prefix=/tmp/qwen3-deps
mkdir -p "$prefix"
export PATH="$prefix/usr/bin:$PATH"
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export PKG_CONFIG_PATH="$prefix/usr/lib/x86_64-linux-gnu/pkgconfig:${PKG_CONFIG_PATH:-}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [ "${BENCH_BUILT:-0}" != 1 ]; then
  for f in .deb/*.deb; do dpkg -x "$f" "$prefix"; done
  sed -i "s|^prefix=/usr|prefix=$prefix/usr|" "$prefix"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DQWEN3_CUDA_ARCHS=${QWEN3_CUDA_ARCHS:-90a} | grep "qwen3:" || true
  cmake --build build -j"$(nproc)" 2>&1 | grep -E "error|warning" || true
fi
ls build/qwen3-train build/bench/ckpt_bench >/dev/null
set +e +u +o pipefail
