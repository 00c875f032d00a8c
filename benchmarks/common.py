"""Helpers shared by the benchmark scripts: the timing process's malloc settings, device naming, run
metadata, timing, memory measurement, result rows and tables, result I/O and the common CLI.

The scripts in this folder are run as files (``python benchmarks/run.py``), so they import this
module as ``common`` (Python puts the script's folder first on ``sys.path``).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import select
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Peak memory bandwidth (bytes/s) of GPUs whose datasheet figure we trust more than a copy
# measurement (a device-to-device copy reaches only ~80-90% of it). Matched as substrings of
# torch.cuda.get_device_name(); "H100 ... HBM3" is the SXM part (the PCIe card reports "PCIe").
GPU_PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 80GB HBM3", 3.35e12),
)


# --------------------------------------------------------------------------------------------------
# malloc settings
# --------------------------------------------------------------------------------------------------

# glibc malloc settings for the timing process. By default glibc serves blocks above a (dynamic)
# threshold with mmap and unmaps them when freed, so a freshly allocated large output page-faults on
# every call: on a small VM that can dominate an op (2.3 ms instead of 0.38 ms for one case). With
# these, large blocks come from the heap, which is neither trimmed nor unmapped, so after warm-up
# an output reuses resident pages. glibc reads them at start-up, hence the re-exec.
TIMING_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}
# The CPU memory-measuring processes instead map every block of 64 KiB or more (each tensor of
# interest) on allocation and unmap it on free, so that peak RSS tracks the peak of live tensor
# bytes. glibc's default threshold rises as blocks are freed and then keeps freed blocks resident
# in the heap, so the figure would depend on the allocation history (one case read 20 MiB, not 8).
MEMORY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
DEFAULT_MALLOC_FLAG = "--default-malloc"
# The hidden modes of a benchmark script that measure CPU memory (see CpuMemoryMeter).
MEMORY_MODE_FLAGS = ("--memory-case", "--memory-server")


def reexec_with_timing_malloc(argv: Optional[list[str]] = None) -> None:
    """Replace this process by the same command with ``TIMING_MALLOC_ENV`` set, once, where any of
    its variables is unset (one already set keeps its value). Not with ``--default-malloc``, not in
    the memory-measuring modes (they set their own), not where the C library is not glibc."""
    argv = sys.argv[1:] if argv is None else argv
    flags = {arg.split("=", 1)[0] for arg in argv}
    if DEFAULT_MALLOC_FLAG in flags or flags & set(MEMORY_MODE_FLAGS) or platform.libc_ver()[0] != "glibc":
        return
    missing = {var: value for var, value in TIMING_MALLOC_ENV.items() if var not in os.environ}
    if not missing:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    command = getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]  # interpreter options included
    os.execve(sys.executable, [sys.executable, *command], {**os.environ, **missing})


def malloc_metadata() -> dict[str, Any]:
    """The timing process's malloc settings, for the run metadata."""
    env = {var: os.environ.get(var) for var in TIMING_MALLOC_ENV}
    setting = ("timing" if env == TIMING_MALLOC_ENV else "default" if not any(env.values()) else "custom")
    libc, version = platform.libc_ver()
    return {
        "setting": setting, "env": env, "libc": f"{libc} {version}".strip() or None,
        "note": f"timing: {' '.join(f'{k}={v}' for k, v in TIMING_MALLOC_ENV.items())}, set by re-executing the "
                f"script (default: glibc's own, with {DEFAULT_MALLOC_FLAG}); CPU memory is measured in "
                f"subprocesses with {' '.join(f'{k}={v}' for k, v in MEMORY_MALLOC_ENV.items())} and the other "
                "variables unset, whatever this setting",
    }


# --------------------------------------------------------------------------------------------------
# device
# --------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; asking for CUDA where there is none is an error, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
    return torch.device(name)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def device_slug(device: torch.device) -> str:
    """A folder name for a device's results: ``cpu-intel-xeon-processor``, ``nvidia-h100-80gb-hbm3``."""
    name = re.sub(r"\((r|tm)\)", "", device_name(device).lower())  # "Intel(R) Xeon(R)" -> "intel xeon"
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug if device.type == "cuda" or slug.startswith("cpu") else f"cpu-{slug}"


def default_out_dir(device: torch.device) -> Path:
    return RESULTS_DIR / device_slug(device)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask / cgroup cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads() -> int:
    """One intra-op thread per usable core, for every backend alike (torch ops, at::parallel_for in
    the C++ kernels, and the peers all read this setting)."""
    threads = usable_cores()
    torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------------------------------
# run metadata
# --------------------------------------------------------------------------------------------------

