"""Hostile inputs to every public entry point: the neuron ops (lif/if/plif_multistep), the losses
(kd_kl, per_timestep_kl, tser_loss, hta_kl, nld_loss) and the nn modules, on every backend that runs
here. Each input either gives the right answer or a clear error naming the argument; nothing may
crash the process or hang (risky calls run under a join-with-timeout).

What happens, per input (decided from the code; the tests pin it):

* wrong rank -- neurons: 0-dim x is a ValueError naming x_seq; 1-dim x is T steps of one neuron (valid).
  Losses: ValueError naming student / teacher (``[T, B, C]``; kd_kl and nld_loss also take ``[B, C]``).
* T / B / C mismatch between student and teacher: ValueError "does not match"; a v_init that does not
  broadcast to one step (also a module's carried membrane after a batch-size change): ValueError "v_init".
* T = 0: ValueError "T=0" (x_seq, student or teacher). C = 0: ValueError.
* B = 0 -- neurons: empty spikes and gradients, PLIF's dL/dw = 0. Losses: "none" gives the empty rows,
  "sum" gives 0; "batchmean" / "mean" raise a ValueError naming B=0 (an average over no samples; this
  was a silent NaN before).
* C = 1: loss 0 and gradients 0 (both distributions are the point mass).
* integer / bool / complex tensors: TypeError naming x_seq / v_init / w / student / teacher.
* tensors on another device: ValueError naming v_init / w / teacher, either way round (a CPU tensor
  with a CUDA one, a module's CPU parameter or carried membrane against CUDA input); a kernel given
  tensors of the wrong device: ValueError "runs on CPU tensors" / "runs on CUDA tensors" (skipped
  without CUDA).
* non-contiguous and stride-0 (expanded) inputs: the contiguous copy's answer.
* logits / currents of +-1e4: finite.
* -inf logit (a masked class): exact -- the class drops out. NLD: a -inf teacher class is exact, a -inf
  student logit makes that row NaN (kd/reference.py: NLD needs finite student logits).
* NaN -- neurons: that neuron's membrane is NaN from then on and it never spikes; the others are
  untouched. Losses: NaN or +inf logits make that row's loss NaN; the other rows are untouched.
* first calls from two threads at once (triton under the interpreter, cpp): the single-threaded answer.

Devices: every tensor a test hands to an op is built on ``conftest.device_for(backend)`` -- the CPU for
torch and cpp (and triton under the interpreter), the GPU for cuda and for compiled triton -- so on a
GPU machine these tests run the GPU kernels (``TRITON_ON_CUDA_TENSORS``); layouts (transposes, stride-0
expands, slices) are made on that device. A kernel is compared with the torch reference on the same
device. Inputs are drawn on the CPU from a seeded CPU generator and then moved, so every device sees the
same values.
"""
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import snnkd_fast
from snnkd_fast import losses as L
from snnkd_fast import nn as snn

from conftest import device_for

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)
# Tensors are built on device_for(backend): compiled Triton gets CUDA tensors (conftest's GPU skip rule).
TRITON_ON_CUDA_TENSORS = True


