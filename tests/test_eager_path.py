"""The eager path of the kernel ops (snnkd_fast/_library.py): the registered autograd formula run as a
plain autograd.Function below the autograd key. Its agreement with the torch.library op is checked by
the compile tests (same outputs and gradients) and by every eager test; here: what the Function form
adds (torch.func transforms) and refuses (double backward)."""
import pytest
import torch

import snnkd_fast
from snnkd_fast import losses

BACKENDS = [b for b in ("cpp", "triton") if snnkd_fast.backends("kd")[b]]


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


LOSSES = {
    "per_timestep_kl": lambda s, t, b: losses.per_timestep_kl(s, t, backend=b),
    "tser_loss": lambda s, t, b: losses.tser_loss(s, t, backend=b),
    "hta_kl": lambda s, t, b: losses.hta_kl(s, t, backend=b),
    "nld_loss": lambda s, t, b: losses.nld_loss(s, t, seed=3, backend=b),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_torch_func_grad_matches_autograd(name, backend):
    student, teacher = _logits(3, 5, 11), _logits(5, 11, seed=1)
    loss = LOSSES[name]
    grad_s, grad_t = torch.func.grad(lambda s, t: loss(s, t, backend), argnums=(0, 1))(student, teacher)
    s_leaf, t_leaf = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss(s_leaf, t_leaf, backend).backward()
    torch.testing.assert_close(grad_s, s_leaf.grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_t, t_leaf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backward", ["bptt", "rate"])
@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if snnkd_fast.backends("lif")[b]])
def test_torch_func_grad_neurons(backend, backward):
    x = _logits(4, 3, 17)
    run = lambda x: (snnkd_fast.lif_multistep(x, backend=backend, backward=backward) * torch.arange(17.0)).sum()
    grad = torch.func.grad(run)(x)
    leaf = x.clone().requires_grad_(True)
    run(leaf).backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=0)


def test_double_backward_is_refused():
    """First order only (as the registered formula): the gradient carries no graph of its own, so a
    second backward through it raises instead of returning a wrong (zero) second derivative."""
    student = _logits(2, 3, 7).requires_grad_(True)
    loss = losses.per_timestep_kl(student, _logits(3, 7, seed=1), backend="cpp")
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate|does not require grad"):
        grad.sum().backward()


def _graph_node_names(tensor):
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_eager_calls_take_the_autograd_function_path(monkeypatch):
    """Guards the overhead fix: in eager mode the kernel ops' backward is the plain Function's
    (EagerOpBackward), not torch.library's generated one -- the path of Triton and, with the C++
    autograd kernels off, of cpp/cuda."""
    from snnkd_fast import _library

    monkeypatch.setattr(_library, "CXX_AUTOGRAD", False)
    student = _logits(2, 3, 7).requires_grad_(True)
    names = _graph_node_names(losses.per_timestep_kl(student, _logits(3, 7, seed=1), backend="cpp"))
    assert any(name.startswith("EagerOp") for name in names), names
    x = _logits(2, 3, 5).requires_grad_(True)
    names = _graph_node_names(snnkd_fast.lif_multistep(x, backend="cpp"))
    assert any(name.startswith("EagerOp") for name in names), names


@pytest.mark.parametrize("cxx", [True, False], ids=["cxx_autograd", "python_function"])
def test_eager_calls_skip_function_apply_outside_transforms(monkeypatch, cxx):
    """Guards the second overhead fix: outside torch.func transforms the Function's C apply is called
    directly (Function.apply's per-call inspect.signature binding skipped), with the same results;
    under a transform the call still goes through Function.apply (what functorch needs). The C++
    autograd kernels bypass the Function altogether, and a transform still takes it."""
    from snnkd_fast import _library

    monkeypatch.setattr(_library, "CXX_AUTOGRAD", cxx)
    calls = []
    original = torch.autograd.Function.apply.__func__

    def counting_apply(cls, *args, **kwargs):
        calls.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(counting_apply))
    student = _logits(2, 3, 7).requires_grad_(True)
    teacher = _logits(3, 7, seed=1)
    loss = losses.per_timestep_kl(student, teacher, backend="cpp")
    loss.backward()
    assert not [name for name in calls if name.startswith("Eager")], calls
    reference = student.detach().clone().requires_grad_(True)
    losses.per_timestep_kl(reference, teacher, backend="torch").backward()
    torch.testing.assert_close(student.grad, reference.grad)

    grad = torch.func.grad(lambda s: losses.per_timestep_kl(s, teacher, backend="cpp"))(student.detach())
    assert [name for name in calls if name.startswith("Eager")], "torch.func.grad must use Function.apply"
    torch.testing.assert_close(grad, reference.grad)
    assert _library._transforms_active is not None and _library._unwrap_dead_wrappers is not None


