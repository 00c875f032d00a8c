"""What is built and usable here, and the one place that chooses a backend.

``snnkd_fast.backends()`` reports, for each backend, whether it works on this machine and why not;
every "backend not available" error quotes that reason.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str = ""  # why not, and how to fix it

    def __bool__(self) -> bool:
        return self.available


# The compiled extension registers the torch.ops.snnkd_fast ops on import. Python's import lock
# makes this import thread-safe; the result is cached.
try:
    from . import _C  # noqa: F401

    _EXTENSION_ERROR = ""
except ImportError as error:  # pragma: no cover - depends on the install
    _EXTENSION_ERROR = (f"the C++ extension snnkd_fast._C could not be imported ({error}); reinstall with "
                        "`pip install --no-build-isolation -e .`")


def extension_loaded() -> bool:
    return not _EXTENSION_ERROR


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if not extension_loaded() or not hasattr(torch.ops.snnkd_fast, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"snnkd_fast::{op}", dispatch_key)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_takes_cpu_tensors() -> bool:
    """Whether backend='triton' may run on CPU tensors: under the interpreter. Its own predicate so that
    tests/triton_aot_compile.py can allow that (to compile, without a GPU, the kernels a CPU call
    launches) while every launch still sees the real triton_interpret()."""
    return triton_interpret()


def triton_launch_options(**options) -> dict:
    """``options`` (num_warps, enable_fp_fusion, ...) for a compiled Triton launch; none under the
    interpreter, which refuses launch options."""
    return {} if triton_interpret() else options


# Triton's interpreter patches triton.language and keeps the grid position in module globals for the
# duration of a launch, so two launches from two threads corrupt each other ("Did you forget to add
# @triton.jit ?", or wrong results). While interpreting, launches are serialized; on a GPU this is a
# no-op.
_INTERPRETER_LOCK = threading.Lock()


def triton_launch_guard():
    """Context manager around a Triton kernel launch: the interpreter lock under TRITON_INTERPRET=1."""
    return _INTERPRETER_LOCK if triton_interpret() else contextlib.nullcontext()


# The compiled op that carries each op family's kernels (its CPU/CUDA registrations say what is built).
OP_FAMILIES = {"lif": "lif_forward", "kd": "kd_rows_forward"}
# "auto" on a GPU tries these in order: CUDA C++ first for both families. Measured on an H100
# (benchmarks/results/nvidia-h100-80gb-hbm3/): the CUDA loss kernels beat the Triton ones in 14 of 15
# quick-grid cases (1.0-3.4x fwd+bwd); the CUDA neuron kernels in 19 of 20 (1.0-6x; conv T=1: 0.82x).
GPU_ORDER = {"lif": ("cuda", "triton"), "kd": ("cuda", "triton")}


def _detect(family: str) -> dict[str, BackendStatus]:
    op = OP_FAMILIES[family]
    if _has_kernel(op, "CPU"):
        cpp = BackendStatus(True)
    else:
        cpp = BackendStatus(False, _EXTENSION_ERROR or f"snnkd_fast._C has no CPU kernel for {op} (rebuild it)")
    if _has_kernel(op, "CUDA"):
        cuda = BackendStatus(True) if torch.cuda.is_available() else BackendStatus(False, "no CUDA device is visible")
    elif not extension_loaded():
        cuda = BackendStatus(False, _EXTENSION_ERROR)
    elif _has_kernel("lif_forward", "CUDA"):
        cuda = BackendStatus(False, f"the CUDA C++ kernels of {family!r} ops are not implemented yet; use "
                                    "backend='triton' on the GPU")
    else:
        cuda = BackendStatus(False, "the CUDA kernels were not built (torch is a CPU build, nvcc was not found, or no "
                                    "GPU was visible at build time): reinstall on a CUDA build of torch, with "
                                    "FORCE_CUDA=1 on a machine without a GPU")
    if importlib.util.find_spec("triton") is None:
        triton = BackendStatus(False, "triton is not installed (`pip install triton`; Linux wheels only)")
    elif not (torch.cuda.is_available() or triton_interpret()):
        triton = BackendStatus(False, "triton needs a CUDA GPU, or TRITON_INTERPRET=1 set before importing "
                                      "snnkd_fast to run its kernels on the CPU")
    elif triton_interpret() and _interpreter_problem():
        triton = BackendStatus(False, _interpreter_problem())
    else:
        triton = BackendStatus(True)
    return {"torch": BackendStatus(True), "cpp": cpp, "cuda": cuda, "triton": triton}


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> str:
    """Why Triton's interpreter cannot run our kernels here ('' when it can): probed once, by running one.
    An installed triton that fails to import (e.g. one built for another torch) is such a reason too:
    only backend='triton' is refused, the package still imports."""
    try:
        from ._triton_interpreter_probe import interpreter_problem
    except Exception as error:  # any failure inside a third-party import
        return f"triton is installed but cannot be imported ({type(error).__name__}: {error})"
    return interpreter_problem()


# Detected once, at import: what is built cannot change in a running process, and a plain dict lookup
# keeps resolve_backend traceable by torch.compile (no graph break on a dispatcher query).
_STATUS = {family: _detect(family) for family in OP_FAMILIES}


def backends(family: str = "lif") -> dict[str, BackendStatus]:
    """Which backends work here for an op family ("lif": the neurons, "kd": the fused KD losses):
    ``{"torch": BackendStatus(True), "cpp": ..., "cuda": ..., "triton": ...}``."""
    if family not in _STATUS:
        raise ValueError(f"backends: family={family!r}; choose one of {', '.join(_STATUS)}")
    return dict(_STATUS[family])


def resolve_backend(backend: str, device: torch.device, op_name: str, family: str = "lif") -> str:
    """The backend to run ``op_name`` on a tensor of ``device``: "auto" picks a kernel (CPU: cpp;
    CUDA: GPU_ORDER[family]), else the torch reference; an explicit choice that cannot run raises a
    clear error naming what is missing."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op_name}: backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    status = _STATUS[family]
    if backend == "auto":
        order = GPU_ORDER[family] if device.type == "cuda" else ("cpp",)
        return next((name for name in order if status[name]), "torch")
    if not status[backend]:
        raise RuntimeError(f"{op_name}: backend={backend!r} is not available: {status[backend].reason}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"{op_name}: backend='cpp' runs on CPU tensors; the input is on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"{op_name}: backend='cuda' runs on CUDA tensors; the input is on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_takes_cpu_tensors()):
        raise ValueError(f"{op_name}: backend='triton' runs on CUDA tensors, or on CPU tensors under "
                         f"TRITON_INTERPRET=1; the input is on {device}")
    return backend
