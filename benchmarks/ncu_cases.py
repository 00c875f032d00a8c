"""Hardware-counter profiles (Nsight Compute) of the kernels whose GPU times their byte counts do not
explain: the questions benchmarks/GPU_NOTES.md left open for want of counters.

- the CUDA HTA head (one block per row at 4x256x32000; the split head at 4x64x128000, whose 8 reads
  average 32 us where streaming the row from L2 needs a few): instructions per class, stall reasons;
- the saved-H neuron pair in bf16 (68-75% of the HBM peak where fp32 reaches 78-86%);
- the lean neuron backward (H recharged from x; as slow in bf16 as in fp32: issue-bound?);
- the NLD forward (its noise: ~4 SM-cycles per element).

Each case runs one fwd+bwd (kernel_breakdown.py's cases) between cudaProfilerStart and
cudaProfilerStop after a warm-up, so ``ncu --profile-from-start off`` sees only those launches, and
``-k regex:`` (``--list`` gives each case's) only ours. run_gpu.sh ``--ncu`` runs them all:

    python benchmarks/ncu_cases.py --list                          # NAME=KERNEL_REGEX lines
    ncu --profile-from-start off -k regex:... -o rep python benchmarks/ncu_cases.py --case NAME
    ncu --import rep.ncu-rep --csv --page details --print-units base > ncu_NAME.csv
    python benchmarks/ncu_cases.py --summarize DIR                 # ncu_*.csv -> table, ncu_summary.json
    python benchmarks/ncu_cases.py --case NAME --device cpu --smoke  # the case's step on the CPU, no profiler

The summary gives per kernel: its duration, thread instructions executed per element of the case
(a class of the [T, B, C] loss, a neuron-step of the layer), warps issued per scheduler cycle (at
most 1), achieved occupancy, registers, DRAM throughput and the three largest stall reasons (warp
cycles per issued instruction).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
import kernel_breakdown  # noqa: E402

# name -> (op, shape, dtype, kernel-name regex for ncu -k, extra lif_multistep kwargs)
CASES = {
    "hta_head_256x32000": ("hta_kl", (4, 256, 32000), torch.float32, "hta_|kd_forward|kd_backward", {}),
    "hta_head_64x128000": ("hta_kl", (4, 64, 128000), torch.float32, "hta_|kd_forward|kd_backward", {}),
    "lif_saved_h_bf16": ("lif", (16, 64, 128, 32, 32), torch.bfloat16, "forward_kernel|backward_kernel", {}),
    "lif_lean_fp32": ("lif", (16, 64, 128, 32, 32), torch.float32, "forward_kernel|backward_from_x",
                      {"recompute_h": True}),
    "nld_per_timestep": ("nld_loss", (4, 256, 32000), torch.float32, "nld_", {}),
}
SMOKE_SHAPES = {"lif": (2, 3, 70), "loss": (2, 3, 40)}
# Nsight Compute sections and raw metrics asked for (run_gpu.sh passes them to ncu)
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "SchedulerStats", "WarpStateStats")
METRICS = ("smsp__thread_inst_executed.sum", "smsp__inst_executed.sum", "dram__bytes_read.sum",
           "dram__bytes_write.sum", "gpu__time_duration.sum")
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def elements(name: str) -> int:
    """A loss case's classes (T * B * C), a neuron case's neuron-steps."""
    return math.prod(CASES[name][1])


def build_step(name: str, device: torch.device, smoke: bool):
    op, shape, dtype, _, kwargs = CASES[name]
    backend = "cuda" if device.type == "cuda" else "cpp"
    if op == "lif":
        return kernel_breakdown.lif_case(SMOKE_SHAPES["lif"] if smoke else shape, dtype, device, backend, **kwargs)
    return kernel_breakdown.loss_case(op, SMOKE_SHAPES["loss"] if smoke else shape, dtype, device, backend)


def run_case(name: str, device: torch.device, smoke: bool) -> None:
    step = build_step(name, device, smoke)
    for _ in range(3):  # warm-up: JIT, allocator, the first launches' module loads stay unprofiled
        step()
    if device.type != "cuda":
        step()
        return
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def read_ncu_csv(path: Path) -> list[dict]:
    """Per profiled kernel (ncu's ID order): its name, block and grid sizes and {metric name: value}
    from ``ncu --csv --page details --print-units base`` (lines before the header, e.g. ==PROF==
    messages, are skipped)."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(lines[start:]):
        kernel = kernels.setdefault(row["ID"], {"name": row["Kernel Name"], "block": row.get("Block Size", ""),
                                                "grid": row.get("Grid Size", ""), "metrics": {}})
        kernel["metrics"][row["Metric Name"]] = _number(row["Metric Value"])
    return [kernels[key] for key in sorted(kernels, key=int)]


def summarize_kernel(kernel: dict, n_elements: int) -> dict:
    m = kernel["metrics"]
    stalls = {key[len(STALL_PREFIX):-len(STALL_SUFFIX)]: value for key, value in m.items()
              if key.startswith(STALL_PREFIX) and key.endswith(STALL_SUFFIX) and not math.isnan(value)}
    duration_ns = m.get("gpu__time_duration.sum", m.get("Duration", float("nan")))
    thread_inst = m.get("smsp__thread_inst_executed.sum", float("nan"))
    return {
        "kernel": kernel["name"].split("(")[0][:90],
        "block": kernel["block"], "grid": kernel["grid"],
        "us": duration_ns / 1e3,
        "thread_inst_per_element": thread_inst / n_elements if n_elements else float("nan"),
        "issued_per_scheduler_cycle": m.get("Issued Warp Per Scheduler", float("nan")),
        "achieved_occupancy_pct": m.get("Achieved Occupancy", float("nan")),
        "registers": m.get("Registers Per Thread", float("nan")),
        "dram_GB": (m.get("dram__bytes_read.sum", float("nan")) + m.get("dram__bytes_write.sum", float("nan"))) / 1e9,
        "dram_throughput_pct": m.get("DRAM Throughput", float("nan")),
        "top_stalls": sorted(stalls.items(), key=lambda item: -item[1])[:3],
    }


def summarize(folder: Path) -> dict:
    summary = {}
    for path in sorted(folder.glob("ncu_*.csv")):
        name = path.stem[len("ncu_"):]
        if name not in CASES:
            continue
        summary[name] = [summarize_kernel(kernel, elements(name)) for kernel in read_ncu_csv(path)]
    return summary


def print_summary(summary: dict) -> None:
    for name, rows in summary.items():
        print(f"\n{name} ({elements(name):,} elements)")
        print(f"{'kernel':60s} {'us':>8s} {'inst/elt':>8s} {'issue':>6s} {'occ%':>5s} {'regs':>4s} "
              f"{'DRAM%':>5s}  top stalls (cycles per issued instruction)")
        for r in rows:
            stalls = ", ".join(f"{k} {v:.2f}" for k, v in r["top_stalls"])
            print(f"{r['kernel'][:60]:60s} {r['us']:8.1f} {r['thread_inst_per_element']:8.1f} "
                  f"{r['issued_per_scheduler_cycle']:6.2f} {r['achieved_occupancy_pct']:5.1f} {r['registers']:4.0f} "
                  f"{r['dram_throughput_pct']:5.1f}  {stalls}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print NAME=KERNEL_REGEX per case")
    parser.add_argument("--ncu-args", action="store_true", help="print the --section/--metrics arguments for ncu")
    parser.add_argument("--case", choices=sorted(CASES), help="run one case's fwd+bwd inside the profiler range")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (with --device cpu: a dry run)")
    parser.add_argument("--summarize", type=Path, metavar="DIR", help="read DIR/ncu_<case>.csv, print and write "
                        "DIR/ncu_summary.json")
    args = parser.parse_args()
    if args.list:
        for name, case in CASES.items():
            print(f"{name}={case[3]}")
        return 0
    if args.ncu_args:
        print(" ".join([f"--section {s}" for s in SECTIONS] + ["--metrics", ",".join(METRICS) +
                       f",regex:{STALL_PREFIX}.*{STALL_SUFFIX.replace('.', '[.]')}"]))
        return 0
    if args.summarize:
        summary = summarize(args.summarize)
        print_summary(summary)
        meta = {"op": "ncu_summary", "git_commit": common.git_commit(), "command": " ".join(sys.argv),
                "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "elements": {name: elements(name) for name in summary}}
        (args.summarize / "ncu_summary.json").write_text(json.dumps({"meta": meta, "cases": summary}, indent=1)
                                                         + "\n")
        return 0 if summary else 1
    if args.case:
        run_case(args.case, torch.device(args.device), args.smoke)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
