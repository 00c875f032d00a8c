"""Bad input gets a clear error naming the argument: never a crash, a hang or a silent wrong result."""
import os

import pytest
import torch

import snnkd_fast
from snnkd_fast import nn as snn

X = torch.randn(4, 3, 5)


# "cuda" too: without a GPU (or with X on the CPU) it cannot run, and every argument error must still
# be the one raised -- arguments are checked before the backend is resolved.
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("call, error, match", [
    (lambda b: snnkd_fast.lif_multistep(torch.empty(0, 3), backend=b), ValueError, "T=0"),
    (lambda b: snnkd_fast.lif_multistep(torch.tensor(1.0), backend=b), ValueError, "x_seq.*time dimension"),
    (lambda b: snnkd_fast.lif_multistep(torch.ones(4, 3, dtype=torch.int32), backend=b), TypeError, "x_seq.*int32"),
    (lambda b: snnkd_fast.lif_multistep(torch.ones(4, 3, dtype=torch.complex64), backend=b), TypeError, "x_seq"),
    (lambda b: snnkd_fast.lif_multistep([[1.0]], backend=b), TypeError, "x_seq must be a torch.Tensor"),
    (lambda b: snnkd_fast.lif_multistep(X, tau=1.0, backend=b), ValueError, "tau must be > 1"),
    (lambda b: snnkd_fast.lif_multistep(X, tau=0.5, backend=b), ValueError, "tau"),
    (lambda b: snnkd_fast.lif_multistep(X, tau=float("nan"), backend=b), ValueError, "tau must be finite"),
    (lambda b: snnkd_fast.lif_multistep(X, tau="2", backend=b), TypeError, "tau"),
    (lambda b: snnkd_fast.lif_multistep(X, torch.zeros(4), backend=b), ValueError, r"v_init has shape \(4,\)"),
    (lambda b: snnkd_fast.lif_multistep(X, torch.zeros(3, 5, dtype=torch.int64), backend=b), TypeError, "v_init"),
    (lambda b: snnkd_fast.lif_multistep(X, "zero", backend=b), TypeError, "v_init"),
    (lambda b: snnkd_fast.lif_multistep(X, surrogate="relu", backend=b), ValueError, "surrogate='relu'"),
    (lambda b: snnkd_fast.lif_multistep(X, surrogate=42, backend=b), ValueError, "surrogate"),
    (lambda b: snnkd_fast.lif_multistep(X, alpha=-1.0, backend=b), ValueError, "alpha"),
    (lambda b: snnkd_fast.lif_multistep(X, v_threshold=float("inf"), backend=b), ValueError, "v_threshold"),
    (lambda b: snnkd_fast.lif_multistep(X, v_reset="none", backend=b), TypeError, "v_reset"),
    (lambda b: snnkd_fast.lif_multistep(X, detach_reset="yes", backend=b), TypeError, "detach_reset"),
    (lambda b: snnkd_fast.plif_multistep(X, torch.zeros(2), backend=b), ValueError, "w must hold one element"),
    (lambda b: snnkd_fast.plif_multistep(X, None, backend=b), TypeError, "w must be"),
    (lambda b: snnkd_fast.plif_multistep(X, torch.tensor(1), backend=b), TypeError, "w must be a floating"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_argument_is_named(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(backend)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend='gpu'"):
        snnkd_fast.lif_multistep(X, backend="gpu")


def test_unavailable_backend_says_why():
    status = snnkd_fast.backends()["cuda"]
    if status:
        pytest.skip("the CUDA backend is available here")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: .+"):
        snnkd_fast.lif_multistep(X, backend="cuda")


def test_backend_on_wrong_device():
    if torch.cuda.is_available() and snnkd_fast.backends()["cpp"]:
        with pytest.raises(ValueError, match="backend='cpp' runs on CPU tensors"):
            snnkd_fast.lif_multistep(X.cuda(), backend="cpp")
    else:
        pytest.skip("needs a CUDA device to put the tensor on the wrong device")


def test_v_init_on_other_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.raises(ValueError, match="v_init is on"):
        snnkd_fast.lif_multistep(X, torch.zeros(3, 5, device="cuda"))


def test_compiled_op_rejects_malformed_direct_call():
    """A direct torch.ops call with inconsistent tensors raises instead of reading out of bounds."""
    if not snnkd_fast.backends()["cpp"]:
        pytest.skip(snnkd_fast.backends()["cpp"].reason)
    with pytest.raises(RuntimeError, match="v_init must hold one step"):
        torch.ops.snnkd_fast.lif_forward(X.contiguous(), torch.zeros(7), None, 1, 2.0, True, 1.0, 0.0, False, False,
                                         0, 4.0)
    with pytest.raises(RuntimeError, match="PLIF needs a one-element decay"):
        torch.ops.snnkd_fast.lif_forward(X.contiguous(), torch.zeros(3, 5), None, 2, 2.0, True, 1.0, 0.0, False,
                                         False, 0, 4.0)
    with pytest.raises(RuntimeError, match="unknown surrogate"):
        torch.ops.snnkd_fast.lif_forward(X.contiguous(), torch.zeros(3, 5), None, 1, 2.0, True, 1.0, 0.0, False,
                                         False, 99, 4.0)


@pytest.mark.parametrize("make, error, match", [
    (lambda: snn.LIFNode(tau=1.0), ValueError, "LIFNode: tau must be > 1"),
    (lambda: snn.LIFNode(step_mode="x"), ValueError, "step_mode must be 's' or 'm'"),
    (lambda: snn.LIFNode(store_v_seq=True), ValueError, "store_v_seq=True is not supported"),
    (lambda: snn.LIFNode(surrogate_function="nope"), ValueError, "'nope' is not a known surrogate"),
    (lambda: snn.ParametricLIFNode(init_tau=0.5), ValueError, "init_tau must be a float > 1"),
    (lambda: snn.IFNode(v_threshold=None), TypeError, "v_threshold must be a real number"),
])
def test_module_constructor_validates(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_nan_policy():
    """NaN input: that neuron never spikes and its membrane stays NaN, identically in every backend."""
    x = torch.full((4, 3), 2.0)
    x[1, 0] = float("nan")
    reference = snnkd_fast.lif_multistep(x, backend="torch", return_v=True)
    for backend in ("torch", "cpp", "triton"):
        if not snnkd_fast.backends()[backend]:
            continue
        spikes, v = snnkd_fast.lif_multistep(x, backend=backend, return_v=True)
        assert spikes[1:, 0].sum() == 0 and torch.isnan(v[0])
        assert spikes[:, 1:].sum() > 0 and not torch.isnan(v[1:]).any()
        assert torch.equal(spikes, reference[0])
        torch.testing.assert_close(v, reference[1], equal_nan=True, rtol=0, atol=0)


def test_config_cache_keeps_validation_and_attribute_changes():
    """The neuron config of the usual arguments is cached (snnkd_fast/lif/op.py, _make_config): after a
    call with v_threshold=1.0, True (== 1.0 as a key) is still refused, an int still converts, and a
    module's changed attribute still takes effect on its next call; the module's membrane, set past
    nn.Module.__setattr__, behaves as an attribute (a tensor after a call, the rest value after reset)."""
    x = torch.full((3, 4), 1.5)  # spikes at the second step
    assert snnkd_fast.lif_multistep(x, v_threshold=1.0).sum() > 0
    with pytest.raises(TypeError, match="v_threshold"):
        snnkd_fast.lif_multistep(x, v_threshold=True)
    with pytest.raises(TypeError, match="decay_input"):
        snnkd_fast.lif_multistep(x, decay_input=1.5)
    torch.testing.assert_close(snnkd_fast.lif_multistep(x, v_threshold=1), snnkd_fast.lif_multistep(x, v_threshold=1.0))
    node = snn.LIFNode(step_mode="m")
    first = node(x)
    assert isinstance(node.v, torch.Tensor) and node.v.shape == (4,) and "v" not in dict(node.named_buffers())
    node.reset()
    assert node.v == 0.0 and isinstance(node.v, float)
    node.v_threshold = 10.0  # no spike any more
    assert first.sum() > 0 and node(x).sum() == 0
    node.reset()
    node.v_threshold = 1.0
    node.surrogate_function = "atan"  # seen only in the gradient: compare it with atan's and sigmoid's
    x_node, x_atan, x_sigmoid = (x.clone().requires_grad_(True) for _ in range(3))
    torch.testing.assert_close(node(x_node), first)
    node(x_node).sum()  # a second call from the carried membrane, as training would
    node.reset()
    node(x_node).sum().backward()
    snnkd_fast.lif_multistep(x_atan, surrogate="atan").sum().backward()
    snnkd_fast.lif_multistep(x_sigmoid, surrogate="sigmoid").sum().backward()
    torch.testing.assert_close(x_node.grad, x_atan.grad)
    assert not torch.allclose(x_atan.grad, x_sigmoid.grad)


def test_triton_that_fails_to_import_leaves_the_package_usable(tmp_path):
    """An installed triton that cannot be imported (e.g. built for another torch) makes only the triton
    backend unavailable, with the import error as its reason; import snnkd_fast and the cpp backend work."""
    import subprocess
    import sys

    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('this triton was built for another torch')\n")
    code = ("import torch, snnkd_fast\n"
            "status = snnkd_fast.backends()['triton']\n"
            "assert not status and 'built for another torch' in status.reason, status\n"
            "assert snnkd_fast.lif_multistep(torch.ones(2, 3), backend='cpp').shape == (2, 3)\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