def test_calls_autograd_would_not_record_skip_the_function(monkeypatch):
    """Guards the third overhead fix: under no_grad, or when no tensor input requires grad, the kernel
    op runs below the autograd key without an autograd.Function (no graph node, same values); as soon
    as any input requires grad -- a teacher in data-free distillation, a neuron's v_init -- the
    Function records the call and the gradient reaches that input."""
    from snnkd_fast import _library

    monkeypatch.setattr(_library, "CXX_AUTOGRAD", False)  # the Python path (Triton's, torch.func's)
    ops = []  # "below": the op called below the autograd key; "function": through the Function
    real_below = _library._dispatch_below_autograd

    def counting_below():
        ops.append("below")
        return real_below()

    monkeypatch.setattr(_library, "_dispatch_below_autograd", counting_below)
    for name in ("snnkd_fast::kd_rows_forward", "snnkd_fast::lif_forward_lean"):  # the cpp ops
        function = _library._REGISTERED[name][1]

        def counting_forward(*inputs, _forward=function.forward):
            ops.append("function")
            return _forward(*inputs)

        monkeypatch.setattr(function, "forward", staticmethod(counting_forward))
    student, teacher = _logits(2, 3, 7), _logits(3, 7, seed=1)
    recorded = losses.per_timestep_kl(student.clone().requires_grad_(True), teacher, backend="cpp")
    recorded_ops = list(ops)
    ops.clear()
    with torch.no_grad():
        plain = losses.per_timestep_kl(student.clone().requires_grad_(True), teacher, backend="cpp")
    assert ops == ["below"] and plain.grad_fn is None
    torch.testing.assert_close(plain, recorded.detach(), rtol=0, atol=0)
    ops.clear()
    no_grad_inputs = losses.per_timestep_kl(student, teacher, backend="cpp")
    assert ops == ["below"] and no_grad_inputs.grad_fn is None and not no_grad_inputs.requires_grad
    torch.testing.assert_close(no_grad_inputs, recorded.detach(), rtol=0, atol=0)

    assert "function" in [op for op in recorded_ops]

    # only the teacher requires grad: the Function path, and the teacher gets its gradient
    teacher_leaf = teacher.clone().requires_grad_(True)
    ops.clear()
    losses.per_timestep_kl(student, teacher_leaf, backend="cpp").backward()
    assert ops[0] == "function", ops
    reference_leaf = teacher.clone().requires_grad_(True)
    losses.per_timestep_kl(student, reference_leaf, backend="torch").backward()
    torch.testing.assert_close(teacher_leaf.grad, reference_leaf.grad)

    # neurons: an input current without grad and a v_init that requires it
    x = _logits(3, 2, 5)
    v_init = torch.full((2, 5), 0.25, requires_grad=True)
    ops.clear()
    spikes = snnkd_fast.lif_multistep(x, v_init, backend="cpp", surrogate="atan")
    assert spikes.grad_fn is not None and ops[0] == "function", ops
    (spikes * torch.arange(5.0)).sum().backward()
    v_reference = v_init.detach().clone().requires_grad_(True)
    (snnkd_fast.lif_multistep(x, v_reference, backend="torch", surrogate="atan") * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(v_init.grad, v_reference.grad)
    with torch.no_grad():
        ops.clear()
        eval_spikes = snnkd_fast.lif_multistep(x, v_init, backend="cpp", surrogate="atan")
    assert ops == ["below"] and eval_spikes.grad_fn is None
    torch.testing.assert_close(eval_spikes, spikes.detach(), rtol=0, atol=0)
