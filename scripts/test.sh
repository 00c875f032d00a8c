#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run every test: the C++ unit test of the shared
# per-element math through CMake/ctest (which also compiles the CUDA sources where nvcc exists) and
# the pytest suite. Extra arguments go to pytest (e.g. scripts/test.sh -k lif -x).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY="${SNNKD_VENV:-.venv}/bin/python"
# Without a GPU the Triton kernels run in Triton's interpreter on the CPU.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
cmake -S . -B build -DPython3_EXECUTABLE="$(cd "$(dirname "$PY")" && pwd)/python" > build.log 2>&1 || { cat build.log; exit 1; }
cmake --build build -j"$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)" >> build.log 2>&1 || { cat build.log; exit 1; }
ctest --test-dir build --output-on-failure
"$PY" -m pytest tests -q -p no:cacheprovider "$@"
