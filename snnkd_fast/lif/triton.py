"""Triton kernels of the multi-step IF / LIF / PLIF neurons (forward and backward) and their launchers.

One program owns BLOCK adjacent neurons for all T steps; the membrane stays in registers and each
timestep's row is one coalesced load/store. This file keeps its own copy of the per-element math of
``csrc/lif/lif_math.h`` (same formulas, same operation order); both are tested against
``snnkd_fast/lif/reference.py``. Runs on the CPU under ``TRITON_INTERPRET=1`` (how CI tests it).

Exactness: the LIF charge divides with ``div_rn`` (Triton's ``/`` on fp32 is an approximate
division on NVIDIA GPUs) and the launch disables FMA contraction, so H, and therefore every spike,
is bit-identical to the reference.

Only float32/float16/bfloat16 inputs (computed in float32): Triton passes Python floats to kernels
as float32, so a float64 path would round tau and v_threshold. float64 is served by "cpp"/"cuda"/"torch".
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._backends import triton_launch_options
from .params import NeuronConfig, broadcasts_v_init

BLOCK = 256


@triton.jit
def _charge(v, x, tau, decay, v_rest, NEURON: tl.constexpr, DECAY_INPUT: tl.constexpr):
    if NEURON == 0:  # IF
        h = v + x
    elif NEURON == 1:  # LIF
        if DECAY_INPUT:
            h = v + tl.math.div_rn(x - (v - v_rest), tau)
        else:
            h = (v - tl.math.div_rn(v - v_rest, tau)) + x
    else:  # PLIF
        if DECAY_INPUT:
            h = v + (x - (v - v_rest)) * decay
        else:
            h = (v - (v - v_rest) * decay) + x
    return h


@triton.jit
def _reset(h, spike, v_threshold, v_reset, SOFT_RESET: tl.constexpr):
    if SOFT_RESET:
        v = tl.where(spike, h - v_threshold, h)
    else:
        v = tl.where(spike, v_reset, h)
    return v


@triton.jit
def _reset_grad(h, sg, v_threshold, v_rest, SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr):
    """dV[t]/dH[t] through the reset, given the surrogate derivative sg at H[t]."""
    if SOFT_RESET:
        if DETACH_RESET:
            g = tl.full(h.shape, 1.0, tl.float32)
        else:
            g = 1.0 - v_threshold * sg
    else:
        g = tl.where(h >= v_threshold, 0.0, 1.0)
        if not DETACH_RESET:
            g += (v_rest - h) * sg
    return g


@triton.jit
def _surrogate_grad(x, alpha, KIND: tl.constexpr):
    if KIND == 0:  # sigmoid
        s = 1.0 / (1.0 + tl.exp(-alpha * x))
        g = (1.0 - s) * s * alpha
    elif KIND == 1:  # atan
        z = x * (1.5707963267948966 * alpha)
        g = (alpha / 2.0) / (1.0 + z * z)
    elif KIND == 2:  # piecewise_quadratic
        g = tl.maximum(alpha - alpha * alpha * tl.abs(x), 0.0)
    elif KIND == 3:  # piecewise_exp
        g = (alpha / 2.0) * tl.exp(-alpha * tl.abs(x))
    elif KIND == 4:  # soft_sign
        z = 1.0 / alpha + tl.abs(x)
        g = 1.0 / (2.0 * alpha * z * z)
    elif KIND == 5:  # super_spike
        z = 1.0 + tl.abs(x)
        g = alpha / (z * z)
    else:  # erf
        z = alpha * x
        g = (alpha * 0.5641895835477563) * tl.exp(-z * z)
    return g


@triton.jit
def _lif_forward_kernel(x_ptr, v_init_ptr, v_init_stride, decay_ptr, spikes_ptr, v_final_ptr, out_ptr, T, N,
                        tau, v_threshold, v_rest, alpha,
                        NEURON: tl.constexpr, DECAY_INPUT: tl.constexpr, SOFT_RESET: tl.constexpr,
                        DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr, RATE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """RATE = False: writes H [T, N] into out_ptr for the BPTT backward. RATE = True (rate-based
    backward): no H; the eligibility e = (1/T) sum_t sg[t] f[t] accumulates in registers and is
    written into out_ptr [N], with f[t] = dH[t]/dx for a constant input (see csrc/lif/lif_math.h).
    v_init_stride: 1 for one step of v_init, 0 for one value for every neuron."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.load(v_init_ptr + offs * v_init_stride, mask=mask, other=0.0)
    decay = 0.0
    if NEURON == 2:
        decay = tl.load(decay_ptr)
    if RATE:
        if NEURON == 0:
            leak = 0.0
        elif NEURON == 1:
            leak = 1.0 / tau
        else:
            leak = decay
        if DECAY_INPUT and NEURON != 0:
            gain = leak
        else:
            gain = 1.0
        f = tl.zeros([BLOCK], tl.float32) + gain
        e_sum = tl.zeros([BLOCK], tl.float32)
    # Pointers advance by one row per step (64-bit pointer arithmetic: T*N may exceed 2**31).
    x_ptrs, h_ptrs, spike_ptrs = x_ptr + offs, out_ptr + offs, spikes_ptr + offs
    for _ in range(T):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        h = _charge(v, x, tau, decay, v_rest, NEURON, DECAY_INPUT)
        spike = h >= v_threshold
        v = _reset(h, spike, v_threshold, v_rest, SOFT_RESET)
        if RATE:
            sg = _surrogate_grad(h - v_threshold, alpha, SURROGATE)
            e_sum += sg * f
            f = gain + (1.0 - leak) * f * _reset_grad(h, sg, v_threshold, v_rest, SOFT_RESET, DETACH_RESET)
        else:
            tl.store(h_ptrs, h, mask=mask)
        # via float32: the interpreter cannot cast a bool straight to bfloat16
        tl.store(spike_ptrs, tl.where(spike, 1.0, 0.0).to(spikes_ptr.dtype.element_ty), mask=mask)
        x_ptrs += N
        h_ptrs += N
        spike_ptrs += N
    tl.store(v_final_ptr + offs, v, mask=mask)
    if RATE:
        tl.store(out_ptr + offs, e_sum / T, mask=mask)


