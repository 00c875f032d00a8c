"""Benchmark of the multi-step LIF neuron: forward, backward and forward+backward.

Measures every backend of ``snnkd_fast.lif_multistep`` that runs natively on the chosen device
(the "torch" reference included) and the peers SpikingJelly 2 ``LIFNode(step_mode="m")`` and
snntorch ``Leaky`` over a grid of shapes, and writes ``lif_<quick|full>.json`` / ``.csv``::

    python benchmarks/bench_lif.py --quick                 # small CPU grid, well under 2 minutes
    python benchmarks/bench_lif.py --device cuda           # full GPU grid, fp32 and bf16
    python benchmarks/bench_lif.py --peers spikingjelly    # or --peers none

What is timed (see ``common.Timer``): "fwd" is the training forward (the input requires grad, so the
state for the backward is saved); "bwd" is ``torch.autograd.backward(out, grad)`` on a graph built
untimed just before; "fwdbwd" is both; on a GPU also "fwdbwd_device", fwd+bwd as device work
(back-to-back launches: the host's overhead shows only where it exceeds the device's). Peak memory
is measured for fwd+bwd only: on CUDA with the caching allocator's peak counter, on CPU as the
peak-RSS growth of one fwd+bwd in a fresh process per case and implementation
(``common.CpuMemoryMeter``: forked from a server, this script in its hidden ``--memory-server``
mode), since a process's peak RSS cannot be attributed to one of many runs. Run as a script, it
first re-executes itself with the timing malloc settings
(``common.TIMING_MALLOC_ENV``; ``--default-malloc`` opts out).

Roofline: the least traffic a fused kernel needs per neuron-step is, forward, read x + write the
spike, and backward, read the spike gradient + read x (H recomputed from it, as our CPU kernels do)
+ write the input gradient: 8 + 12 B in fp32, 4 + 6 B in bf16. Kernels that save the membrane H
instead (float32: our GPU kernels, SpikingJelly) move 4 B more each way. ``achieved_GBps`` divides
that minimum by the measured time for every implementation alike (an effective bandwidth; a peer
that moves more bytes simply scores lower), and ``pct_peak`` relates it to the device's peak.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import common
from common import Timing, default_out_dir

OP = "lif_multistep"
TAU = 2.0
FILE_STEM = "lif"
REFERENCE = "torch"  # snnkd_fast's pure-PyTorch backend: the baseline of every speed-up
# Our backends that are native to each device (see common.native_backends).
DEVICE_BACKENDS = {"cpu": ("torch", "cpp"), "cuda": ("torch", "cuda", "triton")}
PEERS = ("spikingjelly", "snntorch")
PEER_LABELS = {"spikingjelly": "SpikingJelly", "snntorch": "snntorch"}
TABLE_PEERS = ("spikingjelly",)  # the peer with the same semantics has a column in the case tables
# Imported once by the CPU memory server, for every measurement it forks.
# What a peer runs on this device where it chooses itself (recorded in meta["peer_implementations"]).
PEER_IMPLEMENTATIONS: dict[str, Any] = {}
MEMORY_PRELOAD = ("snnkd_fast", "spikingjelly.activation_based.neuron", "snntorch")
NOTES = (
    "spikingjelly: LIFNode(tau=2.0, step_mode='m'), the same LIF as ours (decay_input, hard reset to 0, "
    "'>=' threshold, sigmoid surrogate).",
    "snntorch: a speed/memory peer only: Leaky(beta=1-1/tau) has different semantics (beta*U + X, "
    "subtract reset, '>' threshold, atan surrogate) and is stepped over T in Python.",
)
CSV_COLUMNS = ("op", "case", "layout", "backend", "kind", "pass", "shape", "T", "dtype", "median_ms", "p20_ms",
               "p80_ms", "reps", "peak_mem_bytes", "bytes_min", "achieved_GBps", "pct_peak", "speedup_vs_reference",
               "mem_ratio_vs_reference")  # then one speedup_vs_<peer> column per peer measured


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    layout: str  # "mlp": [T, B, features]; "conv": [T, B, C, H, W]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def steps(self) -> int:
        return self.shape[0]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        return f"{self.layout} {'x'.join(map(str, self.shape[1:]))} T={self.steps} {self.dtype_name}"

    def min_bytes(self, pass_: str) -> int:
        """Least bytes a fused kernel moves for ``pass_`` (see the module docstring)."""
        streams = {"fwd": 2, "bwd": 3, "fwdbwd": 5}[pass_]
        return math.prod(self.shape) * streams * self.dtype.itemsize


def build_grid(device: torch.device, quick: bool) -> list[Case]:
    if quick and device.type == "cuda":
        # A GPU needs millions of neurons to fill: the full grid's conv map and wide MLP, T=4 and 16,
        # fp32, plus bf16 on the conv map.
        conv, mlp = ("conv", (64, 128, 32, 32)), ("mlp", (64, 4096))
        return ([Case(layout, (t, *shape), torch.float32) for layout, shape in (mlp, conv) for t in (4, 16)]
                + [Case(conv[0], (t, *conv[1]), torch.bfloat16) for t in (4, 16)])
    if quick:
        steps, dtypes = (4, 8), (torch.float32,)
        step_shapes = (("mlp", (32, 4096)), ("conv", (8, 64, 16, 16)))
    else:
        steps = (1, 4, 8, 16)
        dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
        # A 64x128x32x32 feature map is 8.4 M neurons: seconds per step for the Python-loop
        # implementations on a few CPU cores, so the CPU grid uses a smaller map.
        conv = (64, 128, 32, 32) if device.type == "cuda" else (32, 64, 16, 16)
        step_shapes = (("mlp", (64, 1024)), ("mlp", (64, 4096)), ("conv", conv))
    return [Case(layout, (t, *step_shape), dtype)
            for dtype in dtypes for layout, step_shape in step_shapes for t in steps]


def make_input(case: Case, device: torch.device) -> torch.Tensor:
    # N(0.5, 1) input current: a realistic share of the neuron-steps spike (about 11% at tau=2),
    # so spike-dependent work in the reference and the peers is exercised as in training.
    x = torch.randn(case.shape, device=device).add_(0.5).to(case.dtype)
    return x.requires_grad_()


# --------------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------------

kind_of = functools.partial(common.implementation_kind, reference=REFERENCE, peers=PEERS)


def make_forward(name: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward(x_seq) -> spikes`` of one implementation, starting from a rested membrane each call.
    Raises (ImportError, ...) when a peer is not installed or does not work here."""
    if name in DEVICE_BACKENDS[device.type]:
        import snnkd_fast

        return lambda x_seq: snnkd_fast.lif_multistep(x_seq, tau=TAU, backend=name)
    if name == "spikingjelly":
        from spikingjelly.activation_based import neuron

        node = neuron.LIFNode(tau=TAU, step_mode="m").to(device)
        # SpikingJelly 2.0 picks its CUDA path itself (native CUDA, Triton or torch): recorded once per run
        # (make_forward runs again for each case's memory measurement)
        if device.type == "cuda" and "spikingjelly" not in PEER_IMPLEMENTATIONS:
            from spikingjelly.activation_based.functional import neuron as sj_functional

            PEER_IMPLEMENTATIONS["spikingjelly"] = sj_functional.neuron_implementation("lif", device)
            print(f"spikingjelly LIF on {device}: {PEER_IMPLEMENTATIONS['spikingjelly']}")

        def spikingjelly_forward(x_seq: torch.Tensor) -> torch.Tensor:
            spikes = node(x_seq)
            # Reset now: the stored final membrane would keep this call's graph alive until the
            # next call, which would then pay for freeing it inside its timed region.
            node.reset()
            return spikes

        return spikingjelly_forward
    if name == "snntorch":
        import snntorch

        leaky = snntorch.Leaky(beta=1.0 - 1.0 / TAU).to(device)

        def snntorch_forward(x_seq: torch.Tensor) -> torch.Tensor:
            mem = leaky.reset_mem()  # snntorch 1.0's name for the deprecated init_leaky()
            spikes = []
            for x_t in x_seq.unbind(0):  # Leaky is single-step: the documented loop over time
                spike, mem = leaky(x_t, mem)
                spikes.append(spike)
            leaky.reset_mem()  # drop the graph-holding membrane the module keeps (as for SpikingJelly)
            return torch.stack(spikes)

        return snntorch_forward
    raise ValueError(f"unknown implementation {name!r}")


