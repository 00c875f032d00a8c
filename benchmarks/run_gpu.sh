#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and no package registry (e.g. the device tool's
# nvidia-h100-x1 / nvidia-h200): install the carried peer wheels, build the extension in place on
# the machine's own CUDA build of torch, run the GPU tests, run the GPU benchmarks.
#
#   bash benchmarks/run_gpu.sh [--quick | --full] [--out DIR] [--skip-wheels] [--skip-build]
#                              [--skip-tests] [--skip-bench] [--deadline-s N] [--tune] [--ab] [--breakdown]
#                              [--ncu]
#                              [--resume]
#                              [-- RUN_PY_ARGS...]
#
# Peers: the GPU machine has torch, triton, pytest, matplotlib, hypothesis, ... but none of
# SpikingJelly, snntorch, Liger-Kernel and loguru. Bring their wheels (cp312, manylinux x86_64) in
# .whl/ of the checkout. On a machine with registry access, from the repository root:
#
#   bash ../shared/tools/gpu-wheels.sh    # pip-downloads spikingjelly==2.0.0, snntorch, liger-kernel
#                                         # and loguru (--no-deps) into .whl/ (git-ignored)
#
# .whl/ is ignored by git, so the device tool carries it only when asked: run
#   command="bash benchmarks/run_gpu.sh", carry=[".whl"]
# Without .whl/ everything still runs; the missing peers are printed, their benchmark columns are
# skipped with the reason, and the tests that need them are skipped.
#
# Steps (each one's failure is reported and the later ones are still attempted; the exit status is
# 1 if any failed):
#   1. gpu      nvidia-smi and torch's view of the GPU
#   2. wheels   pip install --no-index --no-deps --target $HOME/pysite .whl/*.whl; PYTHONPATH
#   3. build    setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST default 9.0, MAX_JOBS default 16;
#               snnkd_fast is imported from the checkout through PYTHONPATH, no pip install), then the
#               slowest compile steps from ninja's log. torch is never installed or pinned: the
#               machine's own CUDA build is used.
#   4. tests    pytest tests -q --maxfail=25 -k "(cuda or triton) and not kernels_compile and not emulated" (real Triton kernels:
#               TRITON_INTERPRET unset; the nvcc compile checks and the CPU emulation of the CUDA kernels are
#               skipped, the build just compiled
#               everything), stopped after TEST_BUDGET_S seconds (default 300) so that the benchmark
#               still runs inside one device call: ~1,800 tests, each new Triton specialization a JIT
#               compile. Up to 25 failures are collected (not -x: one session should see them all).
#               TEST_K overrides the -k expression (e.g. TEST_K=cuda for the CUDA kernels only).
#   5. bench    benchmarks/run.py --device cuda --quick (default) or --full, RUN_PY_ARGS appended. With
#               --deadline-s N (or DEADLINE_S=N) the benchmark gets what is left of N seconds since the
#               script started (less 20 s): SIGINT then, and the benchmark running writes the rows it
#               has measured (meta["interrupted"]) and run.py runs no further one. RUN_PY_ARGS
#               `--sample-budget-s 0.05` halves the seconds of samples per pass (losses: 0.1 s on a
#               GPU, ~5 s per full-grid case with every peer): the full loss grid in about one call.
#
#   4b. tune    (--tune, between the tests and the benchmark) benchmarks/tune_triton.py: sweeps the
#               Triton kernels' launch shapes (warps, blocks) against the CUDA kernels,
#               tune_triton.json in the results folder (~2-3 min).
#
#   4c. ab      (--ab, before the benchmark) benchmarks/ab_neuron_pairs.py --device cuda: the neurons'
#               saved-H kernel pair against the lean pair (H recharged from x in the backward), device
#               time, fp32 and bf16; ab_neuron_pairs.json in the results folder (~20-40 s). The cuda
#               backend runs the saved-H pair until this shows the lean pair's gain on a GPU. Then
#               benchmarks/ab_env.py --device cuda: the losses' fwd+bwd wall time with the forward
#               forming the student's gradient and without (SNNKD_CUDA_KD_NO_FORWARD_GRAD=1), fp32
#               and bf16, alternating processes; ab_env.json (~1 min).
#
#   4d. breakdown (--breakdown, before the benchmark) benchmarks/kernel_breakdown.py --device cuda: each
#               loss and the neuron at the grids' large shapes under torch.profiler, each kernel's device
#               time per fwd+bwd (cuda and triton, fp32 and bf16); kernel_breakdown.json (~20 s), then
#               again under SNNKD_CUDA_KD_UNPACKED=1 (the CUDA loss kernels one class per access, the HTA
#               head one 256-thread block per row): kernel_breakdown_unpacked.json, an A/B in one build,
#               and under SNNKD_CUDA_KD_NO_FORWARD_GRAD=1 (the row backward instead of the gradient formed
#               by the forward): kernel_breakdown_row_backward.json.
#
#   4e. ncu     (--ncu, before the benchmark) Nsight Compute on benchmarks/ncu_cases.py's cases (the HTA head
#               one block per row and split, the bf16 saved-H and fp32 lean neuron pairs, NLD's forward):
#               one fwd+bwd each, our kernels only (-k), --clock-control none; ncu_<case>.csv (details page)
#               and ncu_summary.json (instructions per element, issue rate, occupancy, top stalls) in
#               the results folder. Skipped with a message where ncu is missing or cannot read the counters
#               (gVisor machines); NCU_CASE_TIMEOUT_S (default 150) bounds each case.
#
#   5b. resume  (--resume) the results of this machine's previous run (kept in build/run_gpu/, since
#               the device tool empties $OUT before each call) are put back in the results folder and
#               run.py gets --resume: each benchmark keeps its rows from the same commit and measures
#               only the cases its earlier, deadline-stopped run lacked. E.g. a warm second call:
#               bash benchmarks/run_gpu.sh --full --skip-build --skip-tests --resume -- --only losses
#
# With pytest-xdist installed (the GPU image has it) the tests run in TEST_WORKERS processes (default:
# the cores less two, at most 14): most of their time is Triton's JIT compiling kernel
# specializations, on the CPU cores (16 cores, 14 workers: 1,639 tests in 88 s on the H100 machine).
#
# Output: results in --out DIR, else $OUT/<gpu-slug>/ when $OUT is set (the device tool copies $OUT
# back: copy that folder to benchmarks/results/), else benchmarks/results/<gpu-slug>/. Logs
# (run_gpu.log: everything printed; build.log, kept under $OUT only when the build failed;
# pytest.log) go to $OUT, else build/run_gpu/. Under $OUT the results folder is packed into one
# $OUT/<gpu-slug>.tar at the end, since the device tool brings back 8 files at most: `tar -xf` it in
# benchmarks/results/ (`python benchmarks/plot.py DIR` also redraws the plots from the JSON files).
#
# PYTHON (default python3) names the interpreter: the one whose torch is the machine's CUDA build.
# SNNKD_GIT_COMMIT stamps the results with the commit that was sent (the device tool's copy of the
# tree carries a stale .git): commit first, then SNNKD_GIT_COMMIT=$(git rev-parse HEAD) in the command.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}
PEERS=(spikingjelly snntorch liger_kernel loguru)  # import names of the peers .whl/ should hold

