"""Mixed precision: snnkd_fast under ``torch.autocast("cpu", dtype=torch.bfloat16)``, under
``torch.autocast("cuda", dtype=torch.bfloat16 / torch.float16)`` on the GPU kernels, and with half inputs.

None of the ops is on an autocast cast list: they take the dtype that arrives (under autocast a
``Linear`` hands them bfloat16), compute in float32 and return the dtypes below; mixed student and
teacher dtypes are fine.

| op | inputs accepted | compute dtype | outputs |
|---|---|---|---|
| ``lif_multistep``, ``if_multistep``, ``plif_multistep``, ``nn.LIFNode`` / ``IFNode`` / ``ParametricLIFNode`` | ``x_seq``: fp16, bf16, fp32, fp64 (triton: not fp64); ``v_init`` (None, float, or any float tensor) and PLIF's ``w`` (any float dtype) are cast to the compute dtype | fp32 (fp64 for fp64 ``x_seq``) | spikes: ``x_seq``'s dtype; ``v_final`` (and the modules' ``.v``): compute dtype; gradients: each input's own dtype |
| ``kd_kl``, ``per_timestep_kl``, ``tser_loss``, ``hta_kl`` | student and teacher: fp16, bf16, fp32, fp64, the two may differ (triton: no fp64) | fp32 (the cpp forward accumulates its row sums in fp64); fp64 if either input is fp64 | loss: fp32 (fp64 if either input is fp64); gradients: each input's own dtype |
| ``nld_loss`` | as above | as above; the noise eps is drawn in fp32 | as above |

Time averages (``kd_kl``, ``hta_kl(time_reduction="mean_logits")``, ``nld_loss``) are taken in fp32
(fp64), never in the half type.

CUDA autocast (``torch.autocast("cuda", dtype=torch.bfloat16)`` or ``dtype=torch.float16``) behaves the
same on CUDA tensors, for the "cuda" and the (compiled) "triton" kernels as for the "torch" reference:
the ops are on no CUDA autocast cast list either (the GPU variants check it), take the dtype that arrives (a ``Linear`` under
autocast hands them bf16 / fp16), compute in fp32 and return the dtypes of the table (triton: no fp64,
as on the CPU). The GPU variants below (ids ``...-cuda-cuda``, ``...-triton-cuda``, ``...-torch-cuda``)
run the same checks under CUDA autocast, bf16 and fp16, and are skipped without a GPU; the CPU ones
(ids as before: ``cpp``, ``triton`` under the interpreter, ``torch``) keep CPU autocast.

Checked here:
* a small SNN (Linear -> LIFNode(step_mode="m") -> Linear) under bf16 autocast (and fp16: cpp on the
  CPU, cuda and triton on the GPU) against
  an fp32 teacher, with per_timestep_kl / hta_kl / nld_loss (fixed seed): forward and backward run, the
  node sees and emits bf16 (fp16), the loss is fp32, and every parameter gradient is within a relative L2
  error of 5e-2 (fp16: 1e-2) of the same model in fp32 without autocast. The first layer sits on a
  grid bf16 holds exactly, so the node gets the same currents and no spike flips: with a random first
  layer, bf16 rounding flips the spikes of membranes near the threshold and the step differs from
  fp32 by ~10% whatever computes it -- there the kernels are checked against the pure-PyTorch neuron
  and loss under the same autocast instead;
* every op accepts the autocast dtypes (bf16 activations, fp32 teacher, mixed student/teacher dtypes);
* fp16 inputs to every op (no autocast) give the fp32 reference's answer on the same values (spikes
  exactly, values and gradients within tests/tolerances.py).

Devices: a test's tensors and model are on the device of its (backend, device) target, or for the
tests without autocast on ``conftest.device_for(backend)`` (the GPU for cuda and compiled triton); the
values are drawn on the CPU from seeded generators and moved, and a kernel is compared with the torch
reference on the same device.
"""
import copy

import pytest
import torch

import snnkd_fast
from snnkd_fast import losses as L
from snnkd_fast import nn as snn

from conftest import device_for, skip_unless_runnable
from lif_helpers import NEURON_KINDS, make_inputs, run_neuron
from tolerances import GRAD_TOL, assert_grad_close