def git_commit() -> str:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files differ from it. Result files are
    ignored (untracked ones, and benchmarks/results/ itself, which a run rewrites as it goes): they
    must not mark the next benchmark of the same run dirty. $SNNKD_GIT_COMMIT, where set, is returned
    as it is: a copy of the tree on another machine (the device tool's) may carry a stale .git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    if os.environ.get("SNNKD_GIT_COMMIT"):  # named by the caller: wins over a copy's stale .git
        return os.environ["SNNKD_GIT_COMMIT"]
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                         ":(exclude)benchmarks/results"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def package_version(name: str) -> Optional[str]:
    """Installed version from the package metadata, without importing it (importing triton on a
    machine without a GPU costs a second and is of no use)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# The 1-minute load average when run.py started (mark_run_start), before any benchmark of it ran.
_run_start_load: Optional[float] = None


def mark_run_start() -> Optional[float]:
    """Note the load before the first benchmark of a run: the load average a later benchmark sees
    still contains the earlier benchmarks' own load, so it says nothing about other processes."""
    global _run_start_load
    _run_start_load = load_average()
    return _run_start_load


def busy_machine_warning(threads: int) -> Optional[str]:
    """A warning when other processes already keep the cores busy: with one intra-op thread per
    core, every parallel region then waits for a descheduled thread, and times of many-small-op
    implementations (the reference, the peers) can grow tenfold. Judged by the load when run.py
    started where it did, else by the load now."""
    load = _run_start_load if _run_start_load is not None else load_average()
    when = "the run" if _run_start_load is not None else "the benchmark"
    if load is not None and load > 0.5 * threads:
        return (f"warning: the machine is busy before {when} starts (1-min load {load:.1f} on "
                f"{threads} cores); timings will be noisy and slow")
    return None


def run_metadata(device: torch.device, bench_argv: list[str], threads: int, **fields: Any) -> dict[str, Any]:
    """The metadata every result file has, then the benchmark's own ``fields``."""
    return {
        "load_average_1min": load_average(),
        "load_average_1min_run_start": _run_start_load,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "bench_args": bench_argv,
        "git_commit": git_commit(),
        "device": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "threads": threads,
        "cores": usable_cores(),
        "python": platform.python_version(),
        "versions": {name: package_version(name)
                     for name in ("torch", "triton", "spikingjelly", "snntorch", "numpy", "snnkd_fast")},
        "cuda_runtime": torch.version.cuda,
        "malloc": malloc_metadata(),
        # Results without this field (the first H100 run) let the L2 flush overlap the host's work.
        "timing_method": ("CUDA events, L2 flushed and synchronized before each sample (host enqueue included); "
                          f"pass {DEVICE_PASS}: fwd+bwd as device work (back-to-back launches, L2 flushed before each)"
                          if device.type == "cuda" else "wall clock (time.perf_counter)"),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


class Timer:
    """Times ``run(setup())`` repeatedly and reports the median and the 20th/80th percentiles.

    ``setup`` runs outside the timed region every repetition (e.g. it builds the autograd graph a
    backward pass consumes), and whatever ``run`` returns is released only after the clock stops,
    so freeing outputs or graphs is not counted.

    CPU: wall clock (``time.perf_counter``). CUDA: CUDA events around ``run``, after overwriting a
    buffer larger than the L2 cache so that inputs left in L2 by ``setup`` or the previous
    repetition do not flatter memory-bound kernels (as ``triton.testing.do_bench`` does). The
    overwrite is waited for before the start event: otherwise the host enqueues ``run`` while the
    GPU is still busy with it (~0.1 ms), which hides up to that much host overhead (Python, dispatch,
    autograd) from one pass and not from a longer one, so small cases' fwd and bwd would read as
    device time and their fwd+bwd as host time. Each pass's time is thus the host's enqueueing plus
    the device's execution, as in a training step. Each repetition synchronises, so a forward pass's
    outputs never pile up across repetitions.

    ``queued=True`` (CUDA only) measures device time instead, as ``triton.testing.do_bench`` does:
    every repetition (flush, start event, ``run``, end event) is enqueued without waiting, and the
    events are read after one final synchronisation. The host runs ahead of the GPU, so its overhead
    shows only where it exceeds the device's work; used to compare kernel variants of equal host cost
    (benchmarks/tune_triton.py), where the host-inclusive timing's jitter (the autograd engine's
    hand-off to its device thread, tenths of a millisecond on the H100 machine) swamped the
    differences.

    The number of repetitions adapts to the cost of one: about ``budget_s`` of samples, clamped to
    ``[min_reps, max_reps]``, after ``warmup_s`` of warm-up (JIT compilation, Triton autotuning,
    allocator and cache warm-up; at least ``min_warmup`` calls).
    """

    def __init__(self, device: torch.device, *, budget_s: float, warmup_s: float, min_reps: int = 10,
                 max_reps: int = 200, min_warmup: int = 3, queued: bool = False):
        if queued and device.type != "cuda":
            raise ValueError("Timer(queued=True) measures CUDA device time; the device is " + str(device))
        self.device, self.queued = device, queued
        self.budget_s, self.warmup_s = budget_s, warmup_s
        self.min_reps, self.max_reps, self.min_warmup = min_reps, max_reps, min_warmup
        if device.type == "cuda":
            self._l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def _sample_ms(self, run: Callable[[Any], Any], setup: Callable[[], Any]) -> float:
        state = setup()
        if self.device.type == "cuda":
            self._l2_flush.zero_()
            torch.cuda.synchronize(self.device)  # see the class docstring: no host work hidden behind it
            self._start.record()
            result = run(state)
            self._end.record()
            self._end.synchronize()
            elapsed_ms = self._start.elapsed_time(self._end)
        else:
            start = time.perf_counter()
            result = run(state)
            elapsed_ms = (time.perf_counter() - start) * 1e3
        del result, state  # freed here, after the clock stopped
        return elapsed_ms

    def _queued_samples_ms(self, run: Callable[[Any], Any], setup: Callable[[], Any], reps: int) -> list[float]:
        """``reps`` device-time samples, enqueued back to back (see the class docstring). ``setup``'s
        device work is enqueued before the start event, so it is not counted."""
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        torch.cuda.synchronize(self.device)
        for start, end in events:
            state = setup()
            self._l2_flush.zero_()
            start.record()
            result = run(state)
            end.record()
            del result, state  # the caching allocator reuses the memory in stream order: safe
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]

    def __call__(self, run: Callable[[Any], Any], setup: Callable[[], Any] = lambda: None) -> Timing:
        warmup_start, rep_walls = time.perf_counter(), []
        while len(rep_walls) < self.min_warmup or time.perf_counter() - warmup_start < self.warmup_s:
            rep_start = time.perf_counter()
            self._sample_ms(run, setup)
            rep_walls.append(time.perf_counter() - rep_start)
        # The budget pays for whole repetitions, setup included. The median, because the first
        # calls are slow (lazy initialisation, first touch of the output pages).
        per_rep_s = float(np.median(rep_walls[1:]))
        reps = max(self.min_reps, min(self.max_reps, int(self.budget_s / per_rep_s)))

        # A garbage-collector pause inside a sample would be charged to the kernel: the collector is
        # off while sampling (the runs create no reference cycles). Only the young generation is
        # collected first: a full collection costs 0.1-0.5 s once torch._dynamo, inductor and the
        # peers are imported, and with three passes per implementation it was most of a GPU case's time.
        gc.collect(0)
        gc.disable()
        try:
            samples = (self._queued_samples_ms(run, setup, reps) if self.queued
                       else [self._sample_ms(run, setup) for _ in range(reps)])
        finally:
            gc.enable()
        p20, median, p80 = np.percentile(samples, [20, 50, 80])
        return Timing(float(median), float(p20), float(p80), reps)


def time_passes(timer: Timer, forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], Any],
                leaf: torch.Tensor, device_timer: Optional[Timer] = None) -> dict[str, Timing]:
    """Timings of "fwd" (``forward()``, a training forward: ``leaf`` requires grad), "bwd"
    (``backward(out)`` on a graph built untimed just before) and "fwdbwd" (both), and with a
    ``device_timer`` (:func:`device_timer`) DEVICE_PASS: fwdbwd as device work. ``leaf.grad`` is
    cleared before each, so every backward allocates a fresh gradient instead of accumulating."""
    def clear_grad() -> None:
        leaf.grad = None

    def build_graph() -> torch.Tensor:
        clear_grad()
        return forward()

    timings = {
        "fwd": timer(lambda _: forward(), setup=clear_grad),
        "bwd": timer(backward, setup=build_graph),
        "fwdbwd": timer(lambda _: backward(forward()), setup=clear_grad),
    }
    if device_timer is not None:
        timings[DEVICE_PASS] = device_timer(lambda _: backward(forward()), setup=clear_grad)
    return timings


