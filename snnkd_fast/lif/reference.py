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


def eligibility_reference(x_seq: torch.Tensor, v_init: torch.Tensor, w: Optional[torch.Tensor], cfg: NeuronConfig
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rate-based backpropagation's spike pass (Yu et al., NeurIPS 2024; code Tab-ct/rate-based-
    backpropagation, model/layer.py), without autograd: ``(spikes, v_final, e)`` with the
    eligibility ``e = (1/T) sum_t sg[t] f[t]``, where ``f[t] = dH[t]/dx`` for an input x held
    constant over time: ``f[0] = a`` and ``f[t+1] = a + (1 - leak) f[t] dV[t]/dH[t]`` (``a`` is the
    input's weight in H: 1/tau or sigmoid(w) with decay_input, else 1; ``leak`` is 1/tau,
    sigmoid(w), or 0 for IF; dV/dH is the reset's surrogate derivative, as in BPTT)."""
    with torch.no_grad():
        acc = compute_dtype(x_seq.dtype)
        if cfg.neuron == NEURON_IF:
            leak = torch.zeros((), dtype=acc, device=x_seq.device)
        elif cfg.neuron == NEURON_LIF:
            leak = 1 / torch.tensor(cfg.tau, dtype=acc, device=x_seq.device)
        else:
            leak = torch.sigmoid(w.to(acc))
        gain = leak if (cfg.decay_input and cfg.neuron != NEURON_IF) else torch.ones_like(leak)
        spikes, v_final = neuron_multistep_reference(x_seq, v_init, w, cfg)
        # Replay the membrane to get H[t] (the reference keeps no H): same arithmetic, so same spikes.
        v = v_init.to(acc).expand(x_seq.shape[1:])
        f = gain.expand(x_seq.shape[1:])
        e_sum = torch.zeros(x_seq.shape[1:], dtype=acc, device=x_seq.device)
        surrogate = SURROGATES[cfg.surrogate]
        for x, spike in zip(x_seq.to(acc).unbind(0), spikes.to(acc).unbind(0)):
            h = _charge_reference(v, x, leak, cfg)
            sg = surrogate.derivative(h - cfg.v_threshold, cfg.alpha)
            e_sum = e_sum + sg * f
            if cfg.soft_reset:
                dv_dh = torch.ones_like(h) if cfg.detach_reset else 1 - cfg.v_threshold * sg
                v = h - spike * cfg.v_threshold
            else:
                dv_dh = (1 - spike) + (0 if cfg.detach_reset else (cfg.v_reset - h) * sg)
                v = spike * cfg.v_reset + (1 - spike) * h
            f = gain + (1 - leak) * f * dv_dh
        return spikes, v_final, e_sum / x_seq.shape[0]


def _charge_reference(v, x, leak, cfg: NeuronConfig):
    if cfg.neuron == NEURON_IF:
        return v + x
    if cfg.neuron == NEURON_LIF:
        tau = torch.tensor(cfg.tau, dtype=v.dtype, device=v.device)
        return v + (x - (v - cfg.v_rest)) / tau if cfg.decay_input else v - (v - cfg.v_rest) / tau + x
    return v + (x - (v - cfg.v_rest)) * leak if cfg.decay_input else v - (v - cfg.v_rest) * leak + x


def neuron_multistep_rate_reference(x_seq: torch.Tensor, v_init: torch.Tensor, w: Optional[torch.Tensor],
                                    cfg: NeuronConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes whose backward is rate-based: ``dL/dx[t] = (1/T) e sum_t' dL/dS[t']``, written as the
    rate-based code's own trick ``S + (e * mean_t x) - (e * mean_t x).detach()``; v_final detached."""
    spikes, v_final, eligibility = eligibility_reference(x_seq, v_init, w, cfg)
    through_rate = eligibility * x_seq.to(eligibility.dtype).mean(0)
    return spikes + (through_rate - through_rate.detach()).to(spikes.dtype), v_final