def select_implementations(device: torch.device,
                           peers: tuple[str, ...]) -> tuple[dict[str, Callable], dict[str, str]]:
    """({name: forward} in table order, {name: why it is not measured})."""
    import snnkd_fast

    names, skipped = common.native_backends(device, DEVICE_BACKENDS[device.type], snnkd_fast.backends(), REFERENCE)
    forwards = {name: make_forward(name, device) for name in names}
    for name in peers:
        try:
            forwards[name] = make_forward(name, device)
        except Exception as error:  # a missing or broken peer is reported, never fatal
            skipped[name] = f"{type(error).__name__}: {error}"
    return forwards, skipped


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------

def measure_peak_memory(name: str, case: Case, device: torch.device) -> tuple[int, bool]:
    """(bytes one fwd+bwd needs above the inputs, whether the peak counter could be reset first).
    On CPU this must run in a fresh process, as the first fwd+bwd there."""
    forward = make_forward(name, device)
    x = make_input(case, device)
    # A tiny warm-up does one-time set-up (thread pools, lazy module state) that is no cost of
    # the op, and tells the dtype of the spikes, hence of their gradient.
    tiny = x[:1, :1].detach().clone().requires_grad_()
    tiny_out = forward(tiny)
    torch.autograd.backward(tiny_out, torch.ones_like(tiny_out))
    grad = torch.randn(case.shape, dtype=tiny_out.dtype, device=device)
    del tiny, tiny_out
    return common.measure_peak(lambda: torch.autograd.backward(forward(x), grad), device)