def time_passes_of(timer: Timer, forward: Callable[[torch.Tensor], torch.Tensor],
                   leaf: torch.Tensor, device_timer: Optional[Timer] = None) -> dict[str, Timing]:
    """:func:`time_passes` of ``forward(leaf)`` with a fixed random upstream gradient, in the dtype of
    the output (drawn once, untimed)."""
    with torch.no_grad():
        grad = torch.randn_like(forward(leaf))
    return time_passes(timer, lambda: forward(leaf), lambda out: torch.autograd.backward(out, grad), leaf,
                       device_timer)


def peak_bandwidth(device: torch.device, timer: Timer) -> tuple[float, str]:
    """(bytes/s, where the figure comes from): a datasheet value for known GPUs, otherwise the
    bandwidth of a large ``Tensor.copy_`` (read + write), far larger than any cache."""
    if device.type == "cuda":
        name = device_name(device)
        for key, bandwidth in GPU_PEAK_BANDWIDTH:
            if key in name:
                return bandwidth, f"datasheet ({key})"
        numel = 2**28  # 1 GiB of float32 each way
    else:
        numel = 2**26  # 256 MiB each way
    src = torch.ones(numel, dtype=torch.float32, device=device)  # ones, not empty: fault the pages in
    dst = torch.zeros_like(src)
    timing = timer(lambda _: dst.copy_(src))
    return 2 * src.nbytes / (timing.median_ms * 1e-3), f"measured Tensor.copy_ of {src.nbytes // 2**20} MiB"


