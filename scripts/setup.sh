#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install snnkd_fast with everything the tests,
# benchmarks and examples need. Idempotent: a second run only rebuilds the extension.
#   SNNKD_VENV   where the venv lives (default: .venv in the repo root)
#   FORCE_CUDA=1 also build the CUDA kernels when torch has no CUDA (compile check only)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SNNKD_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# torch: keep whatever torch is present (a GPU machine brings its own CUDA build); otherwise the
# CPU build. Never let a dependency resolve plain `torch` (that pulls a multi-GB CUDA build).
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q ninja numpy pytest hypothesis tqdm matplotlib scipy loguru scikit-learn
# Triton publishes wheels for Linux only: elsewhere (macOS) the triton backend reports itself
# unavailable (snnkd_fast.backends() says why) and the tests of it skip.
"$PY" -m pip install -q triton || echo "setup.sh: triton could not be installed here; the triton backend will be unavailable" >&2
# Peers used by the parity tests and benchmarks: --no-deps, or they would replace torch.
"$PY" -m pip install -q --no-deps spikingjelly==2.0.0 snntorch
"$PY" -m pip install -q --no-build-isolation -e .