@triton.jit
def _lif_backward_kernel(grad_s_ptr, grad_v_ptr, h_ptr, v_init_ptr, v_init_stride, decay_ptr, grad_x_ptr,
                         grad_v_init_ptr, partials_ptr, T, N, last_row, tau, v_threshold, v_rest, alpha,
                         NEURON: tl.constexpr, DECAY_INPUT: tl.constexpr, SOFT_RESET: tl.constexpr,
                         DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr, HAS_GRAD_S: tl.constexpr,
                         HAS_GRAD_V: tl.constexpr, DECAY_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if HAS_GRAD_V:
        gv = tl.load(grad_v_ptr + offs, mask=mask, other=0.0)
    else:
        gv = tl.zeros([BLOCK], dtype=tl.float32)
    decay = 0.0
    if NEURON == 2:
        decay = tl.load(decay_ptr)
    # v_init_stride 0: one value for every neuron, which gets no gradient (nothing stored below)
    v0 = tl.load(v_init_ptr + offs * v_init_stride, mask=mask, other=0.0)
    decay_sum = tl.zeros([BLOCK], dtype=tl.float32)
    # Walk back from the last row (last_row = (T-1)*N, computed on the host in 64 bits). H[t-1] is
    # loaded one step ahead (V[t-1] for the PLIF decay gradient) and carried as the next step's H.
    h_ptrs, gs_ptrs, gx_ptrs = h_ptr + last_row + offs, grad_s_ptr + last_row + offs, grad_x_ptr + last_row + offs
    h = tl.load(h_ptrs, mask=mask, other=0.0)
    for i in range(T):
        t = T - 1 - i
        if HAS_GRAD_S:
            gs = tl.load(gs_ptrs, mask=mask, other=0.0).to(tl.float32)
        else:
            gs = tl.zeros([BLOCK], dtype=tl.float32)
        has_prev = tl.full([BLOCK], t, tl.int32) > 0
        h_prev = tl.load(h_ptrs - N, mask=mask & has_prev, other=0.0)
        sg = _surrogate_grad(h - v_threshold, alpha, SURROGATE)
        gh = gs * sg + gv * _reset_grad(h, sg, v_threshold, v_rest, SOFT_RESET, DETACH_RESET)
        if NEURON == 0:
            grad_x = gh
            gv = gh
        else:
            if NEURON == 1:
                decayed = gh / tau
            else:
                decayed = gh * decay
            if DECAY_INPUT:
                grad_x = decayed
            else:
                grad_x = gh
            gv = gh - decayed
        if DECAY_GRAD:
            v_prev = tl.where(has_prev, _reset(h_prev, h_prev >= v_threshold, v_threshold, v_rest, SOFT_RESET), v0)
            if DECAY_INPUT:
                dh_ddecay = (h - v_prev) / decay
            else:
                dh_ddecay = v_rest - v_prev
            decay_sum += gh * dh_ddecay
        tl.store(gx_ptrs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        h = h_prev
        h_ptrs -= N
        gs_ptrs -= N
        gx_ptrs -= N
    tl.store(grad_v_init_ptr + offs, gv, mask=mask & (offs * 0 + v_init_stride != 0))
    if DECAY_GRAD:
        # One partial per program, summed by the launcher in a fixed order: deterministic.
        tl.store(partials_ptr + tl.program_id(0), tl.sum(tl.where(mask, decay_sum, 0.0), axis=0))


# Warps per program of the compiled kernels (Triton's default), a module attribute like BLOCK so that
# benchmarks/tune_triton.py can sweep both on a GPU.
NUM_WARPS = 4


def _launch_options() -> dict:
    # No FMA contraction: it would round the PLIF charge differently from the reference.
    return triton_launch_options(enable_fp_fusion=False, num_warps=NUM_WARPS)


def _v_init_stride(v_init: torch.Tensor, N: int) -> int:
    """0 for a one-element v_init standing for every neuron (the kernels read the one value), else 1."""
    return 0 if broadcasts_v_init(v_init.numel(), N) else 1


def lif_forward(x: torch.Tensor, v_init: torch.Tensor, decay: Optional[torch.Tensor], cfg: NeuronConfig,
                rate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward over contiguous ``x`` ``[T, ...]`` from a contiguous float32 ``v_init`` (one step, or one
    value for every neuron, which the kernel reads as one value).
    Returns ``(spikes in x.dtype, v_final float32, h_seq float32)``, or with ``rate=True`` the
    eligibility (float32, one step's shape) in place of h_seq."""
    T = x.shape[0]
    N = x.numel() // T if T else 0
    spikes = torch.empty_like(x)
    out = torch.empty(x.shape[1:] if rate else x.shape, dtype=torch.float32, device=x.device)
    v_final = torch.empty(x.shape[1:], dtype=torch.float32, device=x.device)
    if x.numel() == 0:  # (a one-value v_init stands for every neuron of v_final)
        v_final.copy_(v_init.reshape(-1).expand(v_final.numel()).view(v_final.shape))
        if rate:
            out.zero_()
        return spikes, v_final, out
    grid = (triton.cdiv(N, BLOCK),)
    _lif_forward_kernel[grid](
        x, v_init, _v_init_stride(v_init, N), decay if decay is not None else v_init, spikes, v_final, out, T, N,
        float(cfg.tau), float(cfg.v_threshold), float(cfg.v_rest), float(cfg.alpha),
        NEURON=cfg.neuron, DECAY_INPUT=cfg.decay_input, SOFT_RESET=cfg.soft_reset, DETACH_RESET=cfg.detach_reset,
        SURROGATE=cfg.surrogate, RATE=rate, BLOCK=BLOCK, **_launch_options())
    return spikes, v_final, out


def lif_backward(grad_spikes: Optional[torch.Tensor], grad_v: Optional[torch.Tensor], h_seq: torch.Tensor,
                 v_init: torch.Tensor, decay: Optional[torch.Tensor], grad_dtype: torch.dtype, cfg: NeuronConfig,
                 decay_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward from (optional) contiguous gradients of spikes and v_final.
    Returns ``(grad_x in grad_dtype, grad_v_init float32, grad_decay 0-dim float32)``; grad_v_init is
    empty ([0]) for a one-element v_init broadcast to every neuron (it gets no gradient)."""
    T = h_seq.shape[0]
    N = h_seq.numel() // T if T else 0
    v_init_stride = _v_init_stride(v_init, N)
    broadcast = h_seq.numel() > 0 and v_init_stride == 0
    grad_x = torch.empty(h_seq.shape, dtype=grad_dtype, device=h_seq.device)
    grad_v_init = torch.empty((0,) if broadcast else h_seq.shape[1:], dtype=torch.float32, device=h_seq.device)
    grad_decay = torch.zeros((), dtype=torch.float32, device=h_seq.device)
    if h_seq.numel() == 0:
        grad_v_init.copy_(grad_v.view(grad_v_init.shape)) if grad_v is not None else grad_v_init.zero_()
        return grad_x, grad_v_init, grad_decay
    decay_grad = decay_grad and decay is not None
    grid = (triton.cdiv(N, BLOCK),)
    partials = torch.empty(grid[0] if decay_grad else 1, dtype=torch.float32, device=h_seq.device)
    _lif_backward_kernel[grid](
        grad_spikes if grad_spikes is not None else h_seq, grad_v if grad_v is not None else v_init, h_seq, v_init,
        v_init_stride, decay if decay is not None else v_init, grad_x,
        partials if broadcast else grad_v_init,  # a float32 stand-in: every store to it is masked off
        partials, T, N, (T - 1) * N,
        float(cfg.tau), float(cfg.v_threshold), float(cfg.v_rest), float(cfg.alpha),
        NEURON=cfg.neuron, DECAY_INPUT=cfg.decay_input, SOFT_RESET=cfg.soft_reset, DETACH_RESET=cfg.detach_reset,
        SURROGATE=cfg.surrogate, HAS_GRAD_S=grad_spikes is not None, HAS_GRAD_V=grad_v is not None,
        DECAY_GRAD=decay_grad, BLOCK=BLOCK, **_launch_options())
    if decay_grad:
        grad_decay = partials.sum()
    return grad_x, grad_v_init, grad_decay