# --------------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_freed_heap() -> None:
    """Return memory glibc keeps after frees to the OS, so that it counts in the RSS baseline and a
    run cannot look smaller by reusing it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_rss_peak() -> bool:
    """Lower this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); without it the
    baseline would be the import-time peak, which can hide part of the run's growth."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak RSS of this process. Linux: VmHWM, not ``getrusage().ru_maxrss``: the kernel folds the
    RSS of the forked parent's address space, as it was at exec, into ru_maxrss, so a child of a
    benchmark that holds hundreds of MB would report that figure whatever it does itself."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def measure_peak(run: Callable[[], Any], device: torch.device) -> tuple[int, bool]:
    """(bytes ``run()`` needs above what is allocated before it, whether the peak counter could be
    reset first). CUDA: the caching allocator's peak counter. CPU: the peak-RSS growth, meaningful
    only in a process that ran nothing else (see CpuMemoryMeter)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline, was_reset = torch.cuda.memory_allocated(device), True
    else:
        _release_freed_heap()
        was_reset = _reset_rss_peak()
        baseline = _peak_rss_bytes()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline, was_reset
    return _peak_rss_bytes() - baseline, was_reset


def memory_method(device: torch.device) -> str:
    """How ``peak_mem_bytes`` was measured, for the run metadata."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over one fwd+bwd, inputs excluded"
    return ("peak-RSS growth (VmHWM, reset via /proc/self/clear_refs) over one fwd+bwd in a fresh process per case "
            "and implementation" + (", forked from a server that imported torch once" if hasattr(os, "fork") else "")
            + f" ({' '.join(f'{k}={v}' for k, v in MEMORY_MALLOC_ENV.items())}), inputs excluded")


def memory_env() -> dict[str, str]:
    """The environment of the memory-measuring processes: ``MEMORY_MALLOC_ENV``, and none of the
    timing process's malloc settings."""
    env = {var: value for var, value in os.environ.items() if var not in TIMING_MALLOC_ENV}
    return {**env, **MEMORY_MALLOC_ENV}


# One CPU memory measurement, in a process that has run nothing else: (peak bytes, peak reset?) of
# the JSON spec a benchmark sent (its own keys, plus "backend" and "threads").
MeasureSpec = Callable[[dict[str, Any]], tuple[int, bool]]


def _measure_here(measure: MeasureSpec, spec: dict[str, Any]) -> dict[str, Any]:
    """``{"peak_mem_bytes", "peak_reset"}``, or ``{"error"}``."""
    try:
        torch.set_num_threads(spec["threads"])
        peak, was_reset = measure(spec)
        return {"peak_mem_bytes": peak, "peak_reset": was_reset}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def _memory_server(measure: MeasureSpec, preload: Iterable[str]) -> None:
    """Per JSON spec line on stdin, fork a fresh child that does the one measurement and answer its
    result as one line. Each child is a new process (its own peak RSS, an allocator that has served
    nothing) that skips the seconds of importing torch and ``preload``; the server runs no torch op
    itself, so forking it is safe (no OpenMP thread pool exists yet)."""
    for module in preload:  # imported once, shared by every child (torch._dynamo alone takes seconds)
        try:
            importlib.import_module(module)
        except ImportError:  # a missing peer: its measurements report the error themselves
            pass
    for line in sys.stdin:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, write the result to the pipe, exit without cleanup
            os.close(read_fd)
            os.dup2(2, 1)  # stray prints must not reach the server's answer stream
            result = _measure_here(measure, json.loads(line))
            os.write(write_fd, json.dumps(result).encode())
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            answer = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not answer:
            answer = json.dumps({"error": f"the measuring process died (wait status {status})"})
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


def memory_worker_main(args: argparse.Namespace, measure: MeasureSpec, preload: Iterable[str] = ()) -> bool:
    """Run the hidden mode ``args`` asks for, if any (True then): ``--memory-server`` (see
    CpuMemoryMeter) or ``--memory-case SPEC`` (one measurement in this fresh interpreter)."""
    if args.memory_case:
        print(json.dumps(_measure_here(measure, json.loads(args.memory_case))))
        return True
    if args.memory_server:
        _memory_server(measure, preload)
        return True
    return False


