"""Rate-based backward (backward="rate", Yu et al. NeurIPS 2024): every kernel against its reference,
the eligibility against its definition (the BPTT surrogate gradient of the firing rate for a constant
input), O(N) saved memory, and the gradient direction against BPTT on a tiny network."""
import pytest
import torch
from torch import nn

import snnkd_fast
from snnkd_fast import nn as snn
from snnkd_fast.lif.op import _make_config
from snnkd_fast.lif.params import NEURON_IF, NEURON_LIF, NEURON_PLIF
from snnkd_fast.lif.reference import eligibility_reference, neuron_multistep_reference

from conftest import device_for
from lif_helpers import neuron_call
from tolerances import assert_grad_close

MODES = [  # (kind, decay_input, v_reset, detach_reset, surrogate)
    ("lif", True, 0.0, False, "sigmoid"), ("lif", False, None, True, "atan"), ("lif", True, -0.2, True, "erf"),
    ("if", True, 0.0, False, "piecewise_quadratic"), ("if", True, None, False, "soft_sign"),
    ("plif", True, None, False, "super_spike"), ("plif", False, 0.0, False, "piecewise_exp"),
]
KINDS = {"if": NEURON_IF, "lif": NEURON_LIF, "plif": NEURON_PLIF}


def _inputs(shape=(6, 3, 37), device="cpu"):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g) * 1.5 + 0.4).to(device)
    grad = torch.randn(shape, generator=g).to(device)
    return x, grad


