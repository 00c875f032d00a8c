"""Triton kernels of CKDSNN's noise-smoothed logits distillation (NLD) and their launchers.

One program per row (a sample, or a (t, b) pair with per_timestep=True). The Gaussian noise eps is
never stored: it is drawn from Triton's counter-based Philox generator (``_nld_eps``: component c mod 4
of tl.randn4x(seed, row * ceil(C/4) + c // 4), the eps csrc/common/philox.h's nld_eps draws) in the
forward and drawn again, identically, in the backward. Passes over the row:
  1. mean and unbiased variance of z (Chan's chunk-combined Welford), LSE(z/tau), LSE(teacher/tau);
  2. LSE of the noise logits n/tau, n = mean + eps * scale (scale = variance, or noise_std);
  3. KL(p_t || p_s), log p_s = logaddexp(log w + log q, log(1 - w) + log r).
The backward needs four row sums first (A = p_t / p_s): sum q A, sum r A, sum r A eps, sum r eps,
then writes d/dz = -w tau q (A - sum q A) + 2/(C-1) (sum g eps) (z - mean), with
sum g eps = -(1 - w) tau (sum r A eps - sum r A * sum r eps) (the mean's own term vanishes: sum g = 0).
mode="additive" is the plain KL of softmax((z + noise_std eps)/tau).
Statistics per row [R, 6]: mean, scale, LSE(z/tau) (additive: of the noisy logits), LSE(n/tau), LSE(p_t), KL.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import NEG_BIG

NLD_NUM_STATS = 6


@triton.jit
def _row_pointers(s_ptr, u_ptr, r, B, s_st, s_sb, u_st, u_sb):
    t = r // B
    b = r % B
    return s_ptr + t.to(tl.int64) * s_st + b.to(tl.int64) * s_sb, u_ptr + t.to(tl.int64) * u_st + b.to(tl.int64) * u_sb


@triton.jit
def _nld_row_counter(r, C):
    """The counter of row r's first draw: r * ceil(C / 4) (philox.h's nld_row_counter)."""
    return r.to(tl.int64) * ((C + 3) // 4)


@triton.jit
def _nld_eps(seed, quad_base, c):
    """eps of classes c in the row whose draws start at counter quad_base = row * ceil(C / 4): four
    classes share one Philox draw (tl.randn4x: Box-Muller's cos and sin of both word pairs)."""
    n0, n1, n2, n3 = tl.randn4x(seed, quad_base + c // 4)
    k = c % 4
    return tl.where(k == 0, n0, tl.where(k == 1, n1, tl.where(k == 2, n2, n3)))


@triton.jit
def _nld_eps_tile(seed, quad_base, c0, BLOCK_C: tl.constexpr):
    """_nld_eps of the tile of classes c0 .. c0 + BLOCK_C - 1 (c0 a multiple of 4): one tl.randn4x per
    quad of classes, its four normals interleaved back into class order -- a quarter of the draws of
    one per class (the noise, not the memory, bounded these kernels)."""
    q = c0 // 4 + tl.arange(0, BLOCK_C // 4)
    n0, n1, n2, n3 = tl.randn4x(seed, quad_base + q)
    # join(join(n0, n2), join(n1, n3))[q, i, k] is n_{2i+k}: flattened, class 4q + 2i + k
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK_C])


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(tl.maximum(a, b), NEG_BIG)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _nld_forward_kernel(s_ptr, u_ptr, seed_ptr, rows_ptr, stats_ptr, B, C, s_st, s_sb, s_sc, u_st, u_sb, u_sc,
                        inv_tau, tau_sq, log_w, log_1mw, noise_std,
                        ADAPTIVE: tl.constexpr, ADDITIVE: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0)
    s_row, u_row = _row_pointers(s_ptr, u_ptr, r, B, s_st, s_sb, u_st, u_sb)
    seed = tl.load(seed_ptr)
    quad_base = _nld_row_counter(r, C)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    m_q = NEG_BIG
    l_q = 0.0
    m_p = NEG_BIG
    l_p = 0.0
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        z = tl.load(s_row + c.to(tl.int64) * s_sc, mask=cmask, other=0.0).to(tl.float32)
        zt = tl.load(u_row + c.to(tl.int64) * u_sc, mask=cmask, other=float("-inf")).to(tl.float32) * inv_tau
        n_chunk = tl.sum(cmask.to(tl.float32), axis=0)
        chunk_mean = tl.sum(z, axis=0) / n_chunk
        chunk_m2 = tl.sum(tl.where(cmask, (z - chunk_mean) * (z - chunk_mean), 0.0), axis=0)
        delta = chunk_mean - mean
        total = count + n_chunk
        mean += delta * n_chunk / total
        m2 += chunk_m2 + delta * delta * count * n_chunk / total
        count = total
        if ADDITIVE:
            x = (z + noise_std * _nld_eps_tile(seed, quad_base, c0, BLOCK_C)) * inv_tau
        else:
            x = z * inv_tau
        m_new = tl.maximum(m_q, tl.max(tl.where(cmask, x, NEG_BIG), axis=0))
        l_q = l_q * tl.exp(m_q - m_new) + tl.sum(tl.where(cmask, tl.exp(x - m_new), 0.0), axis=0)
        m_q = m_new
        m_new = tl.maximum(m_p, tl.max(tl.where(cmask, zt, NEG_BIG), axis=0))
        l_p = l_p * tl.exp(m_p - m_new) + tl.sum(tl.where(cmask, tl.exp(zt - m_new), 0.0), axis=0)
        m_p = m_new
    lse_q = m_q + tl.log(l_q)
    lse_p = m_p + tl.log(l_p)
    if ADAPTIVE:
        scale = tl.where(C > 1, m2 / tl.maximum(C - 1.0, 1.0), 0.0)
    else:
        scale = noise_std + 0.0 * mean
    lse_r = 0.0 * mean
    if not ADDITIVE:
        m_r = NEG_BIG
        l_r = 0.0
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            n = (mean + _nld_eps_tile(seed, quad_base, c0, BLOCK_C) * scale) * inv_tau
            m_new = tl.maximum(m_r, tl.max(tl.where(cmask, n, NEG_BIG), axis=0))
            l_r = l_r * tl.exp(m_r - m_new) + tl.sum(tl.where(cmask, tl.exp(n - m_new), 0.0), axis=0)
            m_r = m_new
        lse_r = m_r + tl.log(l_r)
    kl = 0.0
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        z = tl.load(s_row + c.to(tl.int64) * s_sc, mask=cmask, other=0.0).to(tl.float32)
        zt = tl.load(u_row + c.to(tl.int64) * u_sc, mask=cmask, other=float("-inf")).to(tl.float32) * inv_tau
        eps = _nld_eps_tile(seed, quad_base, c0, BLOCK_C)
        log_p = zt - lse_p
        if ADDITIVE:
            log_ps = (z + noise_std * eps) * inv_tau - lse_q
        else:
            log_ps = _logaddexp(log_w + z * inv_tau - lse_q, log_1mw + (mean + eps * scale) * inv_tau - lse_r)
        p = tl.where(cmask, tl.exp(log_p), 0.0)
        # p != 0 (not p > 0): a NaN p (NaN or +inf teacher logit) must make the row NaN, not drop out
        kl += tl.sum(tl.where(p != 0, p * (log_p - log_ps), 0.0), axis=0)
    tl.store(rows_ptr + r, tau_sq * kl)
    stat = stats_ptr + r * 6
    tl.store(stat + 0, mean)
    tl.store(stat + 1, scale)
    tl.store(stat + 2, lse_q)
    tl.store(stat + 3, lse_r)
    tl.store(stat + 4, lse_p)
    tl.store(stat + 5, kl)