class CpuMemoryMeter:
    """Peak fwd+bwd RSS growth of one implementation on one case, each measured in a fresh process:
    the peak RSS of a process that ran many cases says nothing about one. Fresh processes are forked
    from a server (``script --memory-server``) that imported torch once, which saves the 1-2 s an
    interpreter start costs per measurement; without ``os.fork``, each is a new interpreter
    (``script --memory-case SPEC``). The script hands both modes to ``memory_worker_main``."""

    TIMEOUT_S = 600

    def __init__(self, script: str, threads: int):
        self.script, self.threads = str(Path(script).resolve()), threads
        self.server: Optional[subprocess.Popen] = None
        self.env = memory_env()  # glibc reads it at start-up; forked children inherit it

    def __enter__(self) -> "CpuMemoryMeter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _ask_server(self, spec: str) -> str:
        if self.server is None or self.server.poll() is not None:
            self.server = subprocess.Popen([sys.executable, self.script, "--memory-server"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, env=self.env)
        self.server.stdin.write(spec + "\n")
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], self.TIMEOUT_S)
        if not ready:
            self.close(kill=True)
            raise TimeoutError(f"no answer in {self.TIMEOUT_S} s")
        answer = self.server.stdout.readline()
        if not answer:
            self.close(kill=True)
            raise RuntimeError("the memory server exited")
        return answer

    def _run_fresh(self, spec: str) -> str:
        proc = subprocess.run([sys.executable, self.script, "--memory-case", spec], capture_output=True, text=True,
                              timeout=self.TIMEOUT_S, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
        return proc.stdout.strip().splitlines()[-1]

    def __call__(self, name: str, spec: dict[str, Any]) -> Optional[int]:
        """Bytes one fwd+bwd of ``name`` on the case ``spec`` describes needs above the inputs;
        None, with a printed reason, if that failed."""
        spec_json = json.dumps({"backend": name, **spec, "threads": self.threads})
        try:
            result = json.loads(self._ask_server(spec_json) if hasattr(os, "fork") else self._run_fresh(spec_json))
        except (OSError, RuntimeError, subprocess.TimeoutExpired, TimeoutError, ValueError) as error:
            print(f"  ! {name}: memory measurement failed: {type(error).__name__}: {error}")
            return None
        if "error" in result:
            print(f"  ! {name}: memory measurement failed: {result['error']}")
            return None
        if not result["peak_reset"]:
            print(f"  ! {name}: could not reset the peak RSS; the memory figure may be too low")
        return result["peak_mem_bytes"]

    def close(self, kill: bool = False) -> None:
        if self.server is not None:
            if kill:
                self.server.kill()
            else:
                self.server.stdin.close()  # end of input: the server's loop ends
            self.server.wait()
            self.server.stdout.close()
            self.server = None


# --------------------------------------------------------------------------------------------------
# implementations and result rows
# --------------------------------------------------------------------------------------------------

PASSES = ("fwd", "bwd", "fwdbwd")
# On a GPU each implementation's forward+backward is also timed as device work (Timer queued=True):
# the pass a training step that keeps the GPU's queue full sees, and the one its roofline figures mean.
DEVICE_PASS = "fwdbwd_device"


def device_timer(device: torch.device, budget_s: float) -> Optional["Timer"]:
    """The queued Timer of a GPU benchmark's DEVICE_PASS; None on a CPU (no such pass)."""
    if device.type != "cuda":
        return None
    return Timer(device, budget_s=budget_s, warmup_s=0.02, min_reps=10, queued=True)


def implementation_kind(name: str, reference: str, peers: Iterable[str]) -> str:
    return "reference" if name == reference else "peer" if name in peers else "ours"


def native_backends(device: torch.device, native: tuple[str, ...], statuses: dict[str, Any],
                    reference: str) -> tuple[list[str], dict[str, str]]:
    """([our backends to measure]: the reference, then ``native`` order; {backend: why not}) from
    ``snnkd_fast.backends()``'s ``statuses``; ``native``: the backends native to ``device``."""
    names: list[str] = []
    skipped: dict[str, str] = {}
    for name, status in statuses.items():
        if name not in native:
            # "triton" also runs on CPU tensors under TRITON_INTERPRET=1, an interpreter for testing.
            skipped[name] = ("runs on CPU only through the Triton interpreter (TRITON_INTERPRET=1), a testing "
                             "aid, not timed" if name == "triton" else f"not a {device.type} backend")
        elif not status.available:
            skipped[name] = status.reason
        else:
            names.append(name)
    names.sort(key=lambda name: (name != reference, native.index(name)))
    return names, skipped


def pass_rows(fields: Callable[[str], dict[str, Any]], timings: dict[str, Timing], peak_mem: Optional[int],
              min_bytes: Callable[[str], int], peak_bandwidth_bps: float) -> list[dict[str, Any]]:
    """One result row per pass: ``fields(pass_)`` (the columns naming the case, implementation and
    pass), the timing, the fwd+bwd peak memory (fwdbwd rows only) and the achieved bandwidth of the
    least traffic ``min_bytes(pass_)`` a fused kernel needs (DEVICE_PASS: fwdbwd's)."""
    rows = []
    for pass_, timing in timings.items():
        bytes_min = min_bytes("fwdbwd" if pass_ == DEVICE_PASS else pass_)
        achieved = bytes_min / (timing.median_ms * 1e-3)
        rows.append({
            **fields(pass_),
            "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "reps": timing.reps,
            "peak_mem_bytes": peak_mem if pass_ == "fwdbwd" else None,
            "bytes_min": bytes_min, "achieved_GBps": achieved / 1e9, "pct_peak": 100 * achieved / peak_bandwidth_bps,
        })
    return rows


def add_ratios(case_rows: list[dict[str, Any]], reference: str, peers: Iterable[str]) -> None:
    """Speed-ups (baseline time / this time) against the reference and each peer, pass by pass,
    and the fwd+bwd memory ratio against the reference; None where the baseline was not measured."""
    by_key = {(row["backend"], row["pass"]): row for row in case_rows}

    def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
        return None if numerator is None or not denominator else numerator / denominator

    for row in case_rows:
        for baseline, column in ((reference, "speedup_vs_reference"),
                                 *((peer, f"speedup_vs_{peer}") for peer in peers)):
            other = by_key.get((baseline, row["pass"]))
            row[column] = ratio(other and other["median_ms"], row["median_ms"])
        base = by_key.get((reference, row["pass"]))
        row["mem_ratio_vs_reference"] = ratio(row["peak_mem_bytes"], base and base["peak_mem_bytes"])


def device_cells(row: Optional[dict[str, Any]], with_peak: bool = True) -> list[str]:
    """The DEVICE_PASS columns of a table (device ms, speed-up over the reference and, ``with_peak``,
    % of the bandwidth peak) from that pass's row, dashes without one. A whole training step
    (bench_train_step) has no roofline: its table leaves the last column out."""
    if row is None:
        return ["-"] * (3 if with_peak else 2)
    cells = [fmt_ms(row["median_ms"]), fmt_ratio(row.get("speedup_vs_reference"))]
    return cells + [f"{row['pct_peak']:.0f}"] if with_peak else cells


def case_table(case_rows: list[dict[str, Any]], peer_labels: dict[str, str],
               memory_columns: Iterable[tuple[str, Callable[[dict[str, Any]], str]]] = ()) -> str:
    """One line per implementation of a case: the three passes' times, the fwd+bwd speed-ups over
    the reference and the peers in ``peer_labels`` ({peer: column label}), bandwidth and memory
    (``memory_columns``: (header, cell of the fwdbwd row) before the memory ratio)."""
    memory_columns = list(memory_columns)
    device = any(row["pass"] == DEVICE_PASS for row in case_rows)
    header = ["backend", "fwd ms", "bwd ms", "fwd+bwd ms", "vs ref", *(f"vs {label}" for label in peer_labels.values()),
              "GB/s", "% peak", *(["device ms", "dev vs ref", "dev % peak"] if device else []), "peak MB",
              *(title for title, _ in memory_columns), "mem vs ref"]
    by_backend: dict[str, dict[str, dict]] = {}
    for row in case_rows:
        by_backend.setdefault(row["backend"], {})[row["pass"]] = row
    lines = []
    for name, passes in by_backend.items():
        total = passes["fwdbwd"]
        lines.append([name, *(fmt_ms(passes[p]["median_ms"]) for p in PASSES),
                      fmt_ratio(total["speedup_vs_reference"]),
                      *(fmt_ratio(total.get(f"speedup_vs_{p}")) for p in peer_labels),
                      f"{total['achieved_GBps']:.1f}", f"{total['pct_peak']:.0f}",
                      *(device_cells(passes.get(DEVICE_PASS)) if device else []),
                      fmt_mb(total["peak_mem_bytes"]),
                      *(cell(total) for _, cell in memory_columns), fmt_ratio(total["mem_ratio_vs_reference"])])
    return text_table(header, lines)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

def parse_names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A comma-separated list of ``known`` names ('none' for no peer)."""
    if text.strip().lower() == "none":
        return ()
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}"
                                         + (" or 'none'" if what == "peer" else ""))
    return names


def add_default_malloc_option(parser: argparse.ArgumentParser) -> None:
    """``--default-malloc``, which ``reexec_with_timing_malloc`` reads from ``sys.argv``."""
    parser.add_argument(DEFAULT_MALLOC_FLAG, action="store_true",
                        help="time under glibc's default malloc settings: the script does not re-execute itself "
                             f"with {' '.join(f'{k}={v}' for k, v in TIMING_MALLOC_ENV.items())}")


def positive_seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"need a number of seconds > 0, got {text}")
    return value


def add_sample_budget_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-budget-s", type=positive_seconds, metavar="S",
                        help="seconds of timed samples per pass and implementation, instead of the script's default "
                             "for the device and grid (its warm-up scaled alike; at least the timer's minimum number "
                             "of samples is taken): fewer samples, noisier medians, a grid that fits a shorter GPU "
                             "session")


def sample_timer(args: argparse.Namespace, device: torch.device, *, budget_s: float, warmup_s: float,
                 **kwargs: Any) -> "Timer":
    """The script's Timer, with ``--sample-budget-s`` (when given) replacing its default ``budget_s``
    and scaling its ``warmup_s`` by the same factor."""
    override = getattr(args, "sample_budget_s", None)
    if override is not None:
        budget_s, warmup_s = override, warmup_s * override / budget_s
    return Timer(device, budget_s=budget_s, warmup_s=warmup_s, **kwargs)


def bench_parser(description: str, quick_help: str, peers: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options every benchmark script takes; it adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-slug>/)")
    parser.add_argument("--peers", type=lambda text: parse_names(text, peers, "peer"), default=peers,
                        help=f"comma-separated peers to measure, or 'none' (default: {','.join(peers)})")
    add_default_malloc_option(parser)
    parser.add_argument("--resume", action="store_true",
                        help="go on with a run cut short (a deadline): keep the rows of the grid's JSON already in "
                             "the output folder, measured at this commit on this device, and measure only the cases "
                             "it lacks")
    add_sample_budget_option(parser)
    # Internal: CPU memory measurements in fresh processes (memory_worker_main).
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--memory-server", action="store_true", help=argparse.SUPPRESS)
    return parser


def script_start(argv: Optional[list[str]], parse_args: Callable[[list[str]], argparse.Namespace],
                 measure: "MeasureSpec", preload: Iterable[str] = ()) -> Optional[tuple]:
    """The start of every benchmark script's ``main``: its arguments (``argv``, or the command line),
    then None where they ask for a hidden memory-measuring mode (served here: see
    ``memory_worker_main``), else ``(argv, args, start, device, threads)`` of :func:`begin_run`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if memory_worker_main(args, measure, preload):
        return None
    return (argv, args, *begin_run(args))


def begin_run(args: argparse.Namespace) -> tuple[float, torch.device, int]:
    """(start time, device, threads) of a benchmark about to measure: ``args.device`` resolved, one
    intra-op thread per usable core, the global RNG seeded."""
    start = time.perf_counter()
    device = resolve_device(args.device)
    threads = configure_threads()
    torch.manual_seed(0)
    return start, device, threads


def print_run_header(meta: dict[str, Any]) -> None:
    """What a benchmark measures with, before its cases: device, bandwidth, malloc, a busy machine,
    what it skips, and the notes on the peers it measures."""
    print(f"{meta['op']} {meta['grid']} benchmark on {meta['device_name']} ({meta['device']}, {meta['threads']} "
          f"threads), commit {meta['git_commit'][:12]}")
    print(f"peak bandwidth {meta['peak_bandwidth_Bps'] / 1e9:.1f} GB/s ({meta['peak_bandwidth_source']})")
    malloc = meta["malloc"]
    print(f"malloc: {malloc['setting']} ({', '.join(f'{k}={v}' for k, v in malloc['env'].items() if v) or 'unset'})")
    warning = busy_machine_warning(meta["threads"]) if meta["device"] == "cpu" else None
    if warning:
        print(warning)
    for name, reason in meta["skipped"].items():
        print(f"skipped {name}: {reason}")
    for note in meta["notes"]:
        if note.split(":")[0] in meta["peers"]:
            print(f"note: {note}")


# --------------------------------------------------------------------------------------------------
# results I/O
# --------------------------------------------------------------------------------------------------

def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")


def write_result_json(out_dir: Optional[Path], device: torch.device, stem: str, meta: dict[str, Any],
                      rows: list[dict[str, Any]]) -> Path:
    """``<out_dir or results/<device-slug>>/<stem>.json``, announced on stdout; returns its path."""
    path = (out_dir or default_out_dir(device)) / f"{stem}.json"
    write_json(path, meta, rows)
    print(f"\nwrote {path}")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]], leading_columns: Iterable[str]) -> None:
    """One line per row; ``leading_columns`` first, then any other keys (e.g. one
    ``speedup_vs_<peer>`` per peer measured) in sorted order. Lists are written ``64x1024``."""
    leading = list(leading_columns)
    extra = sorted({key for row in rows for key in row} - set(leading))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=leading + extra, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "x".join(map(str, value)) if isinstance(value, list) else
                             ("" if value is None else value) for key, value in row.items()})