GRID=--quick
DEADLINE_S=${DEADLINE_S:-}
RESULTS=""
SKIP_WHEELS=0 SKIP_BUILD=0 SKIP_TESTS=0 SKIP_BENCH=0 TUNE=0 AB=0 BREAKDOWN=0 NCU=0 RESUME=0
RUN_PY_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --quick|--full) GRID=$1 ;;
    --out) RESULTS=${2:?--out needs a folder}; shift ;;
    --skip-wheels) SKIP_WHEELS=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --deadline-s) DEADLINE_S=${2:?--deadline-s needs seconds}; shift ;;
    --tune) TUNE=1 ;;
    --ab) AB=1 ;;
    --breakdown) BREAKDOWN=1 ;;
    --ncu) NCU=1 ;;
    --resume) RESUME=1 ;;
    --) shift; RUN_PY_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) RUN_PY_ARGS+=("$1") ;;  # anything else goes to run.py (e.g. --peers none)
  esac
  shift
done

LOG_DIR=${OUT:-$REPO/build/run_gpu}
mkdir -p "$LOG_DIR" || exit 1
LOG_DIR=$(cd "$LOG_DIR" && pwd)

FAILED=()
step() {  # step NAME FUNCTION: run it, time it, record a failure, never stop the script
  local name=$1 start=$SECONDS rc
  shift
  echo
  echo "=== [$name] $(date -u +%H:%M:%S)"
  "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "=== [$name] ok ($((SECONDS - start)) s)"
  else
    echo "=== [$name] FAILED (exit status $rc, $((SECONDS - start)) s)"
    FAILED+=("$name")
  fi
}

