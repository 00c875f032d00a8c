#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the main job on the CPU:
#   1. the quick benchmark of every backend against the pure-PyTorch reference and the peers
#      (SpikingJelly, snntorch, torch.compile), printing tables and writing JSON/CSV/PNG to
#      benchmarks/results/<cpu>/ (benchmarks/run.py; extra arguments go there, e.g. --full);
#   2. the end-to-end distillation example on real data (python -m snnkd_fast.examples.distill),
#      printing its accuracy table and writing examples_out/distill_digits/.
# SNNKD_SKIP_BENCH=1 or SNNKD_SKIP_DEMO=1 skips a part.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY="${SNNKD_VENV:-.venv}/bin/python"
if [ "${SNNKD_SKIP_BENCH:-0}" != "1" ]; then
  "$PY" benchmarks/run.py "$@"
fi
if [ "${SNNKD_SKIP_DEMO:-0}" != "1" ]; then
  "$PY" -m snnkd_fast.examples.distill
fi
