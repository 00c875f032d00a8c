"""The reference itself: gradcheck in float64 of every mode, the surrogate table against the
derivatives of the primitives, and bit-exact spikes against SpikingJelly's own reference.

Why gradcheck looks at the membrane path: a spike is a Heaviside step, whose true derivative is zero
almost everywhere while the surrogate gradient is not, so finite differences cannot check the spike
output. With ``detach_reset=True`` the membrane output's surrogate-BPTT gradient *is* its true
derivative (away from the threshold), so gradcheck verifies the charge/reset recursion, v_init and
PLIF's w exactly; the surrogate part is verified separately against each primitive's derivative,
and the kernels are compared with this reference's autograd in every mode (test_lif_backends.py).
"""
import pytest
import torch

from snnkd_fast.lif.op import _make_config
from snnkd_fast.lif.params import NEURON_IF, NEURON_LIF, NEURON_PLIF
from snnkd_fast.lif.reference import neuron_multistep_reference
from snnkd_fast.lif.surrogates import SURROGATES, Surrogate, resolve_surrogate

from lif_helpers import NEURON_KINDS, neuron_call

KIND_IDS = {"if": NEURON_IF, "lif": NEURON_LIF, "plif": NEURON_PLIF}


@pytest.mark.parametrize("kind", NEURON_KINDS)
@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("v_reset", [0.0, -0.3, None], ids=["hard0", "hard-0.3", "soft"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_membrane_path(kind, decay_input, v_reset, backend):
    if kind == "if" and not decay_input:
        pytest.skip("IF has no decay")
    import snnkd_fast

    if not snnkd_fast.backends()[backend]:
        pytest.skip(snnkd_fast.backends()[backend].reason)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 3, 4, generator=g, dtype=torch.float64) * 1.5 + 0.4).requires_grad_(True)
    v_init = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=(kind == "plif"))

    def final_membrane(x, v_init, w):
        _, v = neuron_call(kind, x, v_init, w, tau=3.0, decay_input=decay_input, v_reset=v_reset, detach_reset=True,
                           backend=backend, return_v=True)
        return v

    assert torch.autograd.gradcheck(final_membrane, (x, v_init, w), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", SURROGATES, ids=lambda s: s.name)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_surrogate_derivative_is_the_primitive_derivative(spec, alpha):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    if spec.name == "piecewise_quadratic":  # its derivative has kinks at |x| = 1/alpha
        x = x[(x.abs() - 1 / alpha).abs() > 1e-3]
    x.requires_grad_(True)
    (autograd_derivative,) = torch.autograd.grad(spec.primitive(x, alpha).sum(), x)
    torch.testing.assert_close(spec.derivative(x.detach(), alpha), autograd_derivative, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", SURROGATES, ids=lambda s: s.name)
def test_surrogate_defaults_match_spikingjelly(spec):
    surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    sj_object = getattr(surrogate, spec.spikingjelly_class)()
    assert resolve_surrogate(sj_object) == (spec, sj_object.alpha)
    assert resolve_surrogate(spec.name) == (spec, spec.default_alpha)
    assert resolve_surrogate(Surrogate(spec.name, 0.7)) == (spec, 0.7)
    # Our derivative formula equals SpikingJelly's own backward.
    x = torch.linspace(-2, 2, 101, dtype=torch.float64, requires_grad=True)
    sj_object(x).sum().backward()
    torch.testing.assert_close(spec.derivative(x.detach(), sj_object.alpha), x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", NEURON_KINDS)
@pytest.mark.parametrize("v_reset", [0.0, None], ids=["hard", "soft"])
@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_spikes_match_spikingjelly_bit_for_bit(kind, v_reset, decay_input, dtype):
    sj_ops = pytest.importorskip("spikingjelly._ops")
    from spikingjelly._ops.if_ import reference as sj_if
    from spikingjelly._ops.lif import reference as sj_lif
    from spikingjelly._ops.plif import reference as sj_plif
    from spikingjelly.activation_based import surrogate

    del sj_ops
    g = torch.Generator().manual_seed(2)
    # Values on a coarse grid make many membranes land exactly on the threshold: the ">=" and the
    # rounding of the charge are both exercised.
    x = (torch.randint(-4, 9, (7, 64, 33), generator=g) / 4).to(dtype)
    v0 = torch.zeros(64, 33, dtype=dtype) + (0.0 if v_reset is None else v_reset)
    sg = surrogate.Sigmoid()
    tau = 3.0
    w = torch.tensor(0.4, dtype=dtype)
    if kind == "if":
        expected, v_expected, _ = sj_if.multi_step(x, v0, 1.0, v_reset, sg, False)
    elif kind == "lif":
        expected, v_expected, _ = sj_lif.multi_step(x, v0, tau, decay_input, 1.0, v_reset, sg, False)
    else:
        expected, v_expected, _ = sj_plif.multi_step(x, v0, w, decay_input, 1.0, v_reset, sg, False)
    cfg = _make_config("test", KIND_IDS[kind], tau, decay_input if kind != "if" else False, 1.0, v_reset, False,
                       "sigmoid", None)
    spikes, v = neuron_multistep_reference(x, v0, w, cfg)
    assert torch.equal(spikes, expected)
    assert torch.equal(v, v_expected)