def record_failure(failures: dict[str, str], name: str, case_label: str, error: BaseException) -> None:
    """Our own kernel failed on a case: print it loudly, keep it in ``meta["failures"]`` and go on, so that
    one broken kernel does not lose the rest of the run (the run still exits 1: see ``exit_status``)."""
    text = f"{type(error).__name__}: {error}"
    print(f"  !!! {name} FAILED on {case_label}: {text}")
    failures[f"{name} @ {case_label}"] = text[:2000]


def record_case_error(meta: dict[str, Any], kind: str, name: str, case_label: str, error: BaseException) -> None:
    """An implementation raised on a case: ours (``kind`` "ours" or "reference": a bug) is recorded as
    a failure (the run exits 1, see ``record_failure``); a peer's is printed and kept in
    ``meta["skipped"]``, since a peer that cannot run a case is no fault of ours. Either way the caller
    goes on with the next implementation."""
    if kind != "peer":
        record_failure(meta["failures"], name, case_label, error)
        return
    text = f"{type(error).__name__}: {error}"
    print(f"  ! {name} failed on this case, skipped: {text}")
    meta["skipped"][f"{name} @ {case_label}"] = text


def interrupted_note(rows_kept: int) -> str:
    """``meta["interrupted"]`` of a run stopped by SIGINT (run_gpu.sh's deadline, or Ctrl-C): the rows
    measured so far are written, and run.py runs no further benchmark."""
    note = f"stopped by SIGINT (deadline or Ctrl-C) after {rows_kept} rows; the grid is incomplete"
    print(f"\n!!! {note}")
    return note


