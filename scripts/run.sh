#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the main job: the CPU benchmark of every
# backend against the pure-PyTorch reference and the peers (SpikingJelly, snntorch, torch.compile),
# printing tables and writing JSON/CSV/PNG to benchmarks/results/<cpu>/. Extra arguments go to
# benchmarks/run.py (e.g. --full, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec "${SNNKD_VENV:-.venv}/bin/python" benchmarks/run.py "$@"