@triton.jit
def _nld_backward_kernel(grow_ptr, s_ptr, u_ptr, seed_ptr, stats_ptr, gs_ptr, gu_ptr, T, B, C,
                         s_st, s_sb, s_sc, u_st, u_sb, u_sc, inv_tau, tau, w, log_w, log_1mw, noise_std,
                         ADAPTIVE: tl.constexpr, ADDITIVE: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                         TEACHER_PER_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per sample b, looping over its T rows, so that a [B, C] teacher's gradient is
    summed over t in place in its own output row (deterministic, no [T, B, C] buffer).
    grad_student [T, B, C] and grad_teacher ([T, B, C] or [B, C]) are contiguous."""
    b = tl.program_id(0)
    seed = tl.load(seed_ptr)
    var_coef = tl.where(C > 1, 2.0 / tl.maximum(C - 1.0, 1.0), 0.0)
    for t in range(T):
        r = t * B + b
        s_row, u_row = _row_pointers(s_ptr, u_ptr, r, B, s_st, s_sb, u_st, u_sb)
        noise_base = r.to(tl.int64) * C
        quad_base = _nld_row_counter(r, C)
        g_row = tl.load(grow_ptr + r)
        stat = stats_ptr + r * 6
        mean = tl.load(stat + 0)
        scale = tl.load(stat + 1)
        lse_q = tl.load(stat + 2)
        lse_r = tl.load(stat + 3)
        lse_p = tl.load(stat + 4)
        kl = tl.load(stat + 5)
        # The products with A = p_t / p_s are formed in the log domain with their weight folded in:
        # w q A <= p_t and (1 - w) r A <= p_t cannot overflow, whereas q * exp(log A) is 0 * inf = NaN
        # once q underflows and A overflows (float32: |logit / tau| differences of ~90).
        sum_wqa = 0.0
        sum_mra = 0.0
        sum_mrae = 0.0
        sum_re = 0.0
        if not ADDITIVE:
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cmask = c < C
                z = tl.load(s_row + c.to(tl.int64) * s_sc, mask=cmask, other=0.0).to(tl.float32)
                zt = tl.load(u_row + c.to(tl.int64) * u_sc, mask=cmask, other=float("-inf")).to(tl.float32)
                eps = _nld_eps_tile(seed, quad_base, c0, BLOCK_C)
                log_q = z * inv_tau - lse_q
                log_r = (mean + eps * scale) * inv_tau - lse_r
                log_a = zt * inv_tau - lse_p - _logaddexp(log_w + log_q, log_1mw + log_r)
                wqa = tl.where(cmask, tl.exp(log_w + log_q + log_a), 0.0)
                mra = tl.where(cmask, tl.exp(log_1mw + log_r + log_a), 0.0)
                rr = tl.where(cmask, tl.exp(log_r), 0.0)
                sum_wqa += tl.sum(wqa, axis=0)
                sum_mra += tl.sum(mra, axis=0)
                sum_mrae += tl.sum(mra * eps, axis=0)
                sum_re += tl.sum(rr * eps, axis=0)
        sum_g_eps = -tau * (sum_mrae - sum_mra * sum_re)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            z = tl.load(s_row + c.to(tl.int64) * s_sc, mask=cmask, other=0.0).to(tl.float32)
            zt = tl.load(u_row + c.to(tl.int64) * u_sc, mask=cmask, other=float("-inf")).to(tl.float32)
            eps = _nld_eps_tile(seed, quad_base, c0, BLOCK_C)
            log_p = zt * inv_tau - lse_p
            p = tl.where(cmask, tl.exp(log_p), 0.0)
            if ADDITIVE:
                log_ps = (z + noise_std * eps) * inv_tau - lse_q
                g_s = tau * (tl.exp(log_ps) - p)
            else:
                log_q = z * inv_tau - lse_q
                log_ps = _logaddexp(log_w + log_q, log_1mw + (mean + eps * scale) * inv_tau - lse_r)
                # -w tau q (A - sum q A), as -tau (w q A - q sum w q A)
                g_s = -tau * (tl.exp(log_w + log_q + log_p - log_ps) - tl.exp(log_q) * sum_wqa)
                if ADAPTIVE:
                    g_s += var_coef * sum_g_eps * (z - mean)
            tl.store(gs_ptr + noise_base + c, (g_s * g_row).to(gs_ptr.dtype.element_ty), mask=cmask)
            if TEACHER_GRAD:
                g_u = tau * g_row * tl.where(p > 0, p * (log_p - log_ps - kl), 0.0)
                if TEACHER_PER_T:
                    tl.store(gu_ptr + noise_base + c, g_u.to(gu_ptr.dtype.element_ty), mask=cmask)
                else:
                    gu_ptrs = gu_ptr + b.to(tl.int64) * C + c
                    if t > 0:
                        g_u += tl.load(gu_ptrs, mask=cmask, other=0.0).to(tl.float32)
                    tl.store(gu_ptrs, g_u.to(gu_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _noise_kernel(seed_ptr, out_ptr, N, C, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    eps = _nld_eps(tl.load(seed_ptr), _nld_row_counter(offs // C, C), offs % C)
    tl.store(out_ptr + offs, eps, mask=offs < N)


def _weights(noise_weight: float) -> tuple[float, float, float]:
    import math

    w = 1.0 - noise_weight
    return w, (math.log(w) if w > 0 else float("-inf")), (math.log(noise_weight) if noise_weight > 0 else float("-inf"))


def _rows_view(student: torch.Tensor, teacher: torch.Tensor):
    """student [T, B, C]; teacher [B, C] (broadcast over t, stride 0) or [T, B, C]."""
    u_st = teacher.stride(0) if teacher.dim() == 3 else 0
    return (*student.stride(), u_st, teacher.stride(-2), teacher.stride(-1))


def _block_c(C: int) -> int:
    return max(16, min(triton.next_power_of_2(C), 2048))


def nld_rows_forward(student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive):
    T, B, C = student.shape
    rows = torch.empty(T, B, dtype=torch.float32, device=student.device)
    stats = torch.empty(T, B, NLD_NUM_STATS, dtype=torch.float32, device=student.device)
    if rows.numel() == 0:
        return rows, stats
    w, log_w, log_1mw = _weights(noise_weight)
    _nld_forward_kernel[(T * B,)](student, teacher, seed, rows, stats, B, C, *_rows_view(student, teacher),
                                  1.0 / temperature, temperature * temperature, log_w, log_1mw, float(noise_std),
                                  ADAPTIVE=adaptive, ADDITIVE=additive, BLOCK_C=_block_c(C))
    return rows, stats


def nld_rows_backward(grad_rows, student, teacher, seed, stats, temperature, noise_weight, noise_std, adaptive,
                      additive, teacher_grad):
    T, B, C = student.shape
    grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    # A [B, C] teacher's gradient accumulates over t in float32 (cast to its dtype by the caller).
    grad_teacher = torch.empty(teacher.shape, dtype=torch.float32, device=student.device) if teacher_grad else None
    if grad_student.numel() == 0:
        if grad_teacher is not None:
            grad_teacher.zero_()
        return grad_student, grad_teacher
    w, log_w, log_1mw = _weights(noise_weight)
    _nld_backward_kernel[(B,)](grad_rows.contiguous(), student, teacher, seed, stats, grad_student,
                               grad_teacher if grad_teacher is not None else grad_student, T, B, C,
                               *_rows_view(student, teacher), 1.0 / temperature, temperature, w, log_w, log_1mw,
                               float(noise_std), ADAPTIVE=adaptive, ADDITIVE=additive,
                               TEACHER_GRAD=teacher_grad, TEACHER_PER_T=teacher.dim() == 3, BLOCK_C=_block_c(C))
    return grad_student, grad_teacher.to(teacher.dtype) if grad_teacher is not None else None


def draw_noise(seed: torch.Tensor, shape) -> torch.Tensor:
    """The eps the NLD kernels draw for ``seed`` into rows of C = ``shape[-1]`` classes (the flattened
    [rows, C] noise)."""
    out = torch.empty(shape, dtype=torch.float32, device=seed.device)
    if out.numel():
        C = shape[-1] if len(shape) else 1
        _noise_kernel[(triton.cdiv(out.numel(), 1024),)](seed, out, out.numel(), C, BLOCK=1024)
    return out