def result_name(stem: str, meta: dict[str, Any]) -> str:
    """A grid's file name without suffix: ``<stem>_<grid>``, and ``_<dtype>...`` where the run measured
    only some of the grid's dtypes (``meta["dtype_subset"]``, bench_losses.py --dtypes): a bf16-only GPU
    run then sits beside the fp32 grid of an earlier commit instead of replacing it."""
    subset = meta.get("dtype_subset")
    return f"{stem}_{meta['grid']}" + "".join(f"_{name}" for name in subset or ())


def resumed_rows(out_dir: Path, stem: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """``--resume``: the rows of ``<stem>_<grid>[_<dtype>].json`` in ``out_dir`` from an earlier run of the same
    grid at the same commit on the same device (a run stopped by a deadline: every case in it is
    complete, since a case interrupted half-way is dropped), for the caller to keep and skip. No file:
    none. A file from another commit, device or grid is refused (mixing builds in one table would
    compare them). ``meta["resumed"]`` records the earlier run; its failures and skips carry over."""
    path = out_dir / f"{result_name(stem, meta)}.json"
    if not path.exists():
        print(f"--resume: no {path}, measuring the whole grid")
        return []
    earlier = json.loads(path.read_text())
    earlier_meta = earlier.get("meta", {})
    for key in ("op", "grid", "device_name", "git_commit", "dtype_subset"):
        if earlier_meta.get(key) != meta.get(key):
            raise SystemExit(f"--resume: {path} has {key}={earlier_meta.get(key)!r}, this run {meta.get(key)!r}: "
                             "not resuming across runs of different builds or devices (move the file away)")
    for key in ("failures", "skipped"):
        if isinstance(earlier_meta.get(key), dict) and isinstance(meta.get(key), dict):
            for name, value in earlier_meta[key].items():
                meta[key].setdefault(name, value)
    meta["resumed"] = {key: earlier_meta.get(key) for key in ("timestamp", "wall_s", "interrupted")}
    meta["resumed"]["rows"] = len(earlier["results"])
    print(f"--resume: kept {len(earlier['results'])} rows of {path.name} "
          f"({len({row['case'] for row in earlier['results']})} cases)")
    return list(earlier["results"])


def exit_status(result_files: Iterable[Path]) -> int:
    """1 if any result file records a failure of our kernels (``meta["failures"]``), else 0."""
    failed = 0
    for path in result_files:
        failures = json.loads(Path(path).read_text())["meta"].get("failures") or {}
        for what, why in failures.items():
            print(f"FAILED {what}: {why.splitlines()[0] if why else ''}")
        failed |= bool(failures)
    return int(failed)


def write_results(out_dir: Path, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]],
                  csv_columns: Iterable[str], start: float) -> Path:
    """``<stem>_<grid>[_<dtype>].json`` (``result_name``) and ``.csv`` in ``out_dir``, with the end-of-run
    load and the wall time since ``start`` (``time.perf_counter()``) in the metadata; returns the JSON file."""
    meta["load_average_1min_end"] = load_average()  # with the start value: was the machine quiet?
    meta["wall_s"] = time.perf_counter() - start
    json_path = out_dir / f"{result_name(stem, meta)}.json"
    write_json(json_path, meta, rows)
    write_csv(json_path.with_suffix(".csv"), rows, csv_columns)
    print(f"\nwrote {json_path} and {json_path.with_suffix('.csv').name} ({meta['wall_s']:.0f} s)")
    return json_path


def load_results(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every benchmark-grid ``*.json`` file directly in ``results_dir`` (rows per case, backend and
    pass), sorted by name, as (path, data). ab_kernels.py's build-against-build tables and
    kernel_breakdown.py's per-kernel rows (case and backend, but no pass) are not grids."""
    loaded = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "meta" in data and "results" in data and all(
                "case" in row and "backend" in row and "pass" in row for row in data["results"]):
            loaded.append((path, data))
    return loaded


# --------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------

def fmt_ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_mb(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def fmt_extra(value: Optional[float]) -> str:
    """``extra_seq_tensors``: memory in units of one ``[T, B, C]`` float32 tensor."""
    return "-" if value is None else f"{value:.2f}"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with right-aligned columns (the first left-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(cell).ljust(width) if index == 0 else str(cell).rjust(width)
                         for index, (cell, width) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, rows)])