HALF_KD_TOL = {torch.float16: (2e-3, 2e-4), torch.bfloat16: (1.6e-2, 2e-3)}  # as test_kd_backends.KD_TOL
# Relative L2 error of a parameter gradient under autocast vs fp32: the activations are rounded to
# 8 (bf16) or 11 (fp16) bits once per layer, and a neuron whose membrane lands within that rounding of
# the threshold may flip; the gradient as a whole must stay close.
AMP_GRAD_RTOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)
# Tensors are built on the target's device / device_for(backend): compiled Triton gets CUDA tensors.
TRITON_ON_CUDA_TENSORS = True


def _backends(family):
    return [b for b in ("cpp", "triton", "cuda") if snnkd_fast.backends(family)[b]]


# kernels of both families, for the tests without autocast (run on device_for(backend))
BACKENDS = [b for b in _backends("lif") if b in _backends("kd")]

# (backend, device) targets of the autocast tests: autocast is per device type, so the device is part of
# the test. The CPU targets (CPU autocast) as before, ids the backend; the GPU targets (CUDA autocast)
# always, skipped with the reason where they cannot run (no CUDA device, backend not built).
CPU_TARGETS = [(b, "cpu") for b in ("cpp", "triton") if b in BACKENDS]
GPU_TARGETS = [("cuda", "cuda"), ("triton", "cuda")]
TARGETS = CPU_TARGETS + GPU_TARGETS


def target_id(backend: str, device: str) -> str:
    return backend if device == "cpu" else f"{backend}-{device}"


DTYPE_ID = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def autocast_configs(cpu_targets, gpu_targets):
    """(amp_dtype, backend, device): bf16 CPU autocast on the CPU targets; bf16 and fp16 CUDA autocast on
    the GPU targets."""
    return ([(torch.bfloat16, b, d) for b, d in cpu_targets]
            + [(dtype, b, d) for b, d in gpu_targets for dtype in (torch.bfloat16, torch.float16)])


def autocast_ids(configs):
    """The CPU ids as before this module ran on the GPU (the backend alone: bf16 is implied); the GPU ids
    name the autocast dtype and the target, e.g. "fp16-triton-cuda"."""
    return [target_id(b, d) if d == "cpu" else f"{DTYPE_ID[dtype]}-{target_id(b, d)}" for dtype, b, d in configs]


def skip_unless_target_runs(backend: str, device: str) -> None:
    """As conftest.skip_unless_runnable, for both op families (a test here runs neurons and losses)."""
    for family in ("lif", "kd"):
        skip_unless_runnable(backend, device, family)
    if backend == "triton" and device == "cuda" and device_for("triton") != "cuda":
        pytest.skip("triton runs in the interpreter (TRITON_INTERPRET=1): CPU tensors only")


LOSSES = {
    "per_timestep_kl": lambda s, t, backend: L.per_timestep_kl(s, t, temperature=4.0, backend=backend),
    "hta_kl": lambda s, t, backend: L.hta_kl(s, t, temperature=4.0, head_threshold=0.5, backend=backend),
    "nld_loss": lambda s, t, backend: L.nld_loss(s, t, temperature=2.0, seed=1234, backend=backend),
}


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def _student(backend, dyadic_first_layer=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), snn.LIFNode(tau=2.0, step_mode="m", backend=backend),
                                torch.nn.Linear(128, 10))
    if dyadic_first_layer:
        # Weights, bias (and inputs) on a grid of 1/8 whose products and sums bf16 holds exactly: the
        # LIF node then sees the very same currents under autocast as in fp32, so no spike flips and
        # the remaining difference is the rounding autocast itself adds (second layer, backward).
        with torch.no_grad():
            model[0].weight.copy_(torch.randint(-2, 3, model[0].weight.shape) * 0.25)
            model[0].bias.copy_(torch.randint(-2, 3, model[0].bias.shape) * 0.25)
    return model


def _step(model, x, teacher, loss_fn, backend, autocast_dtype=None):
    """One forward + backward under autocast of x's device type (CPU or CUDA); returns (loss, {name: grad},
    what the LIF node saw and emitted, output dtype)."""
    seen = {}

    def hook(module, inputs, spikes):
        seen.update(x=inputs[0].dtype, spikes_dtype=spikes.dtype, spikes=spikes.detach().float())

    handle = model[1].register_forward_hook(hook)
    model.zero_grad(set_to_none=True)
    model[1].reset()
    try:
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(x)
            loss = loss_fn(out, teacher, backend)
        loss.backward()
    finally:
        handle.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, seen, out.dtype