def bounded(fn, timeout=120.0):
    """Run ``fn()`` in a daemon thread; fail (rather than hang the suite) if it has not returned after
    ``timeout`` seconds. Returns fn's result or re-raises its exception."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not return within {timeout} s (hang)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _available(backend: str, family: str) -> bool:
    return bool(snnkd_fast.backends(family)[backend])


NEURON_BACKENDS = [b for b in ("torch", "cpp", "triton", "cuda") if _available(b, "lif")]
LOSS_BACKENDS = [b for b in ("torch", "cpp", "triton", "cuda") if _available(b, "kd")]
NEURON_KINDS = ("lif", "if", "plif")


def neuron(kind, x, v_init=None, w=None, **kwargs):
    if kind == "lif":
        return snnkd_fast.lif_multistep(x, v_init, **kwargs)
    if kind == "if":
        return snnkd_fast.if_multistep(x, v_init, **kwargs)
    return snnkd_fast.plif_multistep(x, torch.tensor(0.3, device=x.device) if w is None else w, v_init, **kwargs)


def loss_call(name, student, teacher, backend, **kwargs):
    fn = getattr(L, name)
    if name == "nld_loss":
        kwargs.setdefault("seed", 11)
    return fn(student, teacher, backend=backend, **kwargs)


LOSS_NAMES = ["kd_kl", "per_timestep_kl", "tser_loss", "hta_kl", "nld_loss"]
TIME_AVERAGED = {"kd_kl", "nld_loss"}  # one row per sample (nld: with the default per_timestep=False)
TAKES_2D_STUDENT = {"kd_kl", "nld_loss"}


def logits(*shape, scale=3.0, seed=0, dtype=torch.float32, device="cpu"):
    """Drawn on the CPU (the same values on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


# --------------------------------------------------------------------------------------------------
# neurons: shapes, dtypes, devices
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", NEURON_BACKENDS)
@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_neuron_ranks_and_empty_time(kind, backend):
    device = device_for(backend)
    with pytest.raises(ValueError, match="x_seq must have a leading time dimension"):
        neuron(kind, torch.tensor(1.0, device=device), backend=backend)
    with pytest.raises(ValueError, match="T=0"):
        neuron(kind, torch.zeros(0, 3, device=device), backend=backend)
    with pytest.raises(ValueError, match="T=0"):
        neuron(kind, torch.zeros(0, device=device), backend=backend)
    # 1-dim: T steps of one (0-dim) neuron -- valid, and the same as a [T, 1] input
    x = logits(6, scale=1.5, device=device) + 0.5
    torch.testing.assert_close(neuron(kind, x, backend=backend), neuron(kind, x[:, None], backend=backend)[:, 0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", NEURON_BACKENDS)
@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_neuron_empty_batch_is_an_empty_result(kind, backend):
    device = device_for(backend)
    x = torch.zeros(3, 0, 4, device=device, requires_grad=True)
    w = torch.tensor(0.3, device=device, requires_grad=True)
    spikes, v = neuron(kind, x, w=w, backend=backend, return_v=True)
    assert spikes.shape == (3, 0, 4) and v.shape == (0, 4)
    (spikes.sum() + v.sum()).backward()
    assert x.grad.shape == (3, 0, 4)
    if kind == "plif":
        assert w.grad is not None and w.grad.item() == 0.0


@pytest.mark.parametrize("backend", NEURON_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64], ids=str)
def test_neuron_non_float_dtypes_are_refused(backend, dtype):
    device = device_for(backend)
    ones = torch.ones(3, 4, device=device)
    for kind in NEURON_KINDS:
        with pytest.raises(TypeError, match="x_seq must be float16, bfloat16, float32 or float64"):
            neuron(kind, ones.to(dtype), backend=backend)
        with pytest.raises(TypeError, match="v_init must be a floating-point tensor"):
            neuron(kind, ones, torch.ones(4, device=device).to(dtype), backend=backend)
    with pytest.raises(TypeError, match="w must be a floating-point tensor"):
        snnkd_fast.plif_multistep(ones, torch.ones((), device=device).to(dtype), backend=backend)


@pytest.mark.parametrize("backend", NEURON_BACKENDS)
def test_neuron_bad_v_init_and_w(backend):
    device = device_for(backend)
    x = torch.ones(3, 4, device=device)
    with pytest.raises(ValueError, match="v_init has shape"):
        snnkd_fast.lif_multistep(x, torch.ones(5, device=device), backend=backend)
    with pytest.raises(ValueError, match="w must hold one element"):
        snnkd_fast.plif_multistep(x, torch.ones(2, device=device), backend=backend)
    with pytest.raises(TypeError, match="w must be a one-element tensor"):
        snnkd_fast.plif_multistep(x, "0.3", backend=backend)
    with pytest.raises(ValueError, match="tau must be > 1"):
        snnkd_fast.lif_multistep(x, tau=1.0, backend=backend)
    with pytest.raises(ValueError, match="v_threshold must be finite"):
        snnkd_fast.lif_multistep(x, v_threshold=NAN, backend=backend)


def _compiled_triton_available(family: str) -> bool:
    """Triton compiles for the GPU here (not the interpreter): it refuses CPU tensors."""
    return _available("triton", family) and device_for("triton") == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_neuron_tensors_on_different_devices():
    x = torch.ones(3, 4)
    with pytest.raises(ValueError, match="v_init is on"):
        snnkd_fast.lif_multistep(x, torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="w is on"):
        snnkd_fast.plif_multistep(x, torch.tensor(0.3, device="cuda"))
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        snnkd_fast.lif_multistep(x.cuda(), backend="cpp")
    # the other way round: CUDA input with a CPU v_init / w, on every backend that takes CUDA tensors
    x_cuda = x.cuda()
    gpu_backends = ["auto", "torch"] + [b for b in ("cuda", "triton") if _available(b, "lif")
                                        and (b == "cuda" or _compiled_triton_available("lif"))]
    for backend in gpu_backends:
        with pytest.raises(ValueError, match="v_init is on cpu but x_seq is on cuda"):
            snnkd_fast.lif_multistep(x_cuda, torch.zeros(4), backend=backend)
        with pytest.raises(ValueError, match="v_init is on cpu but x_seq is on cuda"):
            snnkd_fast.if_multistep(x_cuda, torch.zeros(4), backend=backend)
        with pytest.raises(ValueError, match="w is on cpu but x_seq is on cuda"):
            snnkd_fast.plif_multistep(x_cuda, torch.tensor(0.3), backend=backend)
        # a module left on the CPU (its parameter w), and a membrane carried over from a CPU call
        with pytest.raises(ValueError, match="w is on cpu but x_seq is on cuda"):
            snn.ParametricLIFNode(step_mode="m", backend=backend)(x_cuda)
        if backend in ("auto", "torch"):  # the CPU call needs a CPU backend
            node = snn.LIFNode(step_mode="m", backend=backend)
            node(x)
            with pytest.raises(ValueError, match="v_init is on cpu but x_seq is on cuda"):
                node(x_cuda)
    # a kernel given tensors of a device it does not run on
    if _available("cuda", "lif"):
        with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
            snnkd_fast.lif_multistep(x, backend="cuda")
    if _compiled_triton_available("lif"):
        with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
            snnkd_fast.lif_multistep(x, backend="triton")


# --------------------------------------------------------------------------------------------------
# neurons: layouts, extreme values, NaN policy
# --------------------------------------------------------------------------------------------------

def _neuron_run(kind, x, v_init, backend, **kwargs):
    """Forward + backward on x's device; returns spikes, v_final and the gradients of x, v_init, w."""
    x = x.detach().requires_grad_(True)
    v_init = v_init.detach().requires_grad_(True)
    w = torch.tensor(0.4, device=x.device, requires_grad=True)
    spikes, v = neuron(kind, x, v_init, w, backend=backend, return_v=True, **kwargs)
    g = torch.linspace(-1.0, 1.0, spikes.numel(), device=spikes.device).view(spikes.shape)
    ((spikes * g).sum() + v.sum()).backward()
    return spikes.detach(), v.detach(), x.grad, v_init.grad, w.grad


@pytest.mark.parametrize("backend", NEURON_BACKENDS)
@pytest.mark.parametrize("kind", NEURON_KINDS)
@pytest.mark.parametrize("layout", ["transposed", "expanded_x", "expanded_v_init", "sliced"])
def test_neuron_strided_inputs_give_the_contiguous_answer(kind, backend, layout):
    device = device_for(backend)  # the views are made on the device
    base = logits(5, 4, 6, scale=1.5, seed=1, device=device) + 0.5
    v_init = logits(4, 6, scale=0.5, seed=2, device=device)
    if layout == "transposed":
        x = logits(5, 6, 4, scale=1.5, seed=1, device=device).transpose(1, 2)
    elif layout == "expanded_x":
        x = base[:, :1].expand(5, 4, 6)  # stride 0 over dim 1
    elif layout == "expanded_v_init":
        x, v_init = base, logits(6, scale=0.5, seed=2, device=device).expand(4, 6)
    else:
        x = logits(10, 4, 12, scale=1.5, seed=1, device=device)[::2, :, ::2]
    assert not x.is_contiguous() or not v_init.is_contiguous()
    strided = _neuron_run(kind, x, v_init, backend)
    contiguous = _neuron_run(kind, x.contiguous(), v_init.contiguous(), backend)
    assert torch.equal(strided[0], contiguous[0]) and torch.equal(strided[1], contiguous[1])
    for a, b in zip(strided[2:], contiguous[2:]):
        if kind != "plif" and b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", NEURON_BACKENDS)
@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_neuron_huge_inputs_stay_finite(kind, backend):
    device = device_for(backend)
    x = logits(6, 3, 8, scale=1e4, seed=3, device=device)
    v_init = torch.zeros(3, 8, device=device)
    spikes, v, gx, gv, gw = bounded(lambda: _neuron_run(kind, x, v_init, backend))
    assert set(spikes.unique().tolist()) <= {0.0, 1.0} and 0 < spikes.sum() < spikes.numel()
    for t in (v, gx, gv) + ((gw,) if kind == "plif" else ()):
        assert torch.isfinite(t).all()
    reference = _neuron_run(kind, x, v_init, "torch")  # the reference on the same device
    assert torch.equal(spikes, reference[0])


@pytest.mark.parametrize("backend", NEURON_BACKENDS)
@pytest.mark.parametrize("kind", NEURON_KINDS)
@pytest.mark.parametrize("v_reset", [0.0, None], ids=["hard", "soft"])
def test_neuron_nan_input_never_spikes_and_stays_local(kind, backend, v_reset):
    """NaN policy (README, lif/op.py): a NaN input makes that neuron's membrane NaN from then on and it
    never spikes; every other neuron is untouched."""
    device = device_for(backend)
    x = torch.full((6, 2, 3), 2.5, device=device)  # strong input: every neuron would spike at every step
    poisoned = x.clone()
    poisoned[2, 1, 0] = NAN
    spikes, v = bounded(lambda: neuron(kind, poisoned, backend=backend, return_v=True, v_reset=v_reset))
    clean_spikes, clean_v = neuron(kind, x, backend=backend, return_v=True, v_reset=v_reset)
    assert clean_spikes[2:, 1, 0].all()
    assert torch.equal(spikes[:2], clean_spikes[:2])          # before the NaN: unchanged
    assert (spikes[2:, 1, 0] == 0).all()                       # from the NaN on: never spikes
    assert torch.isnan(v[1, 0])                                # and its membrane stays NaN
    others = torch.ones(2, 3, dtype=torch.bool, device=device)
    others[1, 0] = False
    assert torch.equal(spikes[:, others], clean_spikes[:, others])
    assert torch.equal(v[others], clean_v[others])


@pytest.mark.parametrize("backend", [b for b in NEURON_BACKENDS if b != "torch"])
def test_neuron_plus_inf_membrane_spikes_and_resets_in_kernels(backend):
    """The one documented divergence: a +inf membrane spikes; the kernels' hard reset brings it back to
    v_reset (the reference's s * v_reset + (1 - s) * h is NaN there)."""
    x = torch.tensor([[INF, 0.5]] * 3, device=device_for(backend))
    spikes, v = snnkd_fast.lif_multistep(x, backend=backend, return_v=True)
    assert spikes[:, 0].tolist() == [1.0, 1.0, 1.0] and v[0].item() == 0.0
    assert torch.equal(spikes[:, 1], snnkd_fast.lif_multistep(x, backend="torch")[:, 1])


# --------------------------------------------------------------------------------------------------
# losses: shapes, dtypes, devices
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_wrong_ranks(name, backend):
    device = device_for(backend)
    s, t = logits(2, 3, 5, device=device), logits(3, 5, seed=1, device=device)
    with pytest.raises(ValueError, match="student must be"):
        loss_call(name, s[None], t, backend)
    with pytest.raises(ValueError, match="student must be"):
        loss_call(name, s[0, 0], t, backend)
    with pytest.raises(ValueError, match="teacher must be"):
        loss_call(name, s, t[0], backend)
    with pytest.raises(ValueError, match="teacher must be"):
        loss_call(name, s, t[None, None], backend)
    if name in TAKES_2D_STUDENT:
        assert loss_call(name, s[0], t, backend).shape == ()
    else:
        with pytest.raises(ValueError, match=r"student must be \[T, B, C\]"):
            loss_call(name, s[0], t, backend)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_mismatched_shapes(name, backend):
    device = device_for(backend)
    s = logits(2, 3, 5, device=device)
    for shape in ((4, 5), (3, 6), (3, 3, 5), (2, 4, 5), (2, 3, 4)):
        teacher = logits(*shape, device=device)
        with pytest.raises(ValueError, match="does not match student shape"):
            loss_call(name, s, teacher, backend)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_empty_time_and_classes(name, backend):
    d = device_for(backend)
    with pytest.raises(ValueError, match="student has T=0"):
        loss_call(name, logits(0, 3, 5, device=d), logits(3, 5, device=d), backend)
    with pytest.raises(ValueError, match="teacher has T=0"):
        loss_call(name, logits(2, 3, 5, device=d), logits(0, 3, 5, device=d), backend)
    with pytest.raises(ValueError, match="C=0"):
        loss_call(name, logits(2, 3, 0, device=d), logits(3, 0, device=d), backend)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_empty_batch(name, backend):
    """B = 0: "none" is the empty rows, "sum" is 0; an average over no samples is refused with a
    ValueError naming B=0 (it used to be a silent NaN: 0 / 0)."""
    device = device_for(backend)
    student = torch.zeros(3, 0, 5, device=device, requires_grad=True)
    teacher = torch.zeros(0, 5, device=device, requires_grad=True)
    rows = loss_call(name, student, teacher, backend, reduction="none")
    assert rows.shape == ((0,) if name in TIME_AVERAGED else (3, 0))
    total = loss_call(name, student, teacher, backend, reduction="sum")
    assert total.shape == () and total.item() == 0.0
    total.backward()
    assert student.grad.shape == (3, 0, 5) and teacher.grad.shape == (0, 5)
    for reduction in ("batchmean", "mean"):
        with pytest.raises(ValueError, match=f"B=0 samples.*reduction='{reduction}'"):
            loss_call(name, student, teacher, backend, reduction=reduction)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_one_class_is_zero(name, backend):
    """C = 1: both distributions are the point mass; every KL (and TSER's entropy) is 0, and so are the
    gradients."""
    device = device_for(backend)
    student = logits(3, 4, 1, scale=5.0, device=device).requires_grad_(True)
    teacher = logits(4, 1, scale=5.0, seed=1, device=device).requires_grad_(True)
    rows = loss_call(name, student, teacher, backend, reduction="none")
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows, torch.zeros_like(rows), rtol=0, atol=1e-5)
    rows.sum().backward()
    torch.testing.assert_close(student.grad, torch.zeros_like(student), rtol=0, atol=1e-5)
    torch.testing.assert_close(teacher.grad, torch.zeros_like(teacher), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64], ids=str)
