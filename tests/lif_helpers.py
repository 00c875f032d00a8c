"""Helpers for the neuron tests: run one neuron kind through the public API and collect outputs and
gradients, so every test compares the same things between a kernel and the reference."""
from dataclasses import dataclass
from typing import Optional

import torch

import snnkd_fast

from tolerances import compute_dtype

NEURON_KINDS = ("if", "lif", "plif")


@dataclass
class NeuronRun:
    spikes: torch.Tensor
    v_final: torch.Tensor
    grad_x: Optional[torch.Tensor]
    grad_v_init: Optional[torch.Tensor]
    grad_w: Optional[torch.Tensor]


def neuron_call(kind: str, x, v_init=None, w=None, **kwargs):
    """Call the public op for ``kind`` ("if", "lif", "plif"); ``kwargs`` are its keyword arguments."""
    if kind == "if":
        kwargs.pop("tau", None)
        kwargs.pop("decay_input", None)
        return snnkd_fast.if_multistep(x, v_init, **kwargs)
    if kind == "lif":
        return snnkd_fast.lif_multistep(x, v_init, **kwargs)
    kwargs.pop("tau", None)
    return snnkd_fast.plif_multistep(x, w, v_init, **kwargs)


def make_inputs(shape, dtype=torch.float32, device="cpu", scale=1.5, shift=0.4, seed=0):
    """Inputs that make a good share of neurons spike, plus upstream gradients for spikes and v."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
    v_init = torch.randn(shape[1:], generator=g, dtype=torch.float64) * 0.5
    grad_spikes = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    grad_v = torch.randn(shape[1:], generator=g, dtype=torch.float64)
    w = torch.tensor(0.3, dtype=torch.float64)
    return [t.to(device) for t in (x, v_init, grad_spikes, grad_v, w)]


def run_neuron(kind: str, x, v_init, w, grad_spikes, grad_v, backend: str, **kwargs) -> NeuronRun:
    """Forward + backward of ``sum(spikes * grad_spikes) + sum(v_final * grad_v)``."""
    acc = compute_dtype(x.dtype)
    x = x.detach().clone().requires_grad_(True)
    v_init = None if v_init is None else v_init.detach().to(acc).clone().requires_grad_(True)
    w = None if w is None else w.detach().to(acc).clone().requires_grad_(kind == "plif")
    spikes, v_final = neuron_call(kind, x, v_init, w, backend=backend, return_v=True, **kwargs)
    loss = (spikes.to(acc) * grad_spikes.to(acc)).sum() + (v_final * grad_v.to(v_final.dtype)).sum()
    loss.backward()
    return NeuronRun(spikes.detach(), v_final.detach(), x.grad, None if v_init is None else v_init.grad,
                     None if w is None else w.grad)
