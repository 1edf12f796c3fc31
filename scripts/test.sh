#!/usr/bin/env bash
# Builds (via setup.sh) and runs the CI tests: labels unit and mpi.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cd build
ctest -L 'unit|mpi' --output-on-failure --timeout 900 "$@"