@pytest.mark.parametrize("kind, decay_input, v_reset, detach_reset, surrogate", MODES)
def test_kernels_match_rate_reference(kernel_target, kind, decay_input, v_reset, detach_reset, surrogate):
    backend, device = kernel_target
    x, grad = _inputs(device=device)
    w = torch.tensor(0.3, device=device)  # PLIF: a fixed time constant (rate mode gives w no gradient)
    kwargs = dict(tau=3.0, decay_input=decay_input, v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate,
                  backward="rate")
    results = []
    for b in (backend, "torch"):
        xx = x.clone().requires_grad_(True)
        spikes, v = neuron_call(kind, xx, None, w, backend=b, return_v=True, **kwargs)
        (spikes * grad).sum().backward()
        assert not v.requires_grad, "the final membrane carries no gradient in rate mode"
        results.append((spikes.detach(), xx.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][0].sum() > 0
    assert_grad_close(results[0][1], results[1][1], torch.float32, "rate-based grad x")
    # every timestep gets the same gradient
    assert torch.allclose(results[0][1], results[0][1][:1].expand_as(results[0][1]))


@pytest.mark.parametrize("kind, decay_input, v_reset, detach_reset, surrogate", MODES)
def test_eligibility_is_the_rate_gradient_for_a_constant_input(kind, decay_input, v_reset, detach_reset, surrogate):
    """For x[t] = x_bar at every t, e is exactly d(mean_t S)/d x_bar under the surrogate (BPTT)."""
    T, N = 7, 50
    x_bar = (torch.randn(N, dtype=torch.float64) * 0.8 + 0.6).requires_grad_(True)
    w = torch.tensor(0.2, dtype=torch.float64)
    cfg = _make_config("test", KINDS[kind], 3.0, decay_input if kind != "if" else False, 1.0, v_reset, detach_reset,
                       surrogate, None)
    v0 = torch.full((N,), cfg.v_rest, dtype=torch.float64)
    spikes, _ = neuron_multistep_reference(x_bar.expand(T, N), v0, w, cfg)
    (bptt_grad,) = torch.autograd.grad(spikes.mean(0).sum(), x_bar)
    _, _, eligibility = eligibility_reference(x_bar.detach().expand(T, N), v0, w, cfg)
    torch.testing.assert_close(eligibility, bptt_grad, rtol=1e-12, atol=1e-14)


def test_eligibility_outputs_of_every_backend_agree(kernel_target):
    backend, device = kernel_target
    x, _ = _inputs(device=device)
    op = "lif_rate_forward_triton" if backend == "triton" else "lif_rate_forward"
    if not hasattr(torch.ops.snnkd_fast, op):
        pytest.skip(f"{op} is not built")
    cfg = _make_config("test", NEURON_LIF, 2.0, True, 1.0, 0.0, False, "sigmoid", None)
    v0 = torch.zeros(x.shape[1:], device=device)
    _, _, e_kernel = getattr(torch.ops.snnkd_fast, op)(x, v0, None, *cfg.op_args())
    _, _, e_ref = eligibility_reference(x, v0, None, cfg)
    torch.testing.assert_close(e_kernel, e_ref.float(), rtol=1e-5, atol=1e-6)


def test_rate_mode_saves_one_step_only(kernel_target):
    backend, device = kernel_target
    T, N = 8, 64
    x = torch.randn(T, N, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        snnkd_fast.lif_multistep(x, backend=backend, backward="rate")
    assert saved and all(t.numel() <= N for t in saved), [tuple(t.shape) for t in saved]


def test_plif_weight_with_grad_is_refused():
    w = torch.tensor(0.0, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient for PLIF's w"):
        snnkd_fast.plif_multistep(torch.randn(3, 4), w, backward="rate")
    with pytest.raises(ValueError, match="backward="):
        snnkd_fast.lif_multistep(torch.randn(3, 4), backward="exact")


@pytest.mark.cuda_tensors
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_opcheck_rate_ops(backend):
    status = snnkd_fast.backends()[backend]
    if not status:
        pytest.skip(status.reason)
    device = device_for(backend)
    op = torch.ops.snnkd_fast.lif_rate_forward_triton if backend == "triton" else torch.ops.snnkd_fast.lif_rate_forward
    x = (torch.randn(4, 3, 5) + 0.5).to(device).requires_grad_(True)
    torch.library.opcheck(op, (x, torch.zeros(3, 5, device=device), None, 1, 2.0, True, 1.0, 0.0, False, False, 0,
                               4.0))


class TinySNN(nn.Module):
    def __init__(self, backward: str):
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.lif1 = snn.LIFNode(tau=2.0, step_mode="m", backward=backward, detach_reset=True, v_reset=None)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x_seq):
        out = self.fc2(self.lif1(self.fc1(x_seq)))
        self.lif1.reset()
        return out.mean(0)


@pytest.mark.parametrize("encoding, min_cosine", [("direct", 0.999999), ("noisy", 0.5)])
def test_gradient_direction_against_bptt(encoding, min_cosine):
    """Cosine similarity of the rate-based and BPTT weight gradients (reported with -s). With direct
    encoding (the same input at every t), one soft-reset detached layer and a time-averaged linear
    readout, the rate-based gradient is exactly BPTT's; with input noise over time it is an
    approximation that still points the same way."""
    torch.manual_seed(0)
    bptt, rate = TinySNN("bptt"), TinySNN("rate")
    rate.load_state_dict(bptt.state_dict())
    x = torch.randn(32, 20).unsqueeze(0).expand(6, 32, 20) * 2
    if encoding == "noisy":
        x = x + torch.randn(6, 32, 20) * 2
    y = torch.randint(0, 10, (32,))
    for model in (bptt, rate):
        nn.functional.cross_entropy(model(x), y).backward()
    cosines = {name: nn.functional.cosine_similarity(p_b.grad.flatten(), p_r.grad.flatten(), dim=0).item()
               for (name, p_b), p_r in zip(bptt.named_parameters(), rate.parameters())}
    print(f"\ncosine(rate, bptt), {encoding} input:", {k: round(v, 4) for k, v in cosines.items()})
    assert cosines["fc2.weight"] > 0.999999  # above the neurons both modes compute the same gradient
    assert cosines["fc1.weight"] > min_cosine, cosines
