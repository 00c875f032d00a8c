"""The single entry point of the benchmarks: runs every benchmark, then plots the results.

    python benchmarks/run.py                      # quick CPU run (the default)
    python benchmarks/run.py --full               # full grid on the CPU
    python benchmarks/run.py --full --device cuda
    bash benchmarks/run_gpu.sh [--full]           # GPU machine without a registry: wheels, build, tests, this

Results go to ``benchmarks/results/<device-slug>/`` (or ``--out``): per benchmark a JSON and a CSV
file, and their plots. The script first re-executes itself once with glibc malloc settings that keep
large freed blocks resident (``common.TIMING_MALLOC_ENV``: without them fresh outputs page-fault on
every call, which dominates some CPU timings); ``--default-malloc`` keeps glibc's defaults. Either
way the setting is recorded in each JSON's ``meta["malloc"]``; CPU memory is measured in
subprocesses with their own setting.

``python benchmarks/render_readme_table.py --write README.md`` then puts the committed results in
the README.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import common

# Benchmark modules of this folder, run in this order. Each has ``main(argv) -> Path`` that takes
# ``--device cpu|cuda``, ``--quick``, ``--out DIR`` (and ``--peers`` where it measures peers, named
# in its ``PEERS``) and returns the JSON file it wrote.
BENCH_NAMES = {"lif": "bench_lif", "losses": "bench_losses", "train_step": "bench_train_step"}  # --only's names
BENCHES = tuple(BENCH_NAMES.values())


def peers_for(module, peers: str) -> str:
    """The part of a ``--peers`` list that ``module`` measures ('none' if no name is its peer), so one
    list can name the peers of several benchmarks."""
    if peers.strip().lower() == "none":
        return "none"
    names = [name.strip().lower() for name in peers.split(",") if name.strip()]
    known = getattr(module, "PEERS", ())
    unknown = sorted(set(names) - {peer for bench in BENCHES for peer in getattr(importlib.import_module(bench),
                                                                                  "PEERS", ())})
    if unknown:
        raise SystemExit(f"--peers: unknown peer(s) {', '.join(unknown)}")
    return ",".join(name for name in names if name in known) or "none"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="small grids, a few minutes on a laptop (the default)")
    grid.add_argument("--full", action="store_true", help="the full grids")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-slug>/)")
    parser.add_argument("--peers", help="comma-separated peers to measure, of any benchmark, or 'none' (default: all)")
    parser.add_argument("--only", type=lambda text: common.parse_names(text, tuple(BENCH_NAMES), "benchmark"),
                        default=tuple(BENCH_NAMES),
                        help=f"comma-separated benchmarks to run, in the given order (default: {','.join(BENCH_NAMES)})")
    parser.add_argument("--resume", action="store_true",
                        help="each benchmark keeps the rows of its JSON already in the output folder from the same "
                             "commit and device and measures only the cases it lacks (a run cut short goes on)")
    parser.add_argument("--losses", help="bench_losses only: comma-separated losses (its --losses)")
    parser.add_argument("--dtypes", help="bench_losses only: comma-separated dtypes of its grid (its --dtypes)")
    common.add_default_malloc_option(parser)
    common.add_sample_budget_option(parser)
    args = parser.parse_args(argv)
    # Before the first benchmark: a later one's load average still holds the earlier ones' load.
    common.mark_run_start()

    bench_argv = ["--device", args.device]
    bench_argv += [] if args.full else ["--quick"]
    bench_argv += ["--out", str(args.out)] if args.out else []
    bench_argv += ["--resume"] if args.resume else []
    bench_argv += ["--sample-budget-s", str(args.sample_budget_s)] if args.sample_budget_s else []

    start = time.perf_counter()
    written = []
    for name in (BENCH_NAMES[only] for only in args.only):
        module = importlib.import_module(name)
        argv_for = bench_argv + (["--peers", peers_for(module, args.peers)] if args.peers else [])
        if name == "bench_losses":
            argv_for += [arg for option, value in (("--losses", args.losses), ("--dtypes", args.dtypes)) if value
                         for arg in (option, value)]
        print(f"=== {name} {' '.join(argv_for)}")
        bench_start = time.perf_counter()
        written.append(module.main(argv_for))
        print(f"=== {name} done in {time.perf_counter() - bench_start:.0f} s")
        if json.loads(written[-1].read_text())["meta"].get("interrupted"):
            print("=== interrupted: the remaining benchmarks are not run")
            break

    import plot  # after the benchmarks: matplotlib is not needed to measure

    print("=== plot")
    plot.main([str(folder) for folder in dict.fromkeys(path.parent for path in written)])
    print(f"=== done in {time.perf_counter() - start:.0f} s")
    return common.exit_status(written)  # 1 if one of our kernels failed on a case (recorded in the JSON)


if __name__ == "__main__":
    common.reexec_with_timing_malloc()
    sys.exit(main())