def test_loss_non_float_dtypes_are_refused(name, backend, dtype):
    device = device_for(backend)
    s, t = logits(2, 3, 5, device=device), logits(3, 5, seed=1, device=device)
    with pytest.raises(TypeError, match="student must be float16, bfloat16, float32 or float64"):
        loss_call(name, s.to(dtype), t, backend)
    with pytest.raises(TypeError, match="teacher must be float16, bfloat16, float32 or float64"):
        loss_call(name, s, t.to(dtype), backend)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_bad_scalars_are_refused(name):
    s, t = logits(2, 3, 5), logits(3, 5, seed=1)
    for bad in (0.0, -1.0, NAN, INF, True, "4"):
        with pytest.raises(ValueError, match="temperature"):
            loss_call(name, s, t, "torch", temperature=bad)
    with pytest.raises(ValueError, match="reduction="):
        loss_call(name, s, t, "torch", reduction="avg")
    with pytest.raises(ValueError, match="backend="):
        loss_call(name, s, t, "gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_tensors_on_different_devices(name):
    with pytest.raises(ValueError, match="teacher is on"):
        loss_call(name, logits(2, 3, 5), logits(3, 5).cuda(), "auto")
    # the other way round (a CUDA student, a CPU teacher) on every backend that takes CUDA tensors, with
    # a [B, C] and a [T, B, C] teacher
    student = logits(2, 3, 5, device="cuda")
    gpu_backends = ["auto", "torch"] + [b for b in ("cuda", "triton") if _available(b, "kd")
                                        and (b == "cuda" or _compiled_triton_available("kd"))]
    for backend in gpu_backends:
        for teacher in (logits(3, 5, seed=1), logits(2, 3, 5, seed=1)):
            with pytest.raises(ValueError, match="teacher is on cpu but student is on cuda"):
                loss_call(name, student, teacher, backend)
    # a kernel given tensors of a device it does not run on
    cpu_pair = logits(2, 3, 5), logits(3, 5, seed=1)
    if _available("cpp", "kd"):
        with pytest.raises(ValueError, match="backend='cpp' runs on CPU tensors"):
            loss_call(name, student, logits(3, 5, seed=1, device="cuda"), "cpp")
    if _available("cuda", "kd"):
        with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
            loss_call(name, *cpu_pair, "cuda")
    if _compiled_triton_available("kd"):
        with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
            loss_call(name, *cpu_pair, "triton")


# --------------------------------------------------------------------------------------------------
# losses: layouts, extreme values, masked classes, NaN policy
# --------------------------------------------------------------------------------------------------

def _loss_run(name, student, teacher, backend, transform=None, **kwargs):
    s_leaf = student.detach().clone().requires_grad_(True)
    t_leaf = teacher.detach().clone().requires_grad_(True)
    s, t = transform(s_leaf, t_leaf) if transform else (s_leaf, t_leaf)
    rows = loss_call(name, s, t, backend, reduction="none", **kwargs)
    weights = torch.linspace(0.5, 1.5, rows.numel(), device=rows.device).view(rows.shape)
    (rows * weights).sum().backward()
    return rows.detach(), s_leaf.grad, t_leaf.grad


LAYOUTS = {
    # [B, T, C] storage viewed as [T, B, C]
    "student_transposed": ((4, 3, 7), (4, 7), lambda s, t: (s.transpose(0, 1), t)),
    # an SNN-shaped teacher that is one ANN row per sample (stride 0 over T)
    "teacher_expanded_over_t": ((3, 4, 7), (4, 7), lambda s, t: (s, t.unsqueeze(0).expand(3, 4, 7))),
    # one teacher row for the whole batch (stride 0 over B)
    "teacher_expanded_over_b": ((3, 4, 7), (1, 7), lambda s, t: (s, t.expand(4, 7))),
    # one student row repeated over time (stride 0 over T)
    "student_expanded_over_t": ((1, 4, 7), (4, 7), lambda s, t: (s.expand(3, 4, 7), t)),
    # every other class (stride 2 over C)
    "class_slices": ((3, 4, 14), (4, 14), lambda s, t: (s[..., ::2], t[:, ::2])),
}


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_strided_inputs_give_the_contiguous_answer(name, backend, layout):
    s_shape, t_shape, transform = LAYOUTS[layout]
    device = device_for(backend)  # the views are made on the device
    student, teacher = logits(*s_shape, device=device), logits(*t_shape, seed=1, device=device)
    strided = _loss_run(name, student, teacher, backend, transform)
    s_view, t_view = transform(student, teacher)
    assert not (s_view.is_contiguous() and t_view.is_contiguous())
    contiguous_s, contiguous_t = s_view.contiguous(), t_view.contiguous()
    contiguous = _loss_run(name, contiguous_s, contiguous_t, backend)
    torch.testing.assert_close(strided[0], contiguous[0], rtol=1e-6, atol=1e-6)
    # the gradients w.r.t. the views, mapped back through the same transform by autograd
    s_leaf, t_leaf = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    s_v, t_v = transform(s_leaf, t_leaf)
    torch.autograd.backward([s_v, t_v], [contiguous[1], contiguous[2]])
    torch.testing.assert_close(strided[1], s_leaf.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(strided[2], t_leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_huge_logits_stay_finite(name, backend):
    device = device_for(backend)
    student, teacher = logits(3, 4, 12, scale=1e4, device=device), logits(4, 12, scale=1e4, seed=1, device=device)
    rows, gs, gt = bounded(lambda: _loss_run(name, student, teacher, backend))
    assert torch.isfinite(rows).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_nld_all_noise_mixture_gradient_is_finite(backend):
    """noise_weight=1: the student distribution is the noise softmax alone (the gradient flows only
    through the row mean and variance); found by test_properties."""
    g = torch.Generator().manual_seed(0)
    device = device_for(backend)
    student = (torch.randn(1, 1, 28, generator=g, dtype=torch.float64) * 13).float().to(device).requires_grad_(True)
    teacher = torch.randn(1, 28, generator=g, dtype=torch.float64).float().to(device)
    loss = loss_call("nld_loss", student, teacher, backend, temperature=1.0, noise_weight=1.0, seed=0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "nld_loss"])
def test_loss_masked_class_drops_out_exactly(name, backend):
    """A class at -inf in student and teacher has probability 0: the loss is that of the other classes,
    and its gradient is exactly 0."""
    device = device_for(backend)
    student, teacher = logits(3, 4, 9, device=device), logits(4, 9, seed=1, device=device)
    masked_s, masked_t = student.clone(), teacher.clone()
    masked_s[..., 4] = -INF
    masked_t[:, 4] = -INF
    rows, gs, gt = bounded(lambda: _loss_run(name, masked_s, masked_t, backend))
    keep = [c for c in range(9) if c != 4]
    ref_rows, ref_gs, ref_gt = _loss_run(name, student[..., keep], teacher[:, keep], backend)
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-6)
    assert (gs[..., 4] == 0).all() and (gt[:, 4] == 0).all()
    torch.testing.assert_close(gs[..., keep], ref_gs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt[:, keep], ref_gt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_nld_masked_teacher_class_is_finite_and_student_needs_finite_logits(backend):
    """NLD: a -inf teacher class is exact (p = 0); a -inf *student* logit leaves the row's mean and
    variance undefined (kd/reference.py: NLD needs finite logits), so that row -- only that row -- is NaN."""
    device = device_for(backend)
    student, teacher = logits(3, 4, 9, device=device), logits(4, 9, seed=1, device=device)
    teacher[:, 4] = -INF
    rows, gs, gt = bounded(lambda: _loss_run("nld_loss", student, teacher, backend))
    assert torch.isfinite(rows).all() and torch.isfinite(gs).all() and (gt[:, 4] == 0).all()
    student[1, 2, 4] = -INF
    rows = loss_call("nld_loss", student, logits(4, 9, seed=1, device=device), backend, reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("where", ["student_nan", "student_posinf", "teacher_nan", "teacher_posinf"])
def test_loss_nan_policy_poisons_only_that_row(name, backend, where):
    """losses.py: +inf or NaN logits make that row's loss NaN; every other row is unchanged."""
    device = device_for(backend)
    student, teacher = logits(3, 4, 6, device=device), logits(4, 6, seed=1, device=device)
    bad = NAN if where.endswith("nan") else INF
    s_bad, t_bad = student.clone(), teacher.clone()
    if where.startswith("student"):
        s_bad[1, 2, 3] = bad
    else:
        t_bad[2, 3] = bad
    rows = bounded(lambda: loss_call(name, s_bad, t_bad, backend, reduction="none"))
    clean = loss_call(name, student, teacher, backend, reduction="none")
    if name in TIME_AVERAGED or where.startswith("teacher"):
        poisoned = (..., 2)                # the sample's row(s): every t of sample 2
    else:
        poisoned = (1, 2)                  # the one (t, b) row
    assert torch.isnan(rows[poisoned]).all(), rows
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[poisoned] = False
    torch.testing.assert_close(rows[mask], clean[mask], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# nld_loss: a [B, C] student against a [T, B, C] teacher
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_nld_per_timestep_2d_student_uses_every_teacher_step(backend):
    """per_timestep=True with a [B, C] student and a [T, B, C] teacher: one row per teacher timestep,
    as the reference broadcasts (the kernels used to read only the teacher's first timestep). With
    noise_weight=0 NLD is the plain tau^2 KL, so each row must equal per_timestep_kl against that step."""
    device = device_for(backend)  # the torch reference below runs on the same device
    student, teacher = logits(3, 6, device=device), logits(4, 3, 6, seed=1, device=device)
    s = student.clone().requires_grad_(True)
    rows = loss_call("nld_loss", s, teacher, backend, per_timestep=True, noise_weight=0.0, reduction="none")
    assert rows.shape == (4, 3)
    expected = torch.stack([L.per_timestep_kl(student[None], teacher[t], temperature=2.0, reduction="none",
                                              backend="torch")[0] for t in range(4)])
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)
    rows.sum().backward()
    s_ref = student.clone().requires_grad_(True)
    L.per_timestep_kl(s_ref[None].expand(4, 3, 6), teacher, temperature=2.0, reduction="sum",
                      backend="torch").mul(4).backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# nn modules
# --------------------------------------------------------------------------------------------------

MODULES = {"LIFNode": snn.LIFNode, "IFNode": snn.IFNode, "ParametricLIFNode": snn.ParametricLIFNode}


@pytest.mark.parametrize("backend", NEURON_BACKENDS)
@pytest.mark.parametrize("cls", list(MODULES))
def test_modules_hostile_inputs(cls, backend):
    device = device_for(backend)
    node = MODULES[cls](step_mode="m", backend=backend).to(device)  # PLIF's w on the device
    with pytest.raises(TypeError, match=f"{cls}: x must be a tensor"):
        node([1.0, 2.0])
    with pytest.raises(TypeError, match=f"{cls}: x_seq must be float16"):
        node(torch.ones(3, 4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=f"{cls}: x_seq has T=0"):
        node(torch.zeros(0, 4, device=device))
    assert node(torch.zeros(3, 0, 4, device=device)).shape == (3, 0, 4)  # B = 0
    node.reset()
    # The membrane is carried across calls: a call with another batch size without reset() is refused.
    node(torch.ones(3, 4, 5, device=device))
    with pytest.raises(ValueError, match="v_init has shape \\(4, 5\\)"):
        node(torch.ones(3, 8, 5, device=device))
    node.reset()
    assert node(torch.ones(3, 8, 5, device=device)).shape == (3, 8, 5)
    # NaN in the module: as the op
    node.reset()
    x = torch.full((4, 2), 2.5, device=device)
    x[1, 0] = NAN
    out = node(x)
    assert (out[1:, 0] == 0).all() and torch.isnan(node.v[0])
    # single-step mode on a 0-dim neuron
    single = MODULES[cls](step_mode="s", backend=backend).to(device)
    assert single(torch.tensor(5.0, device=device)).shape == ()


def test_modules_bad_constructor_arguments():
    for cls in MODULES.values():
        with pytest.raises(ValueError, match="step_mode"):
            cls(step_mode="x")
        with pytest.raises(ValueError, match="store_v_seq"):
            cls(store_v_seq=True)
        with pytest.raises(ValueError, match="backward"):
            cls(backward="bptt2")
        with pytest.raises(ValueError, match="v_threshold"):
            cls(v_threshold=INF)
        with pytest.raises((ValueError, TypeError), match="surrogate"):
            cls(surrogate_function="relu")
    with pytest.raises(ValueError, match="tau must be > 1"):
        snn.LIFNode(tau=0.5)
    with pytest.raises(ValueError, match="init_tau"):
        snn.ParametricLIFNode(init_tau=1.0)
    with pytest.raises(ValueError, match="alpha"):
        L.TSERLoss(alpha=2.0)
    with pytest.raises(ValueError, match="pass target"):
        L.TSERLoss(alpha=0.5)(logits(2, 3, 5), logits(3, 5))


def test_loss_modules_forward_to_the_functions():
    student, teacher = logits(2, 3, 5), logits(3, 5, seed=1)
    pairs = [(L.KDKLLoss(temperature=3.0), L.kd_kl(student, teacher, temperature=3.0)),
             (L.PerTimestepKLLoss(), L.per_timestep_kl(student, teacher)),
             (L.TSERLoss(), L.tser_loss(student, teacher)),
             (L.HTAKLLoss(), L.hta_kl(student, teacher))]
    for module, expected in pairs:
        assert torch.equal(module(student, teacher), expected)
    with pytest.raises(ValueError, match="B=0"):
        L.PerTimestepKLLoss()(torch.zeros(2, 0, 5), torch.zeros(0, 5))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(L.NLDLoss(generator=g1)(student, teacher), L.nld_loss(student, teacher, generator=g2))


# --------------------------------------------------------------------------------------------------
# thread safety of first use
# --------------------------------------------------------------------------------------------------

_THREAD_SCRIPT = textwrap.dedent("""
    import os, sys, threading
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import snnkd_fast
    from snnkd_fast.losses import per_timestep_kl

    backends = [b for b in ("triton", "cpp") if snnkd_fast.backends()[b] and snnkd_fast.backends("kd")[b]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 40, generator=g) * 1.5 + 0.5
    s, t = torch.randn(4, 3, 17, generator=g), torch.randn(3, 17, generator=g)

    def work(backend):
        xs = x.clone().requires_grad_(True)
        spikes = snnkd_fast.lif_multistep(xs, backend=backend, surrogate="atan")
        spikes.sum().backward()
        ss = s.clone().requires_grad_(True)
        loss = per_timestep_kl(ss, t, backend=backend)
        loss.backward()
        return spikes.detach(), xs.grad, loss.detach(), ss.grad

    # Both threads make their first call of every op at once (Triton's lazy kernel import and
    # compilation, the custom-op dispatch caches), released together by a barrier.
    barrier = threading.Barrier(2 * len(backends))
    results, errors = {}, []

    def run(key, backend):
        try:
            barrier.wait(timeout=60)
            results[key] = work(backend)
        except BaseException as error:
            errors.append(f"{key}: {error!r}")

    threads = [threading.Thread(target=run, args=((b, i), b), daemon=True) for b in backends for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=240)
    if any(th.is_alive() for th in threads):
        print("HANG"); sys.stdout.flush(); os._exit(3)
    if errors:
        print("ERRORS", errors); sys.exit(2)
    for b in backends:
        single = work(b)  # single-threaded, after the fact
        for i in range(2):
            for a, c in zip(results[(b, i)], single):
                if not torch.equal(a, c):
                    print("MISMATCH", b, i); sys.exit(4)
    print("OK", backends)
""")


def test_first_calls_from_two_threads_at_once():
    """Fresh interpreter (so these really are the first calls): two threads per backend (triton under
    the interpreter, cpp) call lif_multistep and per_timestep_kl, forward and backward, at once; the
    results equal a single-threaded run's bit for bit, and nothing hangs."""
    proc = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert "triton" in proc.stdout or not _available("triton", "lif")


def test_tser_module_reduces_its_cross_entropy_as_its_kd_rows():
    """TSERLoss(alpha < 1): (1 - alpha) CE + alpha tser_loss, both reduced by one rule (reduce_rows):
    "mean" divides the CE rows by C as it does the KD rows, "none" gives [T, B]."""
    from snnkd_fast.kd import reference as ref

    student, teacher = logits(3, 4, 7), logits(4, 7, seed=1)
    target = torch.tensor([0, 6, 2, 2])
    ce_rows = torch.nn.functional.cross_entropy(student.flatten(0, 1), target.repeat(3), reduction="none").view(3, 4)
    for reduction in ("batchmean", "sum", "mean", "none"):
        got = L.TSERLoss(alpha=0.25, reduction=reduction)(student, teacher, target)
        expected = 0.75 * ref.reduce_rows(ce_rows, reduction, 7) + 0.25 * L.tser_loss(student, teacher,
                                                                                        reduction=reduction)
        torch.testing.assert_close(got, expected)
    assert L.TSERLoss(alpha=0.25, reduction="none")(student, teacher, target).shape == (3, 4)