# CPU: fp16 autocast on the cpp kernels only (the Triton interpreter is slow and bf16 covers its dtype
# path). GPU: bf16 and fp16 CUDA autocast on the cuda and the compiled triton kernels.
AMP_CONFIGS = ([(torch.bfloat16, b, d) for b, d in CPU_TARGETS] + [(torch.float16, b, d) for b, d in CPU_TARGETS
                                                                    if b == "cpp"]
               + [(dtype, b, d) for b, d in GPU_TARGETS for dtype in (torch.bfloat16, torch.float16)])


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("amp_dtype, backend, device", AMP_CONFIGS,
                         ids=[f"{'bf16' if d == torch.bfloat16 else 'fp16'}-{target_id(b, dev)}"
                              for d, b, dev in AMP_CONFIGS])
def test_autocast_training_step_matches_fp32(backend, device, loss_name, amp_dtype):
    skip_unless_target_runs(backend, device)
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(-3, 4, (4, 16, 32), generator=g) * 0.5).to(device)
    teacher = (torch.randn(16, 10, generator=g) * 3.0).to(device)   # an fp32 ANN teacher's logits
    model = _student(backend, dyadic_first_layer=True).to(device)
    reference = copy.deepcopy(model)
    loss_fn = LOSSES[loss_name]

    loss, grads, seen, out_dtype = _step(model, x, teacher, loss_fn, backend, autocast_dtype=amp_dtype)
    assert (seen["x"], seen["spikes_dtype"], out_dtype) == (amp_dtype,) * 3, "the node runs on autocast activations"
    assert loss.dtype == torch.float32 and torch.isfinite(loss)

    ref_loss, ref_grads, ref_seen, _ = _step(reference, x, teacher, loss_fn, backend)
    assert (ref_seen["x"], ref_seen["spikes_dtype"]) == (torch.float32, torch.float32)
    assert torch.equal(seen["spikes"], ref_seen["spikes"]) and 0 < seen["spikes"].mean() < 1
    torch.testing.assert_close(loss, ref_loss, rtol=AMP_GRAD_RTOL[amp_dtype], atol=0)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        error = relative_l2(grad, ref_grads[name])
        assert error < AMP_GRAD_RTOL[amp_dtype], f"{name}: relative L2 error {error:.3g} vs fp32"


