"""The C++ autograd kernels of the cpp and cuda backends' eager calls (csrc/common/eager_autograd.h:
snnkd_fast::kd_loss, nld_loss, neuron_multistep). They must give bit for bit what the Python formulas
give (the torch.library formulas' autograd.Function, which torch.compile and torch.func take): losses
and their reductions, gradients of every input, the first-order-only rule, and the torch.library
contract (opcheck). One exception, tested on its own below: on the CPU, kd_loss's forward forms the
student's gradient from its own exps when only the student needs one (csrc/kd/kd_autograd.cpp), a
gradient equal to the row backward's within a few float32 ulps; on a GPU kd_loss's and nld_loss's
forward kernels form it with the row backward's terms, bit for bit the row backward's at a loss
gradient of 1."""
import pytest
import torch

import snnkd_fast
import snnkd_fast.losses as L
from snnkd_fast import _library

from conftest import device_for
from kd_helpers import CASE_IDS, CASES, run_loss
from lif_helpers import NEURON_KINDS, make_inputs, run_neuron
from tolerances import assert_grad_close

BACKENDS = ["cpp", "cuda"]


def _skip_unless(backend):
    if not snnkd_fast.backends("kd")[backend]:
        pytest.skip(snnkd_fast.backends("kd")[backend].reason)


def _both_paths(monkeypatch, run):
    """``run()`` with the C++ autograd kernels, then with the Python Function."""
    monkeypatch.setattr(_library, "CXX_AUTOGRAD", True)
    cxx = run()
    monkeypatch.setattr(_library, "CXX_AUTOGRAD", False)
    return cxx, run()


