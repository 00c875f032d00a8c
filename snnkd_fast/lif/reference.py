"""Pure-PyTorch reference of the multi-step IF / LIF / PLIF neurons: the ground truth every kernel
is tested against. Readable on purpose: one Python loop over time, autograd does the backward.

Semantics are SpikingJelly 2.0's (``LIFNode``, ``IFNode``, ``ParametricLIFNode``, multi-step):

* charge: IF ``H = V + X``; LIF ``H = V + (X - (V - v_rest)) / tau`` (decay_input) or
  ``H = V - (V - v_rest) / tau + X``; PLIF the same with ``* sigmoid(w)`` in place of ``/ tau``;
  ``v_rest`` is ``v_reset``, or 0 with a soft reset;
* fire: ``S = Heaviside(H - v_threshold)`` with ``S = 1`` at equality; backward through the surrogate;
* reset: hard ``V = S * v_reset + (1 - S) * H``; soft ``V = H - S * v_threshold``; with
  ``detach_reset`` the spike in these formulas is detached.

Arithmetic is float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs; spikes come
back in the input's dtype, the final membrane in the compute dtype.

Rounding: ``tau`` and ``v_threshold`` enter as 0-dim tensors on the input's device so that the
division is a true IEEE division on every device (a CUDA tensor divided by a Python scalar is
computed as a multiply by its reciprocal, which rounds differently); the kernels divide the same way,
which is what makes their spikes bit-identical to this reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .params import NEURON_IF, NEURON_LIF, NeuronConfig
from .surrogates import SURROGATES


class SurrogateHeaviside(torch.autograd.Function):
    """``S = (x >= 0)`` forward; ``dS/dx = surrogate'(x)`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: int, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_spike * SURROGATES[ctx.surrogate].derivative(x, ctx.alpha), None, None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def neuron_multistep_reference(x_seq: torch.Tensor, v_init: torch.Tensor, w: Optional[torch.Tensor],
                               cfg: NeuronConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the neuron over ``x_seq`` ``[T, ...]`` from ``v_init`` (one step's shape, or broadcastable).

    ``w`` is the PLIF parameter (decay = sigmoid(w)); ignored for IF and LIF.
    Returns ``(spikes [T, ...] in x_seq's dtype, final membrane [...] in the compute dtype)``.
    """
    acc = compute_dtype(x_seq.dtype)
    as_tensor = lambda value: torch.tensor(value, dtype=acc, device=x_seq.device)  # noqa: E731
    tau, v_threshold = as_tensor(cfg.tau), as_tensor(cfg.v_threshold)
    v_rest = cfg.v_rest
    decay = torch.sigmoid(w.to(acc)) if (w is not None and cfg.neuron not in (NEURON_IF, NEURON_LIF)) else None
    v = v_init.to(acc).expand(x_seq.shape[1:])
    spikes = []
    for x in x_seq.to(acc).unbind(0):
        if cfg.neuron == NEURON_IF:
            h = v + x
        elif cfg.neuron == NEURON_LIF:
            h = v + (x - (v - v_rest)) / tau if cfg.decay_input else v - (v - v_rest) / tau + x
        else:
            h = v + (x - (v - v_rest)) * decay if cfg.decay_input else v - (v - v_rest) * decay + x
        spike = SurrogateHeaviside.apply(h - v_threshold, cfg.surrogate, cfg.alpha)
        spike_in_reset = spike.detach() if cfg.detach_reset else spike
        if cfg.soft_reset:
            v = h - spike_in_reset * v_threshold
        else:
            v = spike_in_reset * cfg.v_reset + (1.0 - spike_in_reset) * h
        spikes.append(spike)
    return torch.stack(spikes).to(x_seq.dtype), v
