"""torch.library registration: opcheck on every neuron op, and torch.compile(fullgraph=True) of a
small conv SNN using our neurons gives the eager outputs and gradients."""
import pytest
import torch
from torch import nn

import snnkd_fast
from snnkd_fast import nn as snn

from conftest import device_for
from tolerances import assert_grad_close

# (forward, backward) op pairs: the "cuda" backend is lif_forward on CUDA tensors; the cpp backend
# runs the lean pair (H recomputed from x), lif_forward is its CPU kernel too; the lean pair's CUDA
# kernels are registered as well (not yet what the cuda backend runs).
OPS = {"cpp": ("lif_forward", "lif_backward"), "cpp_lean": ("lif_forward_lean", "lif_backward_from_x"),
       "cuda": ("lif_forward", "lif_backward"), "cuda_lean": ("lif_forward_lean", "lif_backward_from_x"),
       "triton": ("lif_forward_triton", "lif_backward_triton")}
VARIANTS = list(OPS)
# Every test builds its tensors on device_for(backend): on a GPU machine cuda and compiled triton run.
TRITON_ON_CUDA_TENSORS = True


def _sample_args(neuron: int, requires_grad: bool, device: str = "cpu", one_value: bool = False):
    x = (torch.randn(4, 3, 5) * 1.5 + 0.4).to(device).requires_grad_(requires_grad)
    # one_value: a one-element v_init, one value for every neuron (no gradient of its own)
    v_init = (torch.full((1,), 0.3, device=device) if one_value
              else torch.zeros(3, 5, device=device).requires_grad_(requires_grad))
    decay = torch.tensor(0.4, device=device).requires_grad_(requires_grad) if neuron == 2 else None
    # (x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate, alpha)
    return (x, v_init, decay, neuron, 2.0, True, 1.0, 0.0, False, False, 1, 2.0)


def _backend_of(variant: str) -> str:
    return variant.split("_")[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("neuron", [0, 1, 2], ids=["if", "lif", "plif"])
def test_opcheck(variant, neuron):
    backend = _backend_of(variant)
    status = snnkd_fast.backends()[backend]
    if not status:
        pytest.skip(status.reason)
    op = getattr(torch.ops.snnkd_fast, OPS[variant][0])
    for requires_grad in (False, True):
        for one_value in (False, True):
            torch.library.opcheck(op, _sample_args(neuron, requires_grad, device_for(backend), one_value))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("neuron", [1, 2], ids=["lif", "plif"])
def test_one_value_v_init_is_the_expanded_step(variant, neuron):
    """A one-element v_init (what lif_multistep passes for v_init None or a float) gives the outputs
    and gradients of that value expanded to a whole step -- PLIF's decay gradient, which reads V[-1],
    included -- with an empty grad_v_init; asking for its gradient is refused with a clear error."""
    backend = _backend_of(variant)
    status = snnkd_fast.backends()[backend]
    if not status:
        pytest.skip(status.reason)
    op = getattr(torch.ops.snnkd_fast, OPS[variant][0])
    device = device_for(backend)
    runs = []
    for one_value in (True, False):
        torch.manual_seed(0)  # the same x both times
        x, v_init, decay, *scalars = _sample_args(neuron, True, device, one_value=True)
        if not one_value:
            v_init = v_init.expand(3, 5).contiguous()
        spikes, v_final = op(x, v_init, decay, *scalars)[:2]
        ((spikes * torch.arange(5.0, device=device)).sum() + v_final.sum()).backward()
        runs.append((spikes, v_final, x.grad, None if decay is None else decay.grad))
    for one, expanded in zip(*runs):
        if one is not None:
            torch.testing.assert_close(one, expanded, rtol=0, atol=0)
    backward = getattr(torch.ops.snnkd_fast, OPS[variant][1])
    kept = x.detach() if variant.endswith("_lean") else op(x.detach(), torch.full((1,), 0.3, device=device), decay,
                                                        *scalars)[2]
    grads = backward(torch.ones_like(x), None, kept, torch.full((1,), 0.3, device=device),
                     None if decay is None else decay.detach(), x.dtype, *scalars, neuron == 2)
    assert grads[1].shape == (0,)
    with pytest.raises(ValueError, match="one-element v_init"):
        op(x, torch.full((1,), 0.3, device=device, requires_grad=True), decay, *scalars)


class TinyConvSNN(nn.Module):
    """[T, B, C, H, W] -> [T, B, 10] spikes, SpikingJelly-style multi-step layers."""

    def __init__(self, backend: str):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.lif = snn.LIFNode(tau=2.0, step_mode="m", backend=backend, surrogate_function="atan")
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.plif = snn.ParametricLIFNode(step_mode="m", backend=backend, v_reset=None)

    def forward(self, x):
        T, B = x.shape[:2]
        h = self.bn(self.conv(x.flatten(0, 1))).unflatten(0, (T, B))
        s = self.lif(h)
        out = self.plif(self.fc(s.flatten(2)) * 16)  # a strong readout: the last layer must fire
        self.lif.reset()
        self.plif.reset()
        return out


# triton only on a GPU: under the interpreter its launches are not what a compiled graph would run
COMPILE_BACKENDS = ["cpp", "torch", "cuda"] + (["triton"] if device_for("triton") == "cuda" else [])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend, compile_backend):
    if not snnkd_fast.backends()[backend]:
        pytest.skip(snnkd_fast.backends()[backend].reason)
    device = device_for(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = TinyConvSNN(backend).to(device)
    compiled_model = TinyConvSNN(backend).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compile_backend)
    x = (torch.randn(4, 3, 2, 4, 4) * 2).to(device)
    out_eager = eager(x)
    out_compiled = compiled(x)
    assert out_eager.sum() > 0
    assert torch.equal(out_eager, out_compiled)
    out_eager.sum().backward()
    out_compiled.sum().backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        assert_grad_close(p_compiled.grad, p_eager.grad, torch.float32, name)


def test_compile_model_and_kd_loss_without_graph_breaks():
    """A SpikingJelly-style conv SNN with our neurons and a fused KD loss against a teacher compiles
    into exactly one graph (a counting backend sees one frame, no graph break) and matches eager."""
    if not snnkd_fast.backends()["cpp"] or not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip("needs the cpp backends")
    from torch._dynamo.testing import CompileCounterWithBackend

    from snnkd_fast.losses import per_timestep_kl

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyConvSNN("cpp")
    teacher_logits = torch.randn(3, 10)

    def step(x):
        return per_timestep_kl(model(x) * 3, teacher_logits, temperature=2.0)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    x = torch.randn(4, 3, 2, 4, 4) * 2
    eager_loss = step(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled_loss, eager_loss)
    for g_c, g_e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)