def _assert_same(a, b):
    if a is None or b is None:
        assert a is None and b is None
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _node_names(tensor):
    return {type(tensor.grad_fn).__name__, tensor.grad_fn.name()}


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_record_one_cxx_node(backend):
    """An eager training call is one C++ node (the loss's reduction included), not a Python Function."""
    _skip_unless(backend)
    device = device_for(backend)
    student = torch.randn(2, 3, 7, device=device, requires_grad=True)
    teacher = torch.randn(3, 7, device=device)
    for loss in (L.per_timestep_kl(student, teacher, backend=backend),
                 L.nld_loss(student, teacher, seed=1, backend=backend),
                 L.kd_kl(student, teacher, backend=backend)):
        assert "CppFunction" in _node_names(loss)
        assert any(name.startswith("torch::autograd::CppNode<snnkd::") for name in _node_names(loss))
        assert loss.grad_fn.next_functions[0][0] is not None  # straight to the student (kd_kl: its time mean)
    for backward in ("bptt", "rate"):
        spikes = snnkd_fast.lif_multistep(torch.randn(2, 3, 5, device=device, requires_grad=True), backend=backend,
                                          backward=backward)
        assert "CppFunction" in _node_names(spikes)
    with torch.no_grad():
        assert L.per_timestep_kl(student, teacher, backend=backend).grad_fn is None


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("teacher_steps", [0, 3], ids=["teacher_BC", "teacher_TBC"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_losses_match_the_python_path_bitwise(monkeypatch, backend, dtype, teacher_steps, reduction, case):
    _skip_unless(backend)
    device = device_for(backend)
    g = torch.Generator().manual_seed(5)
    student = (torch.randn(3, 4, 13, generator=g) * 2).to(dtype).to(device)
    teacher = (torch.randn(*((teacher_steps,) if teacher_steps else ()), 4, 13, generator=g) * 2).to(dtype).to(device)
    cxx, python = _both_paths(monkeypatch, lambda: run_loss(case, student, teacher, backend, reduction=reduction))
    _assert_same(cxx.loss, python.loss)
    _assert_same(cxx.grad_student, python.grad_student)
    _assert_same(cxx.grad_teacher, python.grad_teacher)


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", NEURON_KINDS)
@pytest.mark.parametrize("mode", [{}, {"v_reset": None}, {"detach_reset": True, "surrogate": "atan"},
                                  {"decay_input": False, "v_threshold": 0.7}],
                         ids=["default", "soft_reset", "detach_atan", "no_decay_input"])
@pytest.mark.parametrize("v_init_kind", ["tensor", "none"])
@pytest.mark.parametrize("backward", ["bptt", "rate"])
def test_neurons_match_the_python_path_bitwise(monkeypatch, backend, dtype, kind, mode, v_init_kind, backward):
    _skip_unless(backend)
    if backward == "rate" and kind == "plif":
        pytest.skip("backward='rate' gives PLIF's w no gradient (refused while w requires grad)")
    x, v_init, grad_spikes, grad_v, w = make_inputs((4, 3, 17), dtype=dtype, device=device_for(backend))
    v_init = v_init if v_init_kind == "tensor" else None
    cxx, python = _both_paths(monkeypatch, lambda: run_neuron(kind, x, v_init, w, grad_spikes, grad_v, backend,
                                                             backward=backward, **mode))
    for field in ("spikes", "v_final", "grad_x", "grad_v_init", "grad_w"):
        _assert_same(getattr(cxx, field), getattr(python, field))


@pytest.mark.parametrize("used", ["spikes", "v_final"])
def test_neuron_backward_with_one_output_unused(monkeypatch, used):
    """The unused output's gradient is not materialised (undefined in C++, None in Python): the same
    gradients either way."""
    _skip_unless("cpp")
    x, v_init, _, _, _ = make_inputs((3, 2, 6))

    def run():
        leaf, v_leaf = x.clone().requires_grad_(True), v_init.float().clone().requires_grad_(True)
        spikes, v_final = snnkd_fast.lif_multistep(leaf, v_leaf, backend="cpp", return_v=True)
        ((spikes * torch.arange(6.0)).sum() if used == "spikes" else (v_final ** 2).sum()).backward()
        return leaf.grad, v_leaf.grad

    (gx_cxx, gv_cxx), (gx_py, gv_py) = _both_paths(monkeypatch, run)
    _assert_same(gx_cxx, gx_py)
    _assert_same(gv_cxx, gv_py)


def test_gradcheck_through_the_cxx_kernels():
    """float64 finite differences through the C++ nodes, with each reduction (the division and the
    broadcast of the backward) and the neuron's three differentiable inputs."""
    _skip_unless("cpp")
    student = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    for reduction in ("batchmean", "sum", "mean", "none"):
        fn = lambda s, t: L.tser_loss(s, t, backend="cpp", reduction=reduction, entropy_weight=0.3)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (student, teacher), eps=1e-6, atol=1e-7)
    fn = lambda s, t: L.nld_loss(s, t, backend="cpp", seed=4, noise_std=0.3, per_timestep=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student, teacher), eps=1e-6, atol=1e-7)
    # soft reset keeps the membrane continuous in the input: finite differences see the surrogate path
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    v_init = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    graph = lambda x, v, w: snnkd_fast.plif_multistep(x, w, v, v_reset=None, detach_reset=True,  # noqa: E731
                                                      backend="cpp", return_v=True)[1]
    assert torch.autograd.gradcheck(graph, (x, v_init, w), eps=1e-6, atol=1e-6)


