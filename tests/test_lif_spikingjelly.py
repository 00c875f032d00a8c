"""Parity with SpikingJelly 2.0's LIFNode / IFNode / ParametricLIFNode (its CPU path): identical
spikes bit for bit, gradients within tolerance, in both step modes, across calls and resets; and
replace_neurons on a small SpikingJelly conv net."""
import copy
import warnings

import pytest
import torch

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import functional, layer, surrogate  # noqa: E402

import snnkd_fast  # noqa: E402
from snnkd_fast import nn as snn  # noqa: E402
from snnkd_fast.compat.spikingjelly import replace_neurons  # noqa: E402

from conftest import device_for  # noqa: E402
from tolerances import assert_grad_close  # noqa: E402

SJ_SURROGATES = [surrogate.Sigmoid(), surrogate.ATan(alpha=3.0), surrogate.PiecewiseQuadratic(),
                 surrogate.PiecewiseExp(), surrogate.SoftSign(), surrogate.SuperSpike(), surrogate.Erf()]
BACKENDS = [b for b in ("cpp", "triton", "torch", "cuda") if snnkd_fast.backends()[b]]
# SpikingJelly runs on the CPU (its torch path: the semantics we match); ours on device_for(backend).
TRITON_ON_CUDA_TENSORS = True


def _pair(kind, backend, **kwargs):
    if kind == "lif":
        return sj_neuron.LIFNode(**kwargs), snn.LIFNode(backend=backend, **kwargs)
    if kind == "if":
        kwargs.pop("tau", None)
        kwargs.pop("decay_input", None)
        return sj_neuron.IFNode(**kwargs), snn.IFNode(backend=backend, **kwargs)
    tau = kwargs.pop("tau", 2.0)
    return (sj_neuron.ParametricLIFNode(init_tau=tau, **kwargs),
            snn.ParametricLIFNode(init_tau=tau, backend=backend, **kwargs))


def _drive(node, xs, step_mode):
    """Feed a list of input chunks (each [T, ...]) through a node, carrying its state; return the
    concatenated spikes."""
    outs = []
    for x in xs:
        if step_mode == "m":
            outs.append(node(x))
        else:
            outs.append(torch.stack([node(x_t) for x_t in x]))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lif", "if", "plif"])
@pytest.mark.parametrize("step_mode", ["m", "s"])
@pytest.mark.parametrize("v_reset, detach_reset, decay_input", [(0.0, False, True), (None, True, False),
                                                               (-0.2, True, True), (None, False, True)])
@pytest.mark.parametrize("sg", SJ_SURROGATES[:3], ids=lambda s: type(s).__name__)
def test_module_parity(backend, kind, step_mode, v_reset, detach_reset, decay_input, sg):
    sj, ours = _pair(kind, backend, tau=2.5, decay_input=decay_input, v_reset=v_reset, detach_reset=detach_reset,
                     surrogate_function=sg, step_mode=step_mode)
    device = device_for(backend)
    ours.to(device)
    x = (torch.randn(6, 4, 17) * 1.5 + 0.4)
    x_sj, x_ours = x.clone().requires_grad_(True), x.clone().to(device).requires_grad_(True)
    chunks = lambda t: [t[:2], t[2:]]  # noqa: E731  (two calls: the membrane must carry over)
    s_sj = _drive(sj, chunks(x_sj), step_mode)
    s_ours = _drive(ours, chunks(x_ours), step_mode)
    assert torch.equal(s_sj, s_ours.cpu())
    assert torch.equal(sj.v, ours.v.cpu())
    g = torch.randn_like(s_sj)
    (s_sj * g).sum().backward()
    (s_ours * g.to(device)).sum().backward()
    assert_grad_close(x_ours.grad.cpu(), x_sj.grad, torch.float32, "grad x")
    if kind == "plif":
        assert_grad_close(ours.w.grad.cpu(), sj.w.grad, torch.float32, "grad w")
    functional.reset_net(sj)
    ours.reset()
    assert sj.v == ours.v == (0.0 if v_reset is None else v_reset)


@pytest.mark.parametrize("sg", SJ_SURROGATES, ids=lambda s: type(s).__name__)
def test_every_surrogate_object_maps(sg):
    sj, ours = _pair("lif", "auto", tau=2.0, surrogate_function=sg, step_mode="m")
    x = (torch.randn(5, 33) + 0.5)
    x_sj, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    sj(x_sj).sum().backward()
    ours(x_ours).sum().backward()
    assert_grad_close(x_ours.grad, x_sj.grad, torch.float32, type(sg).__name__)


def _conv_snn():
    return torch.nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, step_mode="m"), layer.BatchNorm2d(8, step_mode="m"),
        sj_neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.Conv2d(8, 8, 3, padding=1, step_mode="m"),
        sj_neuron.ParametricLIFNode(init_tau=3.0, v_reset=None, step_mode="m"),
        layer.Flatten(step_mode="m"), layer.Linear(8 * 6 * 6, 10, step_mode="m"),
        sj_neuron.IFNode(detach_reset=True, step_mode="m"))


def test_replace_neurons_on_a_conv_net():
    torch.manual_seed(3)
    reference_net = _conv_snn()
    with torch.no_grad():  # a sparse spiking input needs a strong readout for the last layer to fire
        reference_net[3].weight.mul_(20)
        reference_net[6].weight.mul_(10)
    patched = copy.deepcopy(reference_net)
    plif_w = patched[4].w
    assert replace_neurons(patched) == 3
    assert isinstance(patched[2], snn.LIFNode) and isinstance(patched[4], snn.ParametricLIFNode)
    assert isinstance(patched[7], snn.IFNode)
    assert patched[4].w is plif_w, "the PLIF parameter object must survive (optimizers hold it)"
    x = torch.randn(4, 3, 2, 6, 6) * 3
    x_ref, x_new = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref, out_new = reference_net(x_ref), patched(x_new)
    assert out_ref.sum() > 0, "the test input must make the last layer spike"
    assert torch.equal(out_ref, out_new)
    out_ref.sum().backward()
    out_new.sum().backward()
    assert_grad_close(x_new.grad, x_ref.grad, torch.float32, "input grad")
    assert_grad_close(patched[0].weight.grad, reference_net[0].weight.grad, torch.float32, "conv weight grad")
    assert_grad_close(patched[4].w.grad, reference_net[4].w.grad, torch.float32, "PLIF w grad")


def test_replace_neurons_passes_recompute_h():
    net = _conv_snn()
    assert replace_neurons(net, recompute_h=False) == 3
    assert [m.recompute_h for m in net if isinstance(m, snn.neurons._MultiStepNeuron)] == [False] * 3
    with pytest.raises(TypeError, match="replace_neurons: recompute_h must be"):
        replace_neurons(_conv_snn(), recompute_h="no")


def test_replace_neurons_leaves_unsupported_nodes_with_a_warning():
    class CustomLIF(sj_neuron.LIFNode):
        pass

    net = torch.nn.Sequential(sj_neuron.LIFNode(store_v_seq=True), CustomLIF(),
                              sj_neuron.LIFNode(surrogate_function=surrogate.Rect()), sj_neuron.IFNode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert replace_neurons(net) == 1
    message = str(caught[0].message)
    assert "store_v_seq" in message and "CustomLIF" in message and "Rect" in message
    assert isinstance(net[3], snn.IFNode) and type(net[1]) is CustomLIF
