"""Long-run stability and determinism of the kernels (CPU, and the GPU where there is one).

(a) 1,000 SGD steps of a tiny student (Linear -> LIFNode -> Linear, cpp backend, per_timestep_kl +
    cross-entropy against a fixed teacher) do not grow the resident set (VmRSS after step 100 vs
    after step 1,000), and two runs from the same seeds give bit-identical parameters. On the GPU
    (cuda and compiled triton backends; skipped without one) the same training does not grow the
    caching allocator's live bytes (torch.cuda.memory_allocated after step 100 vs after step 1,000).
(b) The reductions that cross threads (CPU) or blocks / programs (GPU) are deterministic: PLIF's dL/dw
    (a sum over every neuron and step) and a [B, C] teacher's gradient (a sum over timesteps), as well
    as the losses and student gradients, are bit-identical across repeated calls and across
    torch.set_num_threads(1) vs 2 (which the GPU kernels ignore). Tensors are on device_for(backend).
"""
import gc
import os

import pytest
import torch

import snnkd_fast
from snnkd_fast import losses as L
from snnkd_fast import nn as snn

from conftest import device_for

# Tensors are built on device_for(backend): compiled Triton gets CUDA tensors (conftest's GPU skip rule).
TRITON_ON_CUDA_TENSORS = True

RSS_SLACK_BYTES = 8 * 2 ** 20
# memory_allocated counts live tensors exactly (in 512-byte blocks): the same step of the cycle holds the
# same tensors, so any growth is a leak; 64 KiB is less than one 512-byte block leaked per step.
CUDA_SLACK_BYTES = 64 * 2 ** 10
STEPS, RSS_FIRST_READ = 1000, 100