def test_double_backward_is_refused_when_recorded():
    """First order only: a backward recorded for a second differentiation (create_graph with a grad
    output that requires grad) gives gradients whose own backward raises, as @once_differentiable."""
    _skip_unless("cpp")
    student = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    loss = L.per_timestep_kl(student, torch.randn(3, 7, dtype=torch.float64), backend="cpp")
    weight = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss, student, grad_outputs=weight, create_graph=True)
    assert grad.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
    x = torch.randn(3, 2, 5, requires_grad=True)
    spikes = snnkd_fast.lif_multistep(x, backend="cpp")
    (grad_x,) = torch.autograd.grad(spikes, x, grad_outputs=torch.ones_like(spikes).requires_grad_(True),
                                    create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()
    # create_graph without a differentiable grad output records nothing: a plain first-order gradient
    (plain,) = torch.autograd.grad(L.per_timestep_kl(student, torch.randn(3, 7, dtype=torch.float64),
                                                     backend="cpp"), student, create_graph=True)
    assert not plain.requires_grad


def test_one_value_v_init_with_grad_is_refused():
    _skip_unless("cpp")
    v_init = torch.tensor([0.1], requires_grad=True)
    with pytest.raises(ValueError, match="one-element v_init"):
        torch.ops.snnkd_fast.neuron_multistep(torch.randn(3, 2, 4), v_init, None, 1, 2.0, True, 1.0, 0.0, False,
                                              False, 0, 4.0)


def test_bad_divisor_is_refused():
    _skip_unless("cpp")
    with pytest.raises(RuntimeError, match="divisor must be >= 0"):
        torch.ops.snnkd_fast.kd_loss(torch.randn(2, 3, 4), torch.randn(3, 4), 0, 2.0, 2.0, 0.0, 0.5, -1)


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divisor", [0, 1, 3, 6])
def test_opcheck_cxx_ops(backend, divisor):
    _skip_unless(backend)
    device = device_for(backend)
    student = torch.randn(3, 2, 9, device=device, requires_grad=True)
    teacher = torch.randn(2, 9, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.snnkd_fast.kd_loss, (student, teacher, 2, 2.0, 1.5, 0.2, 0.5, divisor))
    seed = torch.tensor(11, device=device)
    torch.library.opcheck(torch.ops.snnkd_fast.nld_loss,
                          (student, teacher, seed, 2.0, 0.1, 0.5, divisor % 2 == 0, False, divisor))
    if divisor == 0:
        x = torch.randn(3, 2, 5, device=device, requires_grad=True)
        v_init = torch.randn(2, 5, device=device, requires_grad=True)
        decay = torch.tensor(0.4, device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.snnkd_fast.neuron_multistep,
                              (x, v_init, decay, 2, 2.0, True, 1.0, 0.0, False, False, 1, 2.0))
        torch.library.opcheck(torch.ops.snnkd_fast.neuron_multistep,
                              (x, torch.zeros(1, device=device), None, 1, 2.0, True, 1.0, 0.0, False, False, 0, 4.0))
        torch.library.opcheck(torch.ops.snnkd_fast.neuron_multistep_rate,
                              (x, v_init.detach(), None, 1, 2.0, True, 1.0, 0.0, False, False, 0, 4.0))


# --------------------------------------------------------------------------------------------------
# the CPU forward's precomputed student gradient (csrc/kd/kd_autograd.cpp)
# --------------------------------------------------------------------------------------------------

def _row_ops(run):
    """run()'s result and the snnkd_fast row kernels (KD's, NLD's) it ran, as the profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = run()
    return result, {e.key for e in prof.key_averages() if e.key.startswith("snnkd_fast::") and "_rows_" in e.key}


def _weighting(reduction, grad_scale):
    """The loss's gradient: grad_scale, or for "none" each row its own weight (every row's gradient
    checked)."""
    def weighted(loss):
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
        return (loss * (weights if reduction == "none" else grad_scale)).sum()
    return weighted


def _student_grad_both_paths(monkeypatch, case, student, teacher, backend, reduction, weighted):
    """The student's gradient of ``weighted(loss)`` through the C++ autograd kernel and through the
    Python path (the row backward), and the row ops the first ran; the losses bitwise equal."""
    def run():
        leaf = student.clone().requires_grad_(True)
        loss = case.fn(leaf, teacher, backend=backend, reduction=reduction, **case.kwargs)
        weighted(loss).backward()
        return loss.detach(), leaf.grad

    monkeypatch.setattr(_library, "CXX_AUTOGRAD", True)
    (loss, grad), ops = _row_ops(run)
    monkeypatch.setattr(_library, "CXX_AUTOGRAD", False)
    python_loss, python_grad = run()
    _assert_same(loss, python_loss)
    return grad, python_grad, ops


def _precomputes(case, C):
    """Whether the cpp forward forms the gradient: NLD always, HTA in its row kernel (any C), KL and
    TSER in theirs (C >= 32 here, not the lane rows), TSER at tau_H = tau."""
    if case.nld:
        return True
    row_kernel = case.fn is L.hta_kl or C >= 32
    return row_kernel and case.kwargs.get("entropy_temperature", case.kwargs["temperature"]) == \
        case.kwargs["temperature"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("C", [13, 48, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
@pytest.mark.parametrize("grad_scale", [1.0, 0.7])
def test_cpu_forward_precomputes_the_student_gradient(monkeypatch, case, C, dtype, reduction, grad_scale):
    """An eager cpp call whose student alone needs a gradient: where the forward can, it forms the
    gradient and the backward runs no row kernel -- the loss's gradient 1 (backpropagated alone or as a
    term of a sum) returns it as it is, any other scales it, "none" weights each row; the loss is
    bitwise the Python path's, the gradient within a few ulps of its row backward's and within the
    suite's tolerance of the float64 reference. KL and TSER at few classes (the lane-rows kernels), a
    bf16 student and TSER at tau_H != tau take the row backward, bitwise the Python path's (HTA's
    forward is the row kernel at any C; NLD forms it at any C; a bf16 student's time average is
    float32)."""
    _skip_unless("cpp")
    g = torch.Generator().manual_seed(C)
    student = (torch.randn(3, 5, C, generator=g) * 2).to(dtype)
    teacher = (torch.randn(5, C, generator=g) * 2).to(dtype)

    weighted = _weighting(reduction, grad_scale)
    grad, python_grad, ops = _student_grad_both_paths(monkeypatch, case, student, teacher, "cpp", reduction,
                                                     weighted)
    family = "nld" if case.nld else "kd"
    # the losses of time-averaged logits average a bf16 student in float32 before the kernel
    averaged = case.fn is L.kd_kl or case.kwargs.get("time_reduction") == "mean_logits" or \
        (case.nld and not case.per_timestep)
    if _precomputes(case, C) and (dtype != torch.bfloat16 or averaged):
        assert ops == {f"snnkd_fast::{family}_rows_forward_student_grad"}, ops
        if dtype == torch.bfloat16:
            assert_grad_close(grad, python_grad, dtype, "vs the row backward")
        else:
            rtol, atol = (2e-5, 2e-6) if dtype == torch.float32 else (1e-12, 1e-13)
            torch.testing.assert_close(grad, python_grad, rtol=rtol, atol=atol * python_grad.abs().max().item())
    else:
        assert ops == {f"snnkd_fast::{family}_rows_forward", f"snnkd_fast::{family}_rows_backward"}, ops
        _assert_same(grad, python_grad)
    reference = student.double().requires_grad_(True)
    weighted(case.reference(reference, teacher.double(), "cpp", reduction)).backward()
    assert_grad_close(grad, reference.grad, dtype, f"{case.name} vs reference")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("C", [13, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("grad_scale", [1.0, 0.7])
def test_cuda_forward_precomputes_the_student_gradient(monkeypatch, case, C, dtype, reduction, grad_scale):
    """The eager cuda call whose student alone needs a gradient (csrc/kd/kd_autograd.cpp): the forward
    kernel forms it (kd_forward_student_grad_kernel, nld_forward_student_grad_kernel: any loss, mode
    and dtype) and the backward runs no row kernel. At a loss gradient of 1 the gradient is the row
    backward's (the Python path's) bit for bit; scaled (0.7, or "none"'s per-row weights) it is
    rounded once more than the row backward's; the loss is bitwise the Python path's."""
    _skip_unless("cuda")
    g = torch.Generator().manual_seed(C)
    student = (torch.randn(3, 5, C, generator=g) * 2).to(dtype).cuda()
    teacher = (torch.randn(5, C, generator=g) * 2).to(dtype).cuda()

    weighted = _weighting(reduction, grad_scale)
    grad, python_grad, ops = _student_grad_both_paths(monkeypatch, case, student, teacher, "cuda", reduction,
                                                     weighted)
    assert ops == {f"snnkd_fast::{'nld' if case.nld else 'kd'}_rows_forward_student_grad"}, ops
    if grad_scale == 1.0 and reduction != "none":
        _assert_same(grad, python_grad)
    elif dtype == torch.bfloat16:
        assert_grad_close(grad, python_grad, dtype, "vs the row backward")
    else:
        rtol = 4e-7 if dtype == torch.float32 else 1e-15
        torch.testing.assert_close(grad, python_grad, rtol=rtol, atol=rtol * python_grad.abs().max().item())
    reference = student.double().requires_grad_(True)
    weighted(case.reference(reference, teacher.double(), "cuda", reduction)).backward()
    assert_grad_close(grad, reference.grad, dtype, f"{case.name} vs reference")


@pytest.mark.parametrize("family, backend", [("kd", "cpp"), ("nld", "cpp"), ("kd", "cuda"), ("nld", "cuda")])
def test_precomputed_gradient_is_used_once(family, backend):
    """A retained graph's second backward runs the row backward (the first completed the precomputed
    gradient in place and handed it over): the same gradient twice, accumulated."""
    _skip_unless(backend)
    device = device_for(backend)
    student = torch.randn(4, 6, 64, dtype=torch.float64, device=device, requires_grad=True)
    teacher = torch.randn(6, 64, dtype=torch.float64, device=device)
    loss = (L.hta_kl(student, teacher, backend=backend) if family == "kd"
            else L.nld_loss(student, teacher, seed=3, per_timestep=True, backend=backend))
    (_, ops) = _row_ops(lambda: loss.backward(retain_graph=True))
    assert ops == set(), ops
    first = student.grad.clone()
    (_, ops) = _row_ops(lambda: loss.backward())
    assert ops == {f"snnkd_fast::{family}_rows_backward"}, ops
    torch.testing.assert_close(student.grad, 2 * first, rtol=1e-12, atol=1e-15)


def test_no_precomputed_gradient_where_it_would_be_unused_or_unseen():
    """The forward forms no gradient under no_grad, for a student that needs none, when the teacher
    needs one (data-free KD), under saved-tensor hooks (they would not see the held gradient) or a
    dispatch mode (it would not see the direct kernel call: here it sees the row op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    _skip_unless("cpp")
    student = torch.randn(2, 3, 64, requires_grad=True)
    teacher = torch.randn(3, 64)
    calls = {
        "no_grad": lambda: L.per_timestep_kl(student, teacher, backend="cpp"),
        "student_without_grad": lambda: L.per_timestep_kl(student.detach(), teacher, backend="cpp"),
        "teacher_with_grad": lambda: L.per_timestep_kl(student, teacher.clone().requires_grad_(True),
                                                       backend="cpp"),
        "saved_tensor_hooks": lambda: L.per_timestep_kl(student, teacher, backend="cpp"),
        "dispatch_mode": lambda: L.per_timestep_kl(student, teacher, backend="cpp"),
    }
    for name, call in calls.items():
        if name == "no_grad":
            with torch.no_grad():
                _, ops = _row_ops(call)
        elif name == "saved_tensor_hooks":
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                _, ops = _row_ops(call)
        elif name == "dispatch_mode":
            with SeenOps() as mode:
                _, ops = _row_ops(call)
            assert "snnkd_fast.kd_rows_forward.default" in mode.names, mode.names
        else:
            _, ops = _row_ops(call)
        assert ops == {"snnkd_fast::kd_rows_forward"}, (name, ops)
    _, ops = _row_ops(lambda: L.per_timestep_kl(student, teacher, backend="cpp"))
    assert ops == {"snnkd_fast::kd_rows_forward_student_grad"}, ops
