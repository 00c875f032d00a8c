"""Benchmark of the fused knowledge-distillation losses: forward, backward and forward+backward.

Measures each loss of ``snnkd_fast.losses`` (per_timestep_kl, tser_loss, hta_kl, nld_loss with
``per_timestep=True``, kd_kl) on every backend that runs natively on the chosen device (the "torch"
reference, which materialises ``[T, B, C]`` tensors, included), ``torch.compile`` of that reference
and, on a GPU, Liger-Kernel's KL losses, over a grid of shapes, and writes
``losses_<quick|full>.json`` / ``.csv``::

    python benchmarks/bench_losses.py --quick                  # small CPU grid, 1.5 minutes on 2 idle cores
    python benchmarks/bench_losses.py                          # trimmed full CPU grid (fp32, C <= 32000)
    python benchmarks/bench_losses.py --device cuda            # full GPU grid, fp32 and bf16
    python benchmarks/bench_losses.py --device cuda --quick --losses hta_kl,kd_kl --peers none

Inputs: student logits ``[T, B, C]`` (requires grad) and an ANN teacher ``[B, C]`` (no grad), in the
case's dtype. Each loss runs with its default hyper-parameters and ``reduction="batchmean"``.

What is timed (see ``common.Timer``): "fwd" is the training forward (the student requires grad, so
whatever the backward needs is saved); "bwd" is ``loss.backward()`` on a graph built untimed just
before; "fwdbwd" is both; on a GPU also "fwdbwd_device", fwd+bwd as device work (back-to-back
launches: the host's overhead shows only where it exceeds the device's). Peak memory is measured for
fwd+bwd only: on CUDA with the caching allocator's peak counter, on CPU as the peak-RSS growth
(VmHWM after ``/proc/self/clear_refs``, with ``MALLOC_MMAP_THRESHOLD_=65536``) of one fwd+bwd in a
fresh process per case and implementation (``common.CpuMemoryMeter``, as in bench_lif.py). Those
processes are forked from a server (this script in its hidden ``--memory-server`` mode) that
imported torch once, which saves the 1-2 s an interpreter start costs per measurement; without
``os.fork`` each is a new interpreter (``--memory-case``). The kernel updates RSS counters in
batches of pages, so CPU figures are good to about +-0.25 MiB. Run as a script, it first re-executes
itself with the timing malloc settings
(``common.TIMING_MALLOC_ENV``; ``--default-malloc`` opts out).
``extra_seq_tensors`` is the peak less the student's gradient (which every implementation must
produce), in units of one ``[T, B, C]`` float32 tensor: about 0 for a fused kernel, several for the
reference. Before timing, each kernel's forward loss is compared with the reference's (NLD excepted:
its noise differs per backend); disagreements are printed and kept in ``meta["value_mismatches"]``.
On a GPU, cases whose reference would not fit in memory (extrapolated from a small probe) are
measured for our kernels only, the reference and peers skipped with the reason.

Peers:

* ``torch_compile``: ``torch.compile(reference, dynamic=False, fullgraph=True)`` with the default
  inductor backend, compiled once per case outside the timed region (``compile_s`` records the
  first fwd+bwd, the compilation included; the on-disk inductor cache makes repeated runs faster).
  On CPU inductor generates and compiles C++ (in-process: ``compile_threads=1``, so no pool of
  compile workers competes with the timing for the cores); ``--compile smallest`` (the default with
  ``--quick`` on a CPU) compiles only the smallest case, and ``--compile-budget-s`` (default 30 s
  there; 60 s with --quick on a GPU, 180 s for the full GPU grid) stops compiling once a cold inductor
  cache has made compilation that slow, with the reason.
* ``liger_kldiv`` / ``liger_jsd``: Liger-Kernel's ``LigerKLDIVLoss(reduction="batchmean",
  log_target=True)`` and ``LigerJSD(beta=0)`` (forward KL), Triton kernels, so GPU only. They
  compute the KL part only, ``tau^2 KL(p || q_t)`` on log-softmaxed inputs flattened to ``[T*B, C]``
  (the teacher's log-probabilities expanded over T), or on the time-averaged ``[B, C]`` logits for
  kd_kl: the same loss as per_timestep_kl / kd_kl, and less work than tser_loss, hta_kl and
  nld_loss, for which they are a lower bound of what a Liger-based implementation would cost.

Roofline: the least traffic a fused loss needs is, forward, read the student (``T*B*C`` elements)
and the teacher (``B*C``) once; backward, read both again and write the student gradient
(``T*B*C``). kd_kl's backward needs no student: its gradient is the same at every t, computed from
the time-averaged logits (``B*C`` float32, saved by the forward) and the teacher. ``achieved_GBps``
divides that minimum by the measured time for every implementation alike, and ``pct_peak`` relates it
to the device's peak bandwidth.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import common
from common import Timer, Timing, default_out_dir, fmt_extra, fmt_ms, fmt_ratio

OP = "kd_losses"  # the file's op; each row's "op" is the loss it measures
FILE_STEM = "losses"
REFERENCE = "torch"  # snnkd_fast's eager PyTorch reference: the baseline of every speed-up
# Our backends that are native to each device (see common.native_backends).
DEVICE_BACKENDS = {"cpu": ("torch", "cpp"), "cuda": ("torch", "triton", "cuda")}
LOSSES = ("per_timestep_kl", "tser_loss", "hta_kl", "nld_loss", "kd_kl")
LOSS_KWARGS = {"nld_loss": {"per_timestep": True}}  # otherwise each loss's defaults
PEERS = ("torch_compile", "liger_kldiv", "liger_jsd")
PEER_LABELS = {"torch_compile": "torch.compile", "liger_kldiv": "Liger KLDiv", "liger_jsd": "Liger JSD"}
LIGER_PEERS = ("liger_kldiv", "liger_jsd")
# Imported once by the CPU memory server, for every measurement it forks (torch._dynamo alone takes
# seconds to import).
MEMORY_PRELOAD = ("snnkd_fast.losses", "torch._dynamo", "torch._inductor.config")
NOTES = (
    "torch_compile: torch.compile(dynamic=False, fullgraph=True, default inductor backend) of the 'torch' "
    "reference, compiled once per case outside the timed region.",
    "liger_kldiv: Liger-Kernel LigerKLDIVLoss(reduction='batchmean', log_target=True) on log_softmax(z/tau) "
    "flattened to [T*B, C] (kd_kl: the time-averaged [B, C]), times tau^2: a peer for the KL part only "
    "(tser_loss, hta_kl and nld_loss compute more).",
    "liger_jsd: Liger-Kernel LigerJSD(beta=0) (forward KL) on the same inputs as liger_kldiv: a peer for the "
    "KL part only.",
)
CSV_COLUMNS = ("op", "case", "backend", "kind", "pass", "shape", "T", "B", "C", "dtype", "median_ms", "p20_ms",
               "p80_ms", "reps", "peak_mem_bytes", "extra_seq_tensors", "bytes_min", "achieved_GBps", "pct_peak",
               "speedup_vs_reference", "mem_ratio_vs_reference", "compile_s")  # then speedup_vs_<peer> columns
CPU_MEMORY_RESOLUTION = (
    "CPU peak memory is read from the kernel's RSS counters, which it updates in batches of pages (tens of "
    "pages per thread or CPU): about +-0.25 MiB, so 'extra [T,B,C]' is meaningful on a CPU only where one "
    "[T,B,C] float32 tensor is several MiB")
# Agreement of a kernel's forward loss with the reference's (relative), checked once per case; NLD
# draws its noise differently per backend and is not compared.
VALUE_RTOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    loss: str
    steps: int  # T
    batch: int  # B
    classes: int  # C
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.steps, self.batch, self.classes)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        return f"{self.loss} {self.batch}x{self.classes} T={self.steps} {self.dtype_name}"

    @property
    def seq_fp32_bytes(self) -> int:
        """One ``[T, B, C]`` float32 tensor: the unit of ``extra_seq_tensors``."""
        return math.prod(self.shape) * 4

    @property
    def grad_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def input_bytes(self) -> int:
        return (math.prod(self.shape) + self.batch * self.classes) * self.dtype.itemsize

    def min_bytes(self, pass_: str) -> int:
        """Least bytes a fused kernel moves for ``pass_`` (see the module docstring)."""
        seq = math.prod(self.shape) * self.dtype.itemsize
        teacher = self.batch * self.classes * self.dtype.itemsize
        forward = seq + teacher
        if self.loss == "kd_kl":  # + save the float32 time-mean; backward: read it and the teacher, write the grad
            saved = self.batch * self.classes * 4
            forward, backward = forward + saved, saved + teacher + seq
        else:
            backward = 2 * seq + teacher
        return {"fwd": forward, "bwd": backward, "fwdbwd": forward + backward}[pass_]


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtypes


def build_grid(device: torch.device, quick: bool, losses: tuple[str, ...],
               only_dtypes: Optional[tuple[str, ...]] = None) -> list[Case]:
    """The grid's cases, dtype-major; ``only_dtypes``: just those of the grid's dtypes (--dtypes, e.g.
    the bf16 cases a deadline-stopped GPU session did not reach)."""
    if device.type == "cuda":
        dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
        # Full: B=512 up to C=1000, fewer samples at C=32000 and 128000 (the eager reference's [T, B, C]
        # temporaries of a 512x128000 batch would need ~20 GB, and one case costs seconds to time
        # with every peer: 20 cases per loss and dtype fit a device session).
        shapes = ([(4, 64, 100), (4, 256, 1000), (4, 256, 32000)] if quick else
                  [(t, b, c) for t in (4, 16) for b, c in ((512, 10), (512, 100), (512, 1000), (256, 32000),
                                                          (64, 128000))])
    else:
        dtypes = (torch.float32,)
        # A few CPU cores: the full grid keeps the B=512 up to C=1000 and its class counts up to
        # 128,000, with the batch shrunk at large C so that one case stays under a second (at C=32000
        # some implementations take seconds per call at B=128: HTA's per-row ordering of the classes).
        shapes = ([(4, 64, 100), (4, 64, 1000), (4, 16, 32000)] if quick else
                  [(t, b, c) for t in (4, 16) for b, c in ((512, 10), (512, 100), (512, 1000), (16, 32000),
                                                          (4, 128000))])
    if only_dtypes is not None:
        dtypes = tuple(dtype for dtype in dtypes if dtype in {DTYPE_NAMES[name] for name in only_dtypes})
    # dtype-major: a run cut short by a deadline has the float32 grid of every loss first
    return [Case(loss, t, b, c, dtype) for dtype in dtypes for loss in losses for t, b, c in shapes]


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher ``N(0, 3^2)`` and a student that roughly follows it (teacher + ``N(0, 2^2)`` noise
    per timestep): distributions as in training, with a few dominant classes (HTA's head)."""
    generator = torch.Generator(device=device).manual_seed(0)
    teacher = 3 * torch.randn(case.batch, case.classes, device=device, generator=generator)
    student = teacher + 2 * torch.randn(case.shape, device=device, generator=generator)
    return student.to(case.dtype).requires_grad_(), teacher.to(case.dtype)


