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


def skip_unless_runnable(backend: str, device: str) -> None:
    status = snnkd_fast.backends()[backend]
    if not status:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")


@pytest.fixture(params=KERNEL_TARGETS, ids=[f"{b}-{d}" for b, d in KERNEL_TARGETS])
def kernel_target(request):
    backend, device = request.param
    skip_unless_runnable(backend, device)
    return backend, device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