def memory_spec(case: Case) -> dict[str, Any]:
    """The case, for a CPU memory measurement in another process (``measure_spec``)."""
    return {"layout": case.layout, "shape": list(case.shape), "dtype": case.dtype_name}


def measure_spec(spec: dict[str, Any]) -> tuple[int, bool]:
    """One CPU memory measurement, in a fresh process (``common.memory_worker_main``)."""
    case = Case(spec["layout"], tuple(spec["shape"]), getattr(torch, spec["dtype"]))
    return measure_peak_memory(spec["backend"], case, torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------

def make_rows(case: Case, name: str, timings: dict[str, Timing], peak_mem: Optional[int],
              peak_bandwidth_bps: float) -> list[dict[str, Any]]:
    def fields(pass_: str) -> dict[str, Any]:
        return {"op": OP, "case": case.label, "layout": case.layout, "backend": name, "kind": kind_of(name),
                "pass": pass_, "shape": list(case.shape), "T": case.steps, "dtype": case.dtype_name}

    return common.pass_rows(fields, timings, peak_mem, case.min_bytes, peak_bandwidth_bps)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return common.bench_parser(__doc__.split("\n\n")[0], "a small fp32 grid (T 4 and 8, two shapes)",
                               PEERS).parse_args(argv)


def main(argv: Optional[list[str]] = None) -> Optional[Path]:
    """Run the benchmark; returns the JSON file written."""
    started = common.script_start(argv, parse_args, measure_spec, MEMORY_PRELOAD)
    if started is None:  # a memory-measuring process: served
        return None
    argv, args, start, device, threads = started
    forwards, skipped = select_implementations(device, args.peers)
    peers = tuple(name for name in args.peers if name in forwards)
    # A GPU case takes milliseconds: 0.25 s of samples is plenty and keeps the full grid inside one
    # device session (the first H100 run's 1 s per pass ran out of time at 14 of 24 cases).
    short = args.quick or device.type == "cuda"
    timer = common.sample_timer(args, device, budget_s=0.25 if short else 1.0, warmup_s=0.05 if short else 0.2)
    on_device = common.device_timer(device, timer.budget_s)  # the DEVICE_PASS on a GPU
    bandwidth, bandwidth_source = common.peak_bandwidth(device, timer)
    # `skipped` is stored by reference in meta: record_case_error adds the peers that fail on a case.
    meta = common.run_metadata(device, argv, threads, op=OP, grid="quick" if args.quick else "full", tau=TAU,
                               reference=REFERENCE, peers=list(peers), skipped=skipped, peak_bandwidth_Bps=bandwidth,
                               peak_bandwidth_source=bandwidth_source, notes=list(NOTES),
                               memory_method=common.memory_method(device), failures={},
                               peer_implementations=PEER_IMPLEMENTATIONS, sample_budget_s=timer.budget_s)
    common.print_run_header(meta)

    out_dir = args.out or default_out_dir(device)
    rows: list[dict[str, Any]] = common.resumed_rows(out_dir, FILE_STEM, meta) if args.resume else []
    done = {row["case"] for row in rows}
    table_peers = {peer: PEER_LABELS[peer] for peer in peers if peer in TABLE_PEERS}
    with common.CpuMemoryMeter(__file__, threads) if device.type == "cpu" else contextlib.nullcontext() as meter:
        try:
            for case in build_grid(device, args.quick):
                if case.label in done:
                    continue
                print(f"\n{case.label}  [{'x'.join(map(str, case.shape))}]")
                x = make_input(case, device)
                case_rows = []
                for name, forward in forwards.items():
                    try:
                        timings = common.time_passes_of(timer, forward, x, on_device)
                    except Exception as error:  # ours: a failure (exit status 1); a peer's: skipped
                        common.record_case_error(meta, kind_of(name), name, case.label, error)
                        continue
                    peak_mem = (meter(name, memory_spec(case)) if meter is not None
                                else measure_peak_memory(name, case, device)[0])
                    case_rows += make_rows(case, name, timings, peak_mem, bandwidth)
                common.add_ratios(case_rows, REFERENCE, peers)
                print(common.case_table(case_rows, table_peers))
                rows += case_rows
                del x
        except KeyboardInterrupt:  # a deadline (run_gpu.sh): keep what was measured
            meta["interrupted"] = common.interrupted_note(len(rows))

    return common.write_results(out_dir, FILE_STEM, meta, rows, CSV_COLUMNS, start)


if __name__ == "__main__":
    common.reexec_with_timing_malloc()
    written = main()
    sys.exit(common.exit_status([written]) if written else 0)