# --------------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------------

kind_of = functools.partial(common.implementation_kind, reference=REFERENCE, peers=PEERS)


def loss_function(loss: str, backend: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from snnkd_fast import losses

    return functools.partial(getattr(losses, loss), backend=backend, **LOSS_KWARGS.get(loss, {}))


def loss_temperature(loss: str) -> float:
    """The loss's default temperature (the Liger peers scale and soften by the same one)."""
    import inspect

    from snnkd_fast import losses

    return inspect.signature(getattr(losses, loss)).parameters["temperature"].default


def make_liger(name: str, loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The KL part of ``loss`` with a Liger-Kernel loss: ``tau^2 KL(p || q_t)``, batch-meaned over
    the T*B rows (= (1/T) sum_t (1/B) sum_b). Log-softmax in float32, like our kernels' arithmetic."""
    from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

    tau = loss_temperature(loss)
    # Both take (student log-probs, teacher log-probs) of shape [rows, C] and reduce over the rows.
    liger = (LigerKLDIVLoss(reduction="batchmean", log_target=True) if name == "liger_kldiv"
             else LigerJSD(beta=0.0))  # beta=0: forward KL(p || q), averaged over the rows

    def liger_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(teacher.float() / tau, dim=-1)  # [B, C], once per sample
        if loss == "kd_kl":  # Hinton KD on the time-averaged logits
            log_q = F.log_softmax(student.float().mean(0) / tau, dim=-1)
        else:
            steps, batch, classes = student.shape
            log_q = F.log_softmax(student.reshape(steps * batch, classes) / tau, dim=-1, dtype=torch.float32)
            # Liger needs a contiguous target of the input's shape: the teacher repeated over T.
            log_p = log_p.expand(steps, batch, classes).reshape(steps * batch, classes)
        return tau ** 2 * liger(log_q, log_p)

    return liger_loss


def make_impl(name: str, loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``impl(student, teacher) -> loss`` of one implementation. torch_compile is a fresh compilation
    (done by the first call); raises (ImportError, ...) when a peer is not installed or does not work."""
    if name in PEERS:
        if name == "torch_compile":
            # A fresh dynamo state per case: compiled code is cached per function, and after
            # recompile_limit shapes dynamo would silently fall back to eager.
            torch._dynamo.reset()
            return torch.compile(loss_function(loss, REFERENCE), dynamic=False, fullgraph=True)
        return make_liger(name, loss)
    return loss_function(loss, name)


def select_implementations(device: torch.device, peers: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """([names to measure] in table order, {name: why it is not measured})."""
    import snnkd_fast

    names, skipped = common.native_backends(device, DEVICE_BACKENDS[device.type], snnkd_fast.backends("kd"),
                                            REFERENCE)
    for name in peers:
        if name in LIGER_PEERS:
            if importlib.util.find_spec("liger_kernel") is None:
                skipped[name] = "liger_kernel is not installed (`pip install liger-kernel`; GPU only)"
                continue
            if device.type != "cuda":
                skipped[name] = "Liger-Kernel's losses are Triton kernels for CUDA GPUs only"
                continue
            try:
                make_liger(name, LOSSES[0])
            except Exception as error:  # an incompatible version: reported, never fatal
                skipped[name] = f"{type(error).__name__}: {error}"
                continue
        names.append(name)
    return names, skipped


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------

def time_passes(impl: Callable, student: torch.Tensor, teacher: torch.Tensor, timer: Timer,
                device_timer: Optional[Timer] = None) -> dict[str, Timing]:
    return common.time_passes(timer, lambda: impl(student, teacher), lambda loss: loss.backward(), student,
                              device_timer)


def configure_compile(device: torch.device) -> None:
    """On a CPU, inductor compiles in this process: its default pool of compile workers would keep
    the few cores busy (starting up, importing torch) while the compiled code is being timed."""
    if device.type == "cpu":
        import torch._inductor.config

        torch._inductor.config.compile_threads = 1


def measure_peak_memory(impl: Callable, name: str, case: Case, student: torch.Tensor, teacher: torch.Tensor,
                        device: torch.device, warm: bool) -> tuple[int, bool]:
    """(bytes one fwd+bwd needs above the inputs, whether the peak counter could be reset first).
    ``warm``: ``impl`` already ran at this shape (the timing did). Otherwise (a fresh CPU process) a
    tiny warm-up does one-time set-up (thread pools, lazy state) that is no cost of the op -- two
    samples, so that a kernel parallel over samples starts its thread pool there and not in the
    measured call; a compiled peer is shape-specialised, so it is warmed up (compiled) at the
    case's shape."""
    if not warm:
        if name == "torch_compile":
            impl(student, teacher).backward()
        else:
            samples = min(2, student.shape[1])
            tiny = student[:1, :samples].detach().clone().requires_grad_()
            impl(tiny, teacher[:samples]).backward()
            del tiny
    student.grad = None
    peak = common.measure_peak(lambda: impl(student, teacher).backward(), device)
    student.grad = None
    return peak


def memory_spec(case: Case) -> dict[str, Any]:
    """The case, for a CPU memory measurement in another process (``measure_spec``)."""
    return {"loss": case.loss, "shape": list(case.shape), "dtype": case.dtype_name}


def measure_spec(spec: dict[str, Any]) -> tuple[int, bool]:
    """One CPU memory measurement, in a fresh process (``common.memory_worker_main``)."""
    if spec["backend"] == "torch_compile":
        configure_compile(torch.device("cpu"))
    steps, batch, classes = spec["shape"]
    case = Case(spec["loss"], steps, batch, classes, getattr(torch, spec["dtype"]))
    student, teacher = make_inputs(case, torch.device("cpu"))
    impl = make_impl(spec["backend"], case.loss)
    return measure_peak_memory(impl, spec["backend"], case, student, teacher, torch.device("cpu"), warm=False)


def reference_fits(case: Case, device: torch.device, factors: dict[tuple[str, torch.dtype], float]) -> Optional[str]:
    """None if the reference's fwd+bwd should fit in the free GPU memory, else why not. Its need is
    extrapolated from its measured peak on a small probe shape (once per loss and dtype): the
    reference's temporaries all scale with T*B*C."""
    if device.type != "cuda":
        return None
    key = (case.loss, case.dtype)
    if key not in factors:
        probe = Case(case.loss, 2, 16, 8192, case.dtype)
        student, teacher = make_inputs(probe, device)
        impl = make_impl(REFERENCE, probe.loss)
        impl(student, teacher).backward()  # warm-up
        peak, _ = measure_peak_memory(impl, REFERENCE, probe, student, teacher, device, warm=True)
        factors[key] = peak / probe.seq_fp32_bytes
        del student, teacher
        torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    need = factors[key] * case.seq_fp32_bytes * 1.1  # 10% margin: fragmentation
    if need <= free:
        return None
    return (f"the reference would need about {need / 2**30:.1f} GiB ({factors[key]:.1f} [T,B,C] float32 tensors, "
            f"extrapolated) beyond the inputs; {free / 2**30:.1f} GiB free")


def check_value(name: str, value: torch.Tensor, reference_value: Optional[torch.Tensor], case: Case) -> Optional[str]:
    """A message if a kernel's forward loss disagrees with the reference's."""
    if reference_value is None or case.loss == "nld_loss" or kind_of(name) != "ours":
        return None
    ours, ref = float(value.detach()), float(reference_value)
    tolerance = VALUE_RTOL.get(case.dtype, 1e-3) * max(abs(ref), 1e-6)
    if not math.isfinite(ours) or abs(ours - ref) > tolerance:
        return f"forward loss {ours:.6g} differs from the reference's {ref:.6g}"
    return None


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------

def make_rows(case: Case, name: str, timings: dict[str, Timing], peak_mem: Optional[int],
              peak_bandwidth_bps: float, compile_s: Optional[float]) -> list[dict[str, Any]]:
    def fields(pass_: str) -> dict[str, Any]:
        return {"op": case.loss, "case": case.label, "backend": name, "kind": kind_of(name), "pass": pass_,
                "shape": list(case.shape), "T": case.steps, "B": case.batch, "C": case.classes,
                "dtype": case.dtype_name}

    rows = common.pass_rows(fields, timings, peak_mem, case.min_bytes, peak_bandwidth_bps)
    for row in rows:
        total_mem = row["peak_mem_bytes"]
        row["extra_seq_tensors"] = (None if total_mem is None else
                                    (total_mem - case.grad_bytes) / case.seq_fp32_bytes)
        row["compile_s"] = compile_s
    return rows


def summary_table(rows: list[dict[str, Any]], peers: tuple[str, ...]) -> str:
    """One line per case and kernel backend of ours: fwd+bwd time, speed-ups and extra memory."""
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["pass"] == "fwdbwd":
            by_case.setdefault(row["case"], {})[row["backend"]] = row
    header = ["case", "backend", "fwd+bwd ms", "vs ref", *(f"vs {PEER_LABELS[p]}" for p in peers),
              "extra [T,B,C]", "ref extra"]
    lines = []
    for case, backends in by_case.items():
        reference = backends.get(REFERENCE, {})
        for name, row in backends.items():
            if row["kind"] == "ours":
                lines.append([case, name, fmt_ms(row["median_ms"]), fmt_ratio(row["speedup_vs_reference"]),
                              *(fmt_ratio(row.get(f"speedup_vs_{p}")) for p in peers),
                              fmt_extra(row["extra_seq_tensors"]), fmt_extra(reference.get("extra_seq_tensors"))])
    return common.text_table(header, lines)


class CaseRunner:
    """Measures every implementation on one case and prints the case's table."""

    def __init__(self, device: torch.device, names: list[str], peers: tuple[str, ...], timer: Timer,
                 bandwidth: float, compile_cases: set[Case], compile_policy: str, skipped: dict[str, str],
                 mismatches: dict[str, str], cpu_memory: Optional[common.CpuMemoryMeter], compile_budget_s: float):
        self.device, self.names, self.peers, self.timer, self.bandwidth = device, names, peers, timer, bandwidth
        self.compile_cases, self.compile_policy = compile_cases, compile_policy
        self.skipped, self.mismatches, self.cpu_memory = skipped, mismatches, cpu_memory
        self.probe_factors: dict[tuple[str, torch.dtype], float] = {}
        self.compile_budget_s, self.compile_spent_s = compile_budget_s, 0.0
        self.failures: dict[str, str] = {}  # our kernels' failures by "name @ case"; main() stores it in meta
        self.device_timer = common.device_timer(device, timer.budget_s)

    def skip(self, name: str, case: Case, reason: str, show: bool = True) -> None:
        if show:
            print(f"  ! {name} skipped: {reason}")
        self.skipped[f"{name} @ {case.label}"] = reason

    def measure(self, name: str, case: Case, student: torch.Tensor, teacher: torch.Tensor,
                reference_value: Optional[torch.Tensor]) -> tuple[dict[str, Timing], Optional[int], Optional[float],
                                                                  torch.Tensor]:
        """(timings, CUDA peak memory, compile seconds, forward loss value) of one implementation."""
        device = self.device
        impl = make_impl(name, case.loss)
        first_start = time.perf_counter()
        value = impl(student, teacher)
        value.backward()  # compiles torch_compile's forward and backward graphs, outside the timing
        common.synchronize(device)
        first_s = time.perf_counter() - first_start
        student.grad = None
        compile_s = first_s if name == "torch_compile" else None
        if compile_s is not None:
            self.compile_spent_s += compile_s
            print(f"  torch_compile: first fwd+bwd (compilation) {first_s:.1f} s")
        mismatch = check_value(name, value, reference_value, case)
        if mismatch:
            print(f"  ! {name}: {mismatch}")
            self.mismatches[f"{name} @ {case.label}"] = mismatch
        timings = time_passes(impl, student, teacher, self.timer, self.device_timer)
        peak_mem = None
        if device.type == "cuda":
            peak_mem = measure_peak_memory(impl, name, case, student, teacher, device, warm=True)[0]
        return timings, peak_mem, compile_s, value.detach()

    def __call__(self, case: Case) -> list[dict[str, Any]]:
        print(f"\n{case.label}  [{'x'.join(map(str, case.shape))}]")
        case_start = time.perf_counter()
        student, teacher = make_inputs(case, self.device)
        no_room = reference_fits(case, self.device, self.probe_factors)
        measured: dict[str, tuple[dict[str, Timing], Optional[int], Optional[float]]] = {}
        reference_value: Optional[torch.Tensor] = None
        for name in self.names:
            if name == "torch_compile" and case not in self.compile_cases:
                self.skip(name, case, f"--compile {self.compile_policy}: not compiled for this case", show=False)
                continue
            if name == "torch_compile" and self.compile_spent_s > self.compile_budget_s:
                self.skip(name, case, f"compilation has taken {self.compile_spent_s:.0f} s of this run, over its "
                                      f"budget of {self.compile_budget_s:.0f} s (--compile-budget-s)")
                continue
            if no_room and kind_of(name) != "ours":
                self.skip(name, case, no_room)
                continue
            try:
                timings, peak_mem, compile_s, value = self.measure(name, case, student, teacher, reference_value)
            except Exception as error:
                if kind_of(name) == "ours" and not isinstance(error, torch.cuda.OutOfMemoryError):
                    # our own kernels failing is a bug: recorded (exit status 1), the run goes on
                    common.record_failure(self.failures, name, case.label, error)
                else:
                    self.skip(name, case, f"failed: {type(error).__name__}: {error}")
                student.grad = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if name == REFERENCE:
                reference_value = value
            measured[name] = (timings, peak_mem, compile_s)
        timing_s = time.perf_counter() - case_start
        del student, teacher
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.cpu_memory is not None:
            measured = {name: (timings, self.cpu_memory(name, memory_spec(case)), compile_s)
                        for name, (timings, _, compile_s) in measured.items()}
        case_rows = [row for name, (timings, peak_mem, compile_s) in measured.items()
                     for row in make_rows(case, name, timings, peak_mem, self.bandwidth, compile_s)]
        common.add_ratios(case_rows, REFERENCE, self.peers)
        print(common.case_table(case_rows, {peer: PEER_LABELS[peer] for peer in self.peers},
                                [("extra [T,B,C]", lambda total: fmt_extra(total["extra_seq_tensors"]))]))
        print(f"  ({timing_s:.1f} s timing, {time.perf_counter() - case_start - timing_s:.1f} s memory)")
        return case_rows


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = common.bench_parser(__doc__.split("\n\n")[0], "a small fp32 grid (T=4, three shapes)", PEERS)
    parser.add_argument("--losses", type=lambda text: common.parse_names(text, LOSSES, "loss"), default=LOSSES,
                        help=f"comma-separated losses to measure (default: {','.join(LOSSES)})")
    parser.add_argument("--dtypes", type=lambda text: common.parse_names(text, tuple(DTYPE_NAMES), "dtype"),
                        help="comma-separated dtypes of the grid to measure (default: the grid's: float32 on a CPU "
                             "and in the quick GPU grid, float32 and bfloat16 in the full GPU grid)")
    parser.add_argument("--compile", choices=("all", "smallest", "none"),
                        help="which cases the torch_compile peer compiles (default: 'smallest' with --quick on a "
                             "CPU, where inductor compiles C++ for seconds per loss and shape, else 'all')")
    parser.add_argument("--compile-budget-s", type=float,
                        help="stop compiling (skip torch_compile, with the reason) once compilations took this long "
                             "in total (default: 30 with --quick on a CPU, 60 with --quick on a GPU, 180 on a GPU, "
                             "else no limit)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> Optional[Path]:
    """Run the benchmark; returns the JSON file written."""
    started = common.script_start(argv, parse_args, measure_spec, MEMORY_PRELOAD)
    if started is None:  # a memory-measuring process: served
        return None
    argv, args, start, device, threads = started
    quick_cpu = args.quick and device.type == "cpu"
    compile_policy = args.compile or ("smallest" if quick_cpu else "all")
    # A quick run bounds compilation (cold inductor caches: seconds to tens of seconds per case).
    compile_budget_s = (args.compile_budget_s if args.compile_budget_s is not None
                        else 30.0 if quick_cpu else 60.0 if args.quick else 180.0 if device.type == "cuda"
                        else math.inf)
    if compile_policy == "none" and "torch_compile" in args.peers:
        args.peers = tuple(peer for peer in args.peers if peer != "torch_compile")
    if "torch_compile" in args.peers:
        configure_compile(device)

    names, skipped = select_implementations(device, args.peers)
    if compile_policy == "none":
        skipped["torch_compile"] = "--compile none"
    peers = tuple(name for name in names if name in PEERS)
    grid = build_grid(device, args.quick, args.losses, args.dtypes)
    grid_dtypes = [name for name, dtype in DTYPE_NAMES.items()
                   if any(case.dtype == dtype for case in build_grid(device, args.quick, args.losses))]
    measured_dtypes = [name for name in grid_dtypes if any(case.dtype == DTYPE_NAMES[name] for case in grid)]
    # Some of the grid's dtypes only (--dtypes): the file is named after them (common.result_name)
    dtype_subset = measured_dtypes if measured_dtypes != grid_dtypes else None
    compile_cases = set(grid)
    if compile_policy == "smallest" and grid:
        smallest = min(math.prod(case.shape) for case in grid)
        compile_cases = {case for case in grid if math.prod(case.shape) == smallest}
    # Fewer repetitions than bench_lif: on a CPU some implementations take a second per call.
    if args.quick:
        timer = common.sample_timer(args, device, budget_s=0.15, warmup_s=0.03, min_reps=5, min_warmup=2)
    elif device.type == "cpu":
        timer = common.sample_timer(args, device, budget_s=0.2, warmup_s=0.05, min_reps=5, min_warmup=2)
    else:
        # A GPU case takes microseconds to a few milliseconds: 0.1 s of samples is tens to thousands of
        # repetitions, and 100 cases with every peer fit a device session more nearly.
        timer = common.sample_timer(args, device, budget_s=0.1, warmup_s=0.03, min_reps=10)
    bandwidth, bandwidth_source = common.peak_bandwidth(device, timer)
    # `skipped` and `mismatches` are stored by reference: per-case skips are added to them below.
    mismatches: dict[str, str] = {}
    meta = common.run_metadata(
        device, argv, threads, op=OP, grid="quick" if args.quick else "full", losses=list(args.losses),
        loss_kwargs=LOSS_KWARGS, reference=REFERENCE, peers=list(peers), table_peers=list(peers),
        peer_labels=PEER_LABELS, skipped=skipped, compile_policy=compile_policy,
        compile_budget_s=None if math.isinf(compile_budget_s) else compile_budget_s, value_mismatches=mismatches,
        peak_bandwidth_Bps=bandwidth, peak_bandwidth_source=bandwidth_source, notes=list(NOTES),
        memory_method=common.memory_method(device),
        extra_seq_tensors="(fwd+bwd peak - student gradient bytes) / bytes of one [T,B,C] float32 tensor",
        memory_resolution=CPU_MEMORY_RESOLUTION if device.type == "cpu" else None, failures={},
        sample_budget_s=timer.budget_s, dtype_subset=dtype_subset)
    common.print_run_header(meta)
    if "torch_compile" in peers and compile_policy == "smallest":
        print(f"torch_compile: compiled for the smallest case(s) only ({len(compile_cases)} of {len(grid)}): on a "
              "CPU inductor generates and compiles C++ for each loss and shape (seconds each), too slow for a quick "
              "run; --compile all measures every case")
    if device.type == "cpu":
        print(f"note: {CPU_MEMORY_RESOLUTION}")

    out_dir = args.out or default_out_dir(device)
    rows: list[dict[str, Any]] = common.resumed_rows(out_dir, FILE_STEM, meta) if args.resume else []
    done = {row["case"] for row in rows}
    cpu_memory = common.CpuMemoryMeter(__file__, threads) if device.type == "cpu" else None
    run = CaseRunner(device, names, peers, timer, bandwidth, compile_cases, compile_policy, skipped, mismatches,
                     cpu_memory, compile_budget_s)
    run.failures = meta["failures"]  # the same dict: stored by reference, like `skipped`
    try:
        for case in grid:
            if case.label not in done:
                rows += run(case)
    except KeyboardInterrupt:  # a deadline (run_gpu.sh): keep what was measured
        meta["interrupted"] = common.interrupted_note(len(rows))
    finally:
        if cpu_memory is not None:
            cpu_memory.close()

    print(f"\nsummary: fwd+bwd of our kernels ({meta['grid']} grid; speed-up = baseline time / ours; extra = peak "
          "memory beyond the student gradient, in [T,B,C] float32 tensors)")
    print(summary_table(rows, peers))
    return common.write_results(out_dir, FILE_STEM, meta, rows, CSV_COLUMNS, start)


if __name__ == "__main__":
    common.reexec_with_timing_malloc()
    written = main()
    sys.exit(common.exit_status([written]) if written else 0)
