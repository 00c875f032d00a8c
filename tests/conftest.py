"""Test configuration shared by the whole suite.

Triton kernels run on the CPU through Triton's interpreter; it is chosen when a kernel is first
decorated, so TRITON_INTERPRET must be set before anything imports triton. On a machine with a GPU
the variable is left alone and the Triton tests run on the GPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import snnkd_fast  # noqa: E402  (after TRITON_INTERPRET)


def pytest_report_header(config):
    status = snnkd_fast.backends()
    lines = [f"snnkd_fast backends: " + ", ".join(f"{name}={'yes' if s else 'no'}" for name, s in status.items())]
    lines += [f"  {name}: {s.reason}" for name, s in status.items() if not s]
    return lines


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module whose tensors are tiny: more threads only add fork/join cost
    (and stall on a busy machine). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (backend, device) pairs of kernels under test; each is skipped with the reason it cannot run here.
KERNEL_TARGETS = [("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


def skip_unless_runnable(backend: str, device: str, family: str = "lif") -> None:
    status = snnkd_fast.backends(family)[backend]
    if not status:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")


def device_for(backend: str) -> str:
    """The device a test gives ``backend``'s tensors: the GPU for cuda, and for triton unless it runs in
    the interpreter (TRITON_INTERPRET=1, the CPU)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()
                             and os.environ.get("TRITON_INTERPRET") != "1"):
        return "cuda"
    return "cpu"


@pytest.fixture(params=KERNEL_TARGETS, ids=[f"{b}-{d}" for b, d in KERNEL_TARGETS])
def kernel_target(request):
    backend, device = request.param
    skip_unless_runnable(backend, device)
    return backend, device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _runs_triton_on_cpu_tensors(item) -> bool:
    """A test parametrized with backend "triton" in a module that builds its tensors on the CPU (the
    interpreter's device): such modules leave ``TRITON_ON_CUDA_TENSORS`` unset. Modules that choose
    the device per backend (``device_for``) set it, tests that do mark themselves ``cuda_tensors``,
    and ("triton", "cpu") target pairs are skipped by ``skip_unless_runnable``."""
    callspec = getattr(item, "callspec", None)
    if (callspec is None or getattr(item.module, "TRITON_ON_CUDA_TENSORS", False)
            or item.get_closest_marker("cuda_tensors") is not None):
        return False
    return any(value == "triton" for value in callspec.params.values() if isinstance(value, str))


def pytest_collection_modifyitems(config, items):
    # On a GPU machine Triton compiles for the GPU (TRITON_INTERPRET unset) and refuses CPU tensors,
    # by design (a clear ValueError); the tests written for the interpreter are skipped there, not
    # failed. The GPU runs Triton through the device-aware suites (kernel_target, KD_TARGETS).
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1; covered on the GPU by the "
                                   "device-aware suites")
    for item in items:
        if _runs_triton_on_cpu_tensors(item):
            item.add_marker(skip)