def _require(backend, family="lif"):
    status = snnkd_fast.backends(family)[backend]
    if not status:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def _cuda_allocated_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _train(steps: int, rss_at=(), snapshot_at=None, backend="cpp", device="cpu", memory=_rss_bytes):
    """SGD on a fixed cycle of 8 batches [T=4, B=16, 32] on ``device``; returns (parameters,
    {step: memory()}, snapshot). The model and data are made on the CPU (the same values on every
    device) and moved."""
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), snn.LIFNode(tau=2.0, step_mode="m", backend=backend),
                                torch.nn.Linear(64, 10)).to(device)
    teacher = torch.nn.Linear(32, 10).to(device)  # a fixed random ANN teacher
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(99)
    data = [(torch.randn(4, 16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]
    data = [(x.to(device), y.to(device)) for x, y in data]
    with torch.no_grad():
        targets = [teacher(x.mean(0)) for x, _ in data]
    rss, snapshot = {}, None
    for step in range(1, steps + 1):
        x, y = data[step % len(data)]
        model[1].reset()
        out = model(x)
        loss = L.per_timestep_kl(out, targets[step % len(data)], temperature=4.0, backend=backend) + \
            torch.nn.functional.cross_entropy(out.mean(0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in rss_at:
            gc.collect()
            rss[step] = memory()
        if step == snapshot_at:
            snapshot = [p.detach().clone() for p in model.parameters()]
    assert torch.isfinite(loss), "training diverged"
    return [p.detach().clone() for p in model.parameters()], rss, snapshot


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc/self/status (Linux)")
def test_thousand_steps_no_rss_growth_and_reproducible(restore_threads):
    _require("cpp")
    _require("cpp", "kd")
    # One intra-op thread: these tensors are tiny, and on a shared 2-core machine every OpenMP fork/join
    # of the kernels (they split work into 256-neuron blocks, grain 1) waits for a busy core: ~10x
    # slower per step. Thread counts are (b)'s subject.
    torch.set_num_threads(1)
    final, rss, at_200 = _train(STEPS, rss_at=(RSS_FIRST_READ, STEPS), snapshot_at=200)
    growth = rss[STEPS] - rss[RSS_FIRST_READ]
    assert growth < RSS_SLACK_BYTES, f"RSS grew by {growth / 2 ** 20:.1f} MiB between step {RSS_FIRST_READ} and {STEPS}"
    # a second run from the same seeds: bit-identical parameters (200 steps keep the suite fast; the
    # first run's parameters at step 200 were snapshotted)
    again, _, _ = _train(200)
    for a, b in zip(at_200, again):
        assert torch.equal(a, b), "two runs with the same seeds diverged"
    assert not all(torch.equal(a, b) for a, b in zip(at_200, final)), "the parameters did not train"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_thousand_steps_no_gpu_memory_growth(backend):
    """GPU counterpart of the RSS check: the live bytes of the caching allocator after step 1,000 are
    those after step 100 (no tensor kept per step by the kernels, their autograd nodes or the module)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _require(backend)
    _require(backend, "kd")
    if device_for(backend) != "cuda":
        pytest.skip("triton runs in the interpreter (TRITON_INTERPRET=1): CPU tensors only")
    final, allocated, at_200 = _train(STEPS, rss_at=(RSS_FIRST_READ, STEPS), snapshot_at=200, backend=backend,
                                      device="cuda", memory=_cuda_allocated_bytes)
    growth = allocated[STEPS] - allocated[RSS_FIRST_READ]
    assert growth <= CUDA_SLACK_BYTES, (f"GPU memory_allocated grew by {growth / 2 ** 10:.1f} KiB between step "
                                        f"{RSS_FIRST_READ} and {STEPS}")
    assert not all(torch.equal(a, b) for a, b in zip(at_200, final)), "the parameters did not train"


# --------------------------------------------------------------------------------------------------
# (b) determinism across calls and thread counts
# --------------------------------------------------------------------------------------------------

# cpp: shapes that split into many tasks over the threads (T = 8: 75 blocks of 256 neurons; T = 16: 19
# blocks of 1024, the last partial -- csrc/lif/lif_cpu_typed.h, cpu_block; 64 samples); the GPU kernels
# (cuda, compiled triton) take the same shapes: many blocks / programs.
# triton under the interpreter (single-threaded and slow): small shapes, several programs.
SHAPES = {"cpp": {"plif": (8, 64, 300), "plif_long": (16, 64, 300), "loss": (4, 64, 100)},
          "triton": {"plif": (3, 4, 300), "plif_long": (3, 4, 300), "loss": (2, 5, 40)}}
BACKENDS = ["cpp", "triton"] + [b for b in ("cuda",) if snnkd_fast.backends("lif")[b] or snnkd_fast.backends("kd")[b]]


def _shapes(backend):
    return SHAPES["triton" if backend == "triton" and device_for(backend) == "cpu" else "cpp"]


def _plif_grads(backend, shape_name="plif"):
    g = torch.Generator().manual_seed(5)
    device = device_for(backend)
    shape = _shapes(backend)[shape_name]
    x = (torch.randn(shape, generator=g) * 1.5 + 0.4).to(device).requires_grad_(True)
    w = torch.tensor(0.3, device=device, requires_grad=True)
    grad = torch.randn(shape, generator=g).to(device)
    spikes, v = snnkd_fast.plif_multistep(x, w, backend=backend, return_v=True, surrogate="atan")
    ((spikes * grad).sum() + v.sum()).backward()
    return [w.grad, x.grad, spikes.detach()]


def _loss_grads(name, backend):
    g = torch.Generator().manual_seed(6)
    device = device_for(backend)
    T, B, C = _shapes(backend)["loss"]
    student = (torch.randn(T, B, C, generator=g) * 3).to(device).requires_grad_(True)
    teacher = (torch.randn(B, C, generator=g) * 3).to(device).requires_grad_(True)  # its gradient sums over t
    kwargs = {"seed": 3} if name == "nld_loss" else {}
    if name == "nld_loss":
        kwargs["per_timestep"] = True
    loss = getattr(L, name)(student, teacher, backend=backend, **kwargs)
    loss.backward()
    return [teacher.grad, loss.detach(), student.grad]


CASES = [("plif", None), ("plif", "plif_long")] + [("loss", n) for n in ("kd_kl", "per_timestep_kl", "tser_loss",
                                                                          "hta_kl", "nld_loss")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what, name", CASES, ids=[n or w for w, n in CASES])
def test_reductions_bit_identical_across_calls_and_threads(what, name, backend, restore_threads):
    _require(backend, "lif" if what == "plif" else "kd")
    run = (lambda: _plif_grads(backend, name or "plif")) if what == "plif" else (lambda: _loss_grads(name, backend))
    torch.set_num_threads(2)
    first, second = run(), run()
    torch.set_num_threads(1)
    single = run()
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b), "differs between two calls"
        assert torch.equal(a, c), "differs between 2 threads and 1"