REFERENCE_CONFIGS = autocast_configs(CPU_TARGETS, GPU_TARGETS)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("amp_dtype, backend, device", REFERENCE_CONFIGS, ids=autocast_ids(REFERENCE_CONFIGS))
def test_autocast_training_step_kernels_match_reference_under_autocast(backend, device, loss_name, amp_dtype):
    """A random first layer: under bf16 some membranes land within bf16 rounding of the threshold and
    flip, so the step differs from fp32 by ~10% (inherent to bf16, not to the kernels). Against the
    pure-PyTorch neuron and loss run under the same autocast (on the same device) the kernels agree to
    float rounding. (GPU: also under fp16 autocast.)"""
    skip_unless_target_runs(backend, device)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 16, 32, generator=g) * 2.0).to(device)
    teacher = (torch.randn(16, 10, generator=g) * 3.0).to(device)
    loss_fn = LOSSES[loss_name]
    ref_loss_fn = lambda s, t, _backend: loss_fn(s, t, "torch")  # NLD: the same seed, the same noise
    loss, grads, seen, _ = _step(_student(backend).to(device), x, teacher, loss_fn, backend,
                                 autocast_dtype=amp_dtype)
    ref_loss, ref_grads, ref_seen, _ = _step(_student("torch").to(device), x, teacher, ref_loss_fn, backend,
                                             autocast_dtype=amp_dtype)
    assert loss.dtype == torch.float32 and seen["x"] == ref_seen["x"] == amp_dtype
    assert torch.equal(seen["spikes"], ref_seen["spikes"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # cpp computes in float32 as the reference does (measured up to 1.3e-5 relative); Triton's
    # interpreter rounds fp32 -> bf16 toward zero (not to nearest, as the GPU does), so its bf16
    # gradients are off by up to one bf16 ulp (2^-7 relative).
    rtol = 1e-4 if backend == "cpp" else GRAD_TOL[amp_dtype][0]
    for name, grad in grads.items():
        error = relative_l2(grad, ref_grads[name])
        assert error < rtol, f"{name}: relative L2 error {error:.3g} vs the reference under autocast"


# --------------------------------------------------------------------------------------------------
# every op under autocast: activations in bf16, teacher in fp32, mixed pairs
# --------------------------------------------------------------------------------------------------

LOSS_FNS = {
    "kd_kl": lambda s, t, b: L.kd_kl(s, t, backend=b),
    "per_timestep_kl": lambda s, t, b: L.per_timestep_kl(s, t, backend=b),
    "tser_loss": lambda s, t, b: L.tser_loss(s, t, backend=b),
    "hta_kl": lambda s, t, b: L.hta_kl(s, t, backend=b),
    "hta_kl_mean_logits": lambda s, t, b: L.hta_kl(s, t, time_reduction="mean_logits", backend=b),
    "nld_loss": lambda s, t, b: L.nld_loss(s, t, seed=5, backend=b),
    "nld_loss_per_timestep": lambda s, t, b: L.nld_loss(s, t, seed=5, per_timestep=True, backend=b),
}
PAIRS = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
         (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]


# the kernels and the torch reference, on the CPU (CPU autocast) and on the GPU (CUDA autocast)
ACCEPT_CONFIGS = autocast_configs(CPU_TARGETS + [("torch", "cpu")], GPU_TARGETS + [("torch", "cuda")])


@pytest.mark.parametrize("amp_dtype, backend, device", ACCEPT_CONFIGS, ids=autocast_ids(ACCEPT_CONFIGS))
@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_losses_accept_autocast_and_mixed_dtypes(name, backend, device, amp_dtype):
    skip_unless_target_runs(backend, device)
    g = torch.Generator().manual_seed(2)
    base_s, base_t = torch.randn(3, 4, 10, generator=g) * 3, torch.randn(4, 10, generator=g) * 3
    base_s, base_t = base_s.to(device), base_t.to(device)
    interpreter = backend == "triton" and device == "cpu"
    for s_dtype, t_dtype in PAIRS[:3] if interpreter else PAIRS:  # the interpreter is slow
        student = base_s.to(s_dtype).clone().requires_grad_(True)
        teacher = base_t.to(t_dtype).clone().requires_grad_(True)
        with torch.autocast(device, dtype=amp_dtype):
            loss = LOSS_FNS[name](student, teacher, backend)
        assert loss.dtype == torch.float32, (s_dtype, t_dtype)
        loss.backward()
        assert student.grad.dtype == s_dtype and teacher.grad.dtype == t_dtype
        assert torch.isfinite(student.grad.float()).all() and torch.isfinite(teacher.grad.float()).all()
        if "nld" in name and backend == "torch":
            continue  # the torch backend's NLD draws fresh noise on every call
        # the same values in fp32, without autocast: the half inputs are only read, the arithmetic is fp32
        s32 = student.detach().float().requires_grad_(True)
        t32 = teacher.detach().float().requires_grad_(True)
        loss32 = LOSS_FNS[name](s32, t32, backend)
        loss32.backward()
        torch.testing.assert_close(loss, loss32, rtol=1e-5, atol=1e-6)
        for half, full, dtype in ((student.grad, s32.grad, s_dtype), (teacher.grad, t32.grad, t_dtype)):
            rtol, atol = HALF_KD_TOL.get(dtype, (1e-5, 1e-6))  # rounded to the input's dtype once
            torch.testing.assert_close(half.float(), full, rtol=rtol, atol=atol * max(1.0, full.abs().max().item()))


@pytest.mark.parametrize("amp_dtype, backend, device", ACCEPT_CONFIGS, ids=autocast_ids(ACCEPT_CONFIGS))
@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_neurons_accept_autocast_dtypes(kind, backend, device, amp_dtype):
    skip_unless_target_runs(backend, device)
    ops = {"lif": snnkd_fast.lif_multistep, "if": snnkd_fast.if_multistep}
    for x_dtype, v_dtype in [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                             (torch.bfloat16, torch.float16)]:
        x = (torch.randn(4, 3, 5) * 1.5 + 0.5).to(x_dtype).to(device).requires_grad_(True)
        v_init = (torch.randn(3, 5) * 0.3).to(v_dtype).to(device).requires_grad_(True)
        w = torch.tensor(0.3, dtype=v_dtype, device=device, requires_grad=True)
        with torch.autocast(device, dtype=amp_dtype):
            if kind == "plif":
                spikes, v = snnkd_fast.plif_multistep(x, w, v_init, backend=backend, return_v=True)
            else:
                spikes, v = ops[kind](x, v_init, backend=backend, return_v=True)
        assert spikes.dtype == x_dtype and v.dtype == torch.float32
        (spikes.float().sum() + v.sum()).backward()
        assert x.grad.dtype == x_dtype and v_init.grad.dtype == v_dtype
        if kind == "plif":
            assert w.grad.dtype == v_dtype and torch.isfinite(w.grad)
    node = {"lif": snn.LIFNode, "if": snn.IFNode, "plif": snn.ParametricLIFNode}[kind](step_mode="m", backend=backend)
    node = node.to(device)  # PLIF's w
    with torch.autocast(device, dtype=amp_dtype):
        out = node(torch.nn.functional.linear(torch.randn(4, 3, 8).to(device), torch.randn(5, 8).to(device)))
    assert out.dtype == amp_dtype and node.v.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# fp16 inputs to each op (no autocast) against the fp32 reference on the same values
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_neuron_fp16_inputs_match_fp32_reference(kind, backend):
    # on device_for(backend); the fp32 torch reference runs on the same device
    x, v_init, grad_spikes, grad_v, w = make_inputs((6, 4, 9), torch.float16, device=device_for(backend))
    half = run_neuron(kind, x, v_init, w, grad_spikes, grad_v, backend, surrogate="atan", tau=3.0)
    fp32 = run_neuron(kind, x.float(), v_init, w, grad_spikes.float(), grad_v, "torch", surrogate="atan", tau=3.0)
    assert half.spikes.dtype == torch.float16 and half.grad_x.dtype == torch.float16
    assert torch.equal(half.spikes.float(), fp32.spikes), "fp16 spikes differ from the fp32 reference"
    assert 0 < half.spikes.sum() < half.spikes.numel()
    assert_grad_close(half.v_final, fp32.v_final, torch.float32, "v_final")  # both fp32, same arithmetic
    assert_grad_close(half.grad_x, fp32.grad_x, torch.float16, "grad x")   # rounded to fp16 once
    assert_grad_close(half.grad_v_init, fp32.grad_v_init, torch.float32, "grad v_init")
    if kind == "plif":
        rtol, atol = GRAD_TOL[torch.float32]
        torch.testing.assert_close(half.grad_w, fp32.grad_w, rtol=rtol, atol=atol * fp32.grad_x.abs().sum().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_loss_fp16_inputs_match_fp32_reference(name, backend):
    g = torch.Generator().manual_seed(3)
    device = device_for(backend)  # the fp32 reference runs on the same device
    student = (torch.randn(3, 5, 40, generator=g) * 3).half().to(device)
    teacher = (torch.randn(5, 40, generator=g) * 3).half().to(device)
    s16, t16 = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss16 = LOSS_FNS[name](s16, t16, backend)
    loss16.backward()
    s32, t32 = student.float().requires_grad_(True), teacher.float().requires_grad_(True)
    # the fp32 reference: the "torch" backend, except NLD, whose reference noise must be the kernel's:
    # compare with the same kernel at fp32 (already checked against the reference in test_kd_backends)
    loss32 = LOSS_FNS[name](s32, t32, backend if "nld" in name else "torch")
    loss32.backward()
    assert loss16.dtype == torch.float32 and s16.grad.dtype == torch.float16 and t16.grad.dtype == torch.float16
    rtol, atol = HALF_KD_TOL[torch.float16]
    torch.testing.assert_close(loss16, loss32, rtol=1e-5, atol=1e-6)  # same values, fp32 arithmetic
    for a, b in ((s16.grad, s32.grad), (t16.grad, t32.grad)):
        torch.testing.assert_close(a.float(), b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))
