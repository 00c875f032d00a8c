"""The fused losses as ops: clear errors for bad input, gradcheck through the kernels' autograd,
torch.library.opcheck, torch.compile(fullgraph=True), and a memory test that fails if a [T, B, C]
temporary appears."""
import json
import os
import subprocess
import sys

import pytest
import torch

import snnkd_fast
import snnkd_fast.losses as L

from conftest import device_for
from kd_helpers import CASES

S = torch.randn(4, 3, 10)
U = torch.randn(3, 10)


# Every argument is checked before the backend is resolved, so each error names the argument whatever
# the backend: "cuda" cannot run here (no GPU, or CPU tensors), and the torch backend would otherwise
# hand a bad generator to torch.randn.
@pytest.mark.parametrize("backend", ["auto", "torch", "cpp", "cuda"])
@pytest.mark.parametrize("call, error, match", [
    (lambda b: L.per_timestep_kl(S, torch.randn(3, 11), backend=b), ValueError, "teacher shape"),
    (lambda b: L.per_timestep_kl(S, torch.randn(2, 10), backend=b), ValueError, "teacher shape"),
    (lambda b: L.per_timestep_kl(S, torch.randn(5, 3, 10), backend=b), ValueError, "same T"),
    (lambda b: L.per_timestep_kl(S[0], U, backend=b), ValueError, r"student must be \[T, B, C\]"),
    (lambda b: L.per_timestep_kl(S.long(), U, backend=b), TypeError, "student must be float"),
    (lambda b: L.per_timestep_kl(S, U.to(torch.complex64), backend=b), TypeError, "teacher must be float"),
    (lambda b: L.per_timestep_kl(S, "teacher", backend=b), TypeError, "teacher must be a torch.Tensor"),
    (lambda b: L.per_timestep_kl(torch.empty(0, 3, 10), U, backend=b), ValueError, "T=0"),
    (lambda b: L.per_timestep_kl(torch.empty(4, 3, 0), torch.empty(3, 0), backend=b), ValueError, "C=0"),
    (lambda b: L.per_timestep_kl(S, U, temperature=0.0, backend=b), ValueError, "temperature must be"),
    (lambda b: L.kd_kl(S, U, temperature=-1.0, backend=b), ValueError, "temperature"),
    (lambda b: L.per_timestep_kl(S, U, reduction="avg", backend=b), ValueError, "reduction='avg'"),
    (lambda b: L.tser_loss(S, U, entropy_weight=float("nan"), backend=b), ValueError, "entropy_weight"),
    (lambda b: L.tser_loss(S, U, entropy_temperature=0, backend=b), ValueError, "entropy_temperature"),
    (lambda b: L.hta_kl(S, U, head_threshold=1.0, backend=b), ValueError, r"head_threshold must be in \(0, 1\)"),
    (lambda b: L.hta_kl(S, U, head_threshold=0.0, backend=b), ValueError, "head_threshold"),
    (lambda b: L.hta_kl(S, U, time_reduction="max", backend=b), ValueError, "time_reduction"),
    (lambda b: L.nld_loss(S, U, noise_std=-0.1, backend=b), ValueError, "noise_std must be"),
    (lambda b: L.nld_loss(S, U, noise_weight=1.5, backend=b), ValueError, "noise_weight"),
    (lambda b: L.nld_loss(S, U, mode="additive", backend=b), ValueError, "needs|give a float noise_std"),
    (lambda b: L.nld_loss(S, U, mode="sum", backend=b), ValueError, "mode="),
    (lambda b: L.nld_loss(S, U, seed=-1, backend=b), ValueError, "seed must be an int"),
    (lambda b: L.nld_loss(S, U, generator=3, backend=b), TypeError, "generator must be a torch.Generator"),
    (lambda b: L.per_timestep_kl(S, U, backend="fpga"), ValueError, "backend='fpga'"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_named(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(backend)


def test_teacher_on_other_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.raises(ValueError, match="teacher is on"):
        L.per_timestep_kl(S, U.cuda())


@pytest.mark.parametrize("case", [c for c in CASES if not c.name.startswith("hta")],
                         ids=[c.name for c in CASES if not c.name.startswith("hta")])
def test_gradcheck_through_the_cpp_kernels(case):
    """float64 finite differences of the fused op itself (HTA is excluded: its detached weights make
    the true derivative differ from the specified gradient; it is checked against the reference)."""
    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip(snnkd_fast.backends("kd")["cpp"].reason)
    student = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda s, t: case.fn(s, t, backend="cpp", reduction="none", **case.kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student, teacher), eps=1e-6, atol=1e-7)


# The "cuda" backend is the same ops as "cpp", on CUDA tensors.
OPS = {
    "cpp": ("kd_rows_forward", "nld_rows_forward"),
    "cuda": ("kd_rows_forward", "nld_rows_forward"),
    "triton": ("kd_rows_forward_triton", "nld_rows_forward_triton"),
}


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("loss", [0, 1, 2], ids=["kl", "tser", "hta"])
def test_opcheck_kd_rows(backend, loss):
    if not snnkd_fast.backends("kd")[backend]:
        pytest.skip(snnkd_fast.backends("kd")[backend].reason)
    device = device_for(backend)
    op = getattr(torch.ops.snnkd_fast, OPS[backend][0])
    student = torch.randn(3, 2, 9, device=device, requires_grad=True)
    teacher = torch.randn(2, 9, device=device, requires_grad=True)
    torch.library.opcheck(op, (student, teacher, loss, 2.0, 1.5, 0.2, 0.5))


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("adaptive, additive", [(True, False), (False, True)])
def test_opcheck_nld_rows(backend, adaptive, additive):
    if not snnkd_fast.backends("kd")[backend]:
        pytest.skip(snnkd_fast.backends("kd")[backend].reason)
    device = device_for(backend)
    op = getattr(torch.ops.snnkd_fast, OPS[backend][1])
    student = torch.randn(3, 2, 9, device=device, requires_grad=True)
    teacher = torch.randn(3, 2, 9, device=device, requires_grad=True)
    seed = torch.tensor(11, device=device)
    torch.library.opcheck(op, (student, teacher, seed, 2.0, 0.1, 0.5, adaptive, additive))


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", ["cpp", "torch", "cuda"] + (["triton"] if device_for("triton") == "cuda" else []))
def test_compile_fullgraph(backend):
    if not snnkd_fast.backends("kd")[backend]:
        pytest.skip(snnkd_fast.backends("kd")[backend].reason)
    device = device_for(backend)
    torch._dynamo.reset()

    def objective(student, teacher):
        return (L.per_timestep_kl(student, teacher, backend=backend) + L.tser_loss(student, teacher, backend=backend)
                + L.hta_kl(student, teacher, backend=backend) + L.kd_kl(student, teacher, backend=backend)
                + L.nld_loss(student, teacher, seed=3, backend=backend))

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    student, teacher = torch.randn(3, 4, 12, device=device), torch.randn(4, 12, device=device)
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    eager_loss, compiled_loss = objective(s1, teacher), compiled(s2, teacher)
    torch.testing.assert_close(compiled_loss, eager_loss)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(s2.grad, s1.grad)


_MEMORY_SCRIPT = r"""
import json, sys, torch
import snnkd_fast.losses as L

def status(field):  # kB values of /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

torch.set_num_threads(1)
name, backend = sys.argv[1], sys.argv[2]
T, B, C = 4, 64, 16000
student = torch.randn(T, B, C, requires_grad=True)
teacher = torch.randn(B, C)
fn = {"per_timestep_kl": L.per_timestep_kl, "tser_loss": L.tser_loss, "hta_kl": L.hta_kl, "nld_loss": L.nld_loss}[name]
kwargs = {"per_timestep": True} if name == "nld_loss" else {}
# warm-up on a tiny input: the autograd engine, kernels and allocator pay their one-time costs here
fn(torch.randn(2, 2, 8, requires_grad=True), torch.randn(2, 8), backend=backend, **kwargs).backward()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
before = status("VmRSS:")
fn(student, teacher, backend=backend, **kwargs).backward()
print(json.dumps({"extra_bytes": status("VmHWM:") - before, "sequence_bytes": T * B * C * 4}))
"""


def _peak_extra(name: str, backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, name, backend], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["per_timestep_kl", "tser_loss", "hta_kl", "nld_loss"])
def test_no_sequence_sized_temporary_on_cpu(name):
    """Peak RSS of forward+backward beyond the inputs: the cpp kernels add the student's gradient
    (one [T, B, C] tensor autograd must hold) and O(T*B) statistics, nothing sequence-sized more;
    the reference (the control that shows the test can fail) needs several such temporaries."""
    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip(snnkd_fast.backends("kd")["cpp"].reason)
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    fused = _peak_extra(name, "cpp")
    assert fused["extra_bytes"] < 1.25 * fused["sequence_bytes"], fused
    reference = _peak_extra(name, "torch")
    assert reference["extra_bytes"] > 2.5 * reference["sequence_bytes"], reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["kd_kl", "nld_loss", "hta_kl"])
def test_time_mean_reads_half_logits_in_place(name, dtype):
    """The time mean of a 16-bit [T, B, C] student (kd_kl, nld_loss's default, hta_kl's
    "mean_logits") is one reduction into float32, not a cast to a float32 [T, B, C] copy first: on a
    GPU that copy was a pass writing and reading back a [T, B, C] float32 tensor (0.095 ms of Hinton
    KD's 0.40 at bf16 4x256x32000 on an H200). Seen from a dispatch mode (the ops Python calls)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip(snnkd_fast.backends("kd")["cpp"].reason)
    student = torch.randn(4, 3, 10, dtype=dtype, requires_grad=True)
    teacher = torch.randn(3, 10)
    call = {"kd_kl": lambda: L.kd_kl(student, teacher, backend="cpp"),
            "nld_loss": lambda: L.nld_loss(student, teacher, seed=1, backend="cpp"),
            "hta_kl": lambda: L.hta_kl(student, teacher, time_reduction="mean_logits", backend="cpp")}[name]

    class SequenceSizedFloat32(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == student.shape:
                self.ops.append(str(func))
            return out

    with SequenceSizedFloat32() as seen:
        loss = call()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert seen.ops == [], seen.ops
    loss.backward()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad.float()).all()


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["per_timestep_kl", "tser_loss", "hta_kl", "nld_loss", "kd_kl"])
def test_no_sequence_sized_temporary_on_gpu(name, backend):
    """GPU counterpart of the test above, with the caching allocator's exact counters: the peak
    allocated during forward+backward, beyond what was allocated before, is the student's gradient
    plus O(T*B) statistics for the kernels; the reference needs several [T, B, C] temporaries."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not snnkd_fast.backends("kd")[backend]:
        pytest.skip(snnkd_fast.backends("kd")[backend].reason)
    fn = {"per_timestep_kl": L.per_timestep_kl, "tser_loss": L.tser_loss, "hta_kl": L.hta_kl,
          "nld_loss": L.nld_loss, "kd_kl": L.kd_kl}[name]
    kwargs = {"per_timestep": True} if name == "nld_loss" else {}
    T, B, C = 4, 64, 16000
    sequence_bytes = T * B * C * 4

    def peak_extra(backend_: str) -> int:
        student = torch.randn(T, B, C, device="cuda", requires_grad=True)
        teacher = torch.randn(B, C, device="cuda")
        fn(student[:, :2, :8], teacher[:2, :8], backend=backend_, **kwargs).backward()  # kernels loaded
        student.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(student, teacher, backend=backend_, **kwargs).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    fused = peak_extra(backend)
    # the gradient [T, B, C] autograd must hold, plus statistics; kd_kl also holds [B, C] tensors
    # (the time mean it saves and its gradient, before autograd spreads it over T)
    limit = 1.25 + (2.0 / T if name == "kd_kl" else 0.0)
    assert fused < limit * sequence_bytes, (fused, sequence_bytes)
    if name != "kd_kl":  # the control: eager kd_kl also stays near one gradient's worth
        reference = peak_extra("torch")
        assert reference > 2.0 * sequence_bytes, (reference, sequence_bytes)
