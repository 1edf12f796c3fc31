#!/usr/bin/env bash
# Builds (via setup.sh) and runs the CI tests: labels unit, mpi and slurm, then unit under
# the sanitizers and fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
source scripts/env.sh
cd build
ctest -L 'unit|mpi|slurm' --output-on-failure --timeout 900 "$@"
cd ..
# the unit tests again under AddressSanitizer + UndefinedBehaviorSanitizer, then every fuzz target
# for a short time from its seed corpus (tests/fuzz/), built with clang + libFuzzer (~6 min on
# 2 cores, builds included)
cmake -S . -B build-sanitize -DQWEN3_SANITIZE=ON -DQWEN3_CUDA=OFF >/dev/null
cmake --build build-sanitize -j"$(nproc)" >/dev/null
(cd build-sanitize && ctest -L unit --output-on-failure --timeout 900)
cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DQWEN3_FUZZ=ON -DQWEN3_SANITIZE=ON \
  -DQWEN3_CUDA=OFF >/dev/null
cmake --build build-fuzz -j"$(nproc)" >/dev/null
(cd build-fuzz && ctest -L fuzz -j"$(nproc)" --output-on-failure --timeout 300)