prepend_pythonpath() {
  export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}"
}

check_gpu() {
  local ok=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || ok=1
  else
    echo "nvidia-smi not found: no NVIDIA driver on this machine; the CUDA build, the GPU tests and the GPU"
    echo "benchmark will fail or be skipped (the later steps are still attempted)"
    ok=1
  fi
  "$PY" -c 'import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
raise SystemExit(0 if torch.cuda.is_available() else 3)' || ok=1
  return $ok
}

install_wheels() {
  local wheels=() missing=() peer
  shopt -s nullglob
  wheels=(.whl/*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in .whl/ (fetch them with bash ../shared/tools/gpu-wheels.sh, carry .whl)"
  else
    echo "installing ${#wheels[@]} wheel(s) into $HOME/pysite: ${wheels[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$HOME/pysite" "${wheels[@]}" || return 1
  fi
  if [ ${#wheels[@]} -gt 0 ] || [ -d "$HOME/pysite" ]; then
    prepend_pythonpath "$HOME/pysite"
    echo "PYTHONPATH=$PYTHONPATH"
  fi
  for peer in "${PEERS[@]}"; do
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$peer') is None)" 2>/dev/null \
      || missing+=("$peer")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing peers: ${missing[*]} (their benchmark columns and tests are skipped)"
  else
    echo "all peers importable: ${PEERS[*]}"
  fi
  return 0  # a missing peer is no failure
}

build_extension() {
  local log=$LOG_DIR/build.log ninja_log lines_before=0
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS (output in $log)"
  : >"$log"
  # In place, no pip: snnkd_fast is importable through PYTHONPATH=$REPO, and the objects and ninja's
  # log stay in build/ -- a warm machine's rebuild after a change recompiles only what changed, and
  # the slowest compile steps are printed (the build's critical path on 16 cores).
  ninja_log=$(find build -name .ninja_log 2>/dev/null | head -n 1)
  [ -n "$ninja_log" ] && lines_before=$(wc -l <"$ninja_log")
  if ! "$PY" setup.py build_ext --inplace >>"$log" 2>&1; then
    echo "setup.py build_ext --inplace failed; its last lines:"
    tail -n 40 "$log"
    return 1
  fi
  # under $OUT a successful build's log is dropped: the device tool brings back 8 files at most
  [ -n "${OUT:-}" ] && rm -f "$log"
  ninja_log=$(find build -name .ninja_log 2>/dev/null | head -n 1)
  if [ -n "$ninja_log" ]; then
    echo "slowest compile steps (ninja's log):"
    tail -n +"$((lines_before + 1))" "$ninja_log" | awk -F'\t' '$1 ~ /^[0-9]+$/ {printf "  %6.1f s  %s\n", ($2 - $1) / 1000, $4}' \
      | sort -rn | head -n 6 | sed "s|$REPO/||"
  else
    echo "no ninja log: built without ninja (one file at a time, MAX_JOBS unused)"
  fi
  report_backends
}

report_backends() {  # which backends the build made available (the CUDA one above all)
  "$PY" -c 'import snnkd_fast
for name, status in snnkd_fast.backends().items():
    state = "available" if status.available else "NOT available: " + status.reason
    print(f"  backend {name}: {state}")
raise SystemExit(0 if snnkd_fast.backends()["cuda"].available else 4)'
}

run_tests() {
  local log=$LOG_DIR/pytest.log rc budget=${TEST_BUDGET_S:-300} k=${TEST_K:-(cuda or triton) and not kernels_compile and not emulated}
  local workers=()
  unset TRITON_INTERPRET  # the real Triton kernels on the GPU, not the interpreter
  # default: all cores but two, at most 14 (16-core device machines: the whole GPU selection in ~90 s)
  local cores
  cores=$(nproc 2>/dev/null || echo 4)
  cores=$((cores > 16 ? 14 : (cores > 4 ? cores - 2 : 2)))
  if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-$cores}"); fi
  echo "$PY -m pytest tests -q ${workers[*]} --maxfail=25 -k \"$k\" -p no:cacheprovider, at most $budget s (output in $log)"
  # SIGINT after the budget: pytest stops and still prints its summary of what ran
  timeout -s INT -k 20 "$budget" "$PY" -m pytest tests -q "${workers[@]}" --maxfail=25 -k "$k" -p no:cacheprovider -rfs \
    >"$log" 2>&1
  rc=$?
  tail -n 40 "$log"
  if [ "$rc" -eq 124 ]; then
    echo "tests stopped after the ${budget} s budget (rerun with TEST_K to cover the rest)"
    # what ran before the budget decides: a failure among it is a failure of the step
    if grep -qE "[0-9]+ (failed|error)" "$log"; then return 1; fi
    return 0
  fi
  return $rc
}

gpu_slug() {  # the folder name common.device_slug gives this GPU, else one from nvidia-smi's name
  local slug name
  slug=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks")
import torch, common
print(common.device_slug(torch.device("cuda")))' 2>/dev/null | tail -n 1)
  if [ -z "$slug" ]; then
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    slug=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
  fi
  echo "${slug:-no-gpu}"
}

KEEP_DIR=$REPO/build/run_gpu  # survives between calls on a warm machine (git-ignored), unlike $OUT

restore_results() {  # --resume: the previous run's packed results back into the results folder
  local kept="$KEEP_DIR/$(basename "$RESULTS").tar"
  [ -n "${OUT:-}" ] || return 0  # without $OUT the results folder itself persists
  if [ -f "$kept" ]; then
    mkdir -p "$(dirname "$RESULTS")" && tar -xf "$kept" -C "$(dirname "$RESULTS")" \
      && echo "resuming from $kept: $(ls "$RESULTS" | tr '\n' ' ')"
  else
    echo "--resume: no $kept on this machine (a fresh machine): the benchmarks start from the beginning"
  fi
}

run_bench() {
  local rc limit=() command=("$PY" benchmarks/run.py --device cuda "$GRID" --out "$RESULTS" "${RUN_PY_ARGS[@]}")
  [ $RESUME -eq 0 ] || command+=(--resume)  # main restored the previous run's results first
  if [ -n "$DEADLINE_S" ]; then
    limit=(timeout -s INT -k 30 $((DEADLINE_S - SECONDS - 20 > 30 ? DEADLINE_S - SECONDS - 20 : 30)))
    echo "deadline: at most ${limit[5]} s for the benchmark"
  fi
  echo "${command[*]}"
  "${limit[@]}" "${command[@]}"
  rc=$?
  [ -d "$RESULTS" ] && ls -l "$RESULTS"
  if [ "$rc" -eq 124 ]; then  # the deadline, as asked: not a failure (failures of our kernels are in the JSON)
    echo "the benchmark stopped at its deadline: the cases measured are written (meta.interrupted);"
    echo "a warm second call with --resume measures the rest"
    return 0
  fi
  return $rc
}

run_ab() {
  "$PY" benchmarks/ab_neuron_pairs.py --device cuda --out "$RESULTS" || return 1
  "$PY" benchmarks/ab_env.py --device cuda --out "$RESULTS"
}

run_breakdown() {
  "$PY" benchmarks/kernel_breakdown.py --device cuda --out "$RESULTS" || return 1
  # the same cases with the loss row kernels one class per access and the HTA head in one 256-thread
  # block per row (their forms before 4fbf389/14514f6/f42f117 and the split head): an A/B in one build
  SNNKD_CUDA_KD_UNPACKED=1 "$PY" benchmarks/kernel_breakdown.py --device cuda --out "$RESULTS" --variant unpacked \
    || return 1
  # the row backward instead of the student's gradient formed by the forward (before session 19)
  SNNKD_CUDA_KD_NO_FORWARD_GRAD=1 "$PY" benchmarks/kernel_breakdown.py --device cuda --out "$RESULTS" \
    --variant row_backward
}

run_ncu() {
  local ncu line name regex rc=0 reps ncu_args
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
  [ -n "$ncu" ] || { echo "ncu not found: skipped"; return 0; }
  reps=$(mktemp -d)
  read -ra ncu_args <<<"$("$PY" benchmarks/ncu_cases.py --ncu-args)"  # split on blanks, no globbing
  while IFS= read -r line; do
    name=${line%%=*} regex=${line#*=}
    echo "ncu: $name (kernels matching $regex)"
    if timeout "${NCU_CASE_TIMEOUT_S:-150}" "$ncu" --clock-control none --profile-from-start off -k "regex:$regex" \
        "${ncu_args[@]}" -o "$reps/$name" -f "$PY" benchmarks/ncu_cases.py --case "$name" \
        >"$LOG_DIR/ncu_$name.log" 2>&1 \
      && "$ncu" --import "$reps/$name.ncu-rep" --csv --page details --print-units base >"$RESULTS/ncu_$name.csv"; then
      :
    else
      echo "ncu failed on $name: the end of $LOG_DIR/ncu_$name.log --"; tail -5 "$LOG_DIR/ncu_$name.log"; rc=1
    fi
  done < <("$PY" benchmarks/ncu_cases.py --list)
  rm -rf "$reps"
  "$PY" benchmarks/ncu_cases.py --summarize "$RESULTS" || rc=1
  return $rc
}

run_tune() {
  unset TRITON_INTERPRET
  "$PY" benchmarks/tune_triton.py --out "$RESULTS"
}

pack_results() {  # under $OUT: the results folder as one tar (the device tool brings back 8 files at most)
  local parent name
  [ -n "${OUT:-}" ] && [ -d "$RESULTS" ] || return 0
  parent=$(dirname "$RESULTS") name=$(basename "$RESULTS")
  tar -cf "$parent/$name.tar" -C "$parent" "$name" && mkdir -p "$KEEP_DIR" && cp "$parent/$name.tar" "$KEEP_DIR/" \
    && rm -rf "$RESULTS" \
    && echo "packed the results into $parent/$name.tar (tar -xf it in benchmarks/results/)"
}

main() {
  echo "run_gpu.sh in $REPO: python $(command -v "$PY" || echo "'$PY' not found"), grid $GRID, logs in $LOG_DIR"
  prepend_pythonpath "$REPO"  # snnkd_fast importable from anywhere, also after an in-place build
  step gpu check_gpu
  [ $SKIP_WHEELS -eq 1 ] || step wheels install_wheels
  [ $SKIP_BUILD -eq 1 ] || step build build_extension
  [ $SKIP_TESTS -eq 1 ] || step tests run_tests
  if [ -z "$RESULTS" ] && { [ $SKIP_BENCH -eq 0 ] || [ $TUNE -eq 1 ] || [ $AB -eq 1 ] || [ $BREAKDOWN -eq 1 ] \
                           || [ $NCU -eq 1 ]; }; then
    local slug
    slug=$(gpu_slug)
    RESULTS=${OUT:+$OUT/$slug}
    RESULTS=${RESULTS:-$REPO/benchmarks/results/$slug}
  fi
  [ -z "$RESULTS" ] || [ $RESUME -eq 0 ] || restore_results  # before any step writes into the folder
  [ $TUNE -eq 0 ] || step tune run_tune  # before the benchmark, which --deadline-s can cut short
  [ $AB -eq 0 ] || step ab run_ab
  [ $BREAKDOWN -eq 0 ] || step breakdown run_breakdown
  [ $NCU -eq 0 ] || { mkdir -p "$RESULTS" && step ncu run_ncu; }
  [ $SKIP_BENCH -eq 1 ] || step bench run_bench
  pack_results
  echo
  echo "=== total $SECONDS s; $(if [ ${#FAILED[@]} -eq 0 ]; then echo "every step ok"; \
    else echo "FAILED: ${FAILED[*]}"; fi)"
  [ ${#FAILED[@]} -eq 0 ]
}

main 2>&1 | tee "$LOG_DIR/run_gpu.log"
exit "${PIPESTATUS[0]}"
