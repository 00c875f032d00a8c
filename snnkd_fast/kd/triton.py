"""Triton kernels of the fused KD losses (per-timestep KL, TSER, HTA-KL) and their launchers.

One program owns one sample b: it streams the student rows z_s[t, b, :] for all T (a [BLOCK_T,
BLOCK_C] tile at a time) against the teacher row, keeps online log-sum-exp statistics per row in
registers and writes only per-row results: the loss [T, B] and a few statistics [T, B, NUM_STATS]
for the backward. No [T, B, C] probability tensor is ever written; inputs are read in place through
their strides (an expanded teacher costs nothing). The backward re-reads the logits, rebuilds p and
q from the saved statistics, writes the student gradient and accumulates the teacher gradient over
t in registers (one program per sample: deterministic, no atomics).

Per row (s = z_s / tau, u = z_t / tau, p = softmax(u), q = softmax(s)):
  KL(p||q) = sum p (u - s) - LSE(u) + LSE(s)      sum p (u - s) accumulated online, rescaled with max(u)
  KL(q||p) = sum q (s - u) - LSE(s) + LSE(u)      (HTA)
  H(q_H)   = LSE(s_H) - sum q_H s_H               (TSER, s_H = z_s / tau_H)
Terms with a zero probability are dropped (xlogy semantics), so -inf logits (masked classes) are
exact. A +inf or NaN logit gives a NaN loss (documented policy).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .._backends import triton_launch_options
from .params import HTA_NUM, LOSS_HTA, LOSS_TSER, NUM_STATS

# A finite stand-in for -inf as the initial running maximum: exp(-inf - NEG_BIG) = 0 and
# exp(NEG_BIG - NEG_BIG) = 1, so masked lanes and all -inf chunks need no special case.
# tl.constexpr: compiled kernels may read module globals only as constexprs (the interpreter reads any).
NEG_BIG = tl.constexpr(-1.0e38)
INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _float_key(x):
    """Order-preserving int32 image of float32 values; x + 0.0 folds -0.0 into +0.0 so that equal
    logits tie (the tie is then broken by class index)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _hta_teacher_kernel(u_ptr, keys_ptr, B, C, u_st, u_sb, u_sc, inv_tau, threshold_hi, threshold_lo,
                        BLOCK_C: tl.constexpr, SEARCH_BLOCK: tl.constexpr, WALK_BLOCK: tl.constexpr,
                        NUM_CANDIDATES: tl.constexpr):
    """Per teacher row: the class where the sorted inclusive cumulative probability first reaches
    the head threshold (threshold_hi + threshold_lo: a double as two floats, scalar kernel arguments
    being float32) as (key, index), and the top-1 class, found by a threshold search on the
    order-preserving keys (16 candidate keys per read of the row; no sort, works for any C, one row
    per program).

    Precision: the masses are of e = exp(u - max u) in float32 against threshold * sum(e), the sum
    and every mass carried between reads in float64 -- as the cpp kernel's p = e / l, where
    p = exp(u - lse) would carry lse's float32 rounding (|lse| ~ 11 at C = 64,000: ~5e-7 relative)
    into every p alike (the tests found the head 1-2 tied classes off the float64 order at
    C = 64,000 that way, and thresholds 1e-7 from a cumulative sum on the wrong side at C = 4,000).
    Within a read each column of the [16, SEARCH_BLOCK] tile still sums its C / SEARCH_BLOCK values
    in float32 (in float64 it would take 16 more registers per thread, or a cross-warp reduction per
    chunk); the columns are summed in float64."""
    row = tl.program_id(0)
    base = u_ptr + (row // B).to(tl.int64) * u_st + (row % B).to(tl.int64) * u_sb
    # pass 1: max and sum of exp(u - max) (float64), extreme keys, top-1 (lowest index among equal maxima)
    m = NEG_BIG
    zero64 = tl.full((), 0.0, tl.float64)
    l = zero64
    key_max = INT32_MIN
    key_min = 2147483647
    top = 0
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        z = tl.load(base + c.to(tl.int64) * u_sc, mask=cmask, other=float("-inf")).to(tl.float32)
        u = z * inv_tau
        m_new = tl.maximum(m, tl.max(tl.where(cmask, u, NEG_BIG), axis=0))
        l = l * tl.exp(m - m_new).to(tl.float64) + tl.sum(tl.where(cmask, tl.exp(u - m_new), 0.0), axis=0).to(tl.float64)
        m = m_new
        key = _float_key(z)
        chunk_max = tl.max(tl.where(cmask, key, INT32_MIN), axis=0)
        chunk_top = tl.min(tl.where(cmask & (key == chunk_max), c, C), axis=0)
        top = tl.where(chunk_max > key_max, chunk_top, top)  # strict: earlier chunks keep ties
        key_max = tl.maximum(key_max, chunk_max)
        key_min = tl.minimum(key_min, tl.min(tl.where(cmask, key, 2147483647), axis=0))
    threshold_mass = (zero64 + threshold_hi + threshold_lo) * l  # float64 from the first add on
    # Threshold search: the largest key k with mass(key >= k) reaches the threshold is the crossing
    # class's key. Invariant: mass(key >= lo) reaches the threshold, mass(key >= hi) does not. Each
    # pass over the row tests NUM_CANDIDATES keys splitting [lo, hi) evenly, so the 2^32-wide key
    # range shrinks 17-fold per pass: 8 passes reach width 1 (9 for margin), where bisection needed
    # 33 reads of the row. mass(key >= hi) is carried from pass to pass (a candidate's mass of the
    # pass before), so a pass sums only the classes inside [candidates[0], hi) and the tied-class
    # walk below starts from it. The per-candidate masses accumulate in a [NUM_CANDIDATES,
    # SEARCH_BLOCK] register tile reduced once per pass, not once per chunk: the loop body is
    # independent loads, compares and adds, with no cross-warp reduction (and its barriers) per
    # chunk. Skipping a chunk with no class inside the interval (as the CUDA kernel does per class)
    # takes such a reduction to decide: measured on an H200 (benchmarks/GPU_NOTES.md, session 18)
    # that made the head 1.3x slower (4x256x32000: 0.355 -> 0.465 ms), so every chunk takes its
    # exps and compares. Candidates are clamped into [lo, hi - 1] (testing any key in the interval
    # keeps the invariant), which also keeps them, and the compares, in int32.
    lo = key_min.to(tl.int64)
    hi = key_max.to(tl.int64) + 1
    above = zero64  # mass(key >= hi)
    for _ in range(9):
        step = (hi - lo + NUM_CANDIDATES) // (NUM_CANDIDATES + 1)  # ceil((hi - lo) / 17) >= 1
        candidates = tl.minimum(lo + step * (1 + tl.arange(0, NUM_CANDIDATES)).to(tl.int64), hi - 1)
        candidates32 = candidates.to(tl.int32)
        lowest = tl.min(candidates32, axis=0)
        top_key = (hi - 1).to(tl.int32)  # <= key_max
        mass_tile = tl.zeros([NUM_CANDIDATES, SEARCH_BLOCK], dtype=tl.float32)
        for c0 in range(0, C, SEARCH_BLOCK):
            c = c0 + tl.arange(0, SEARCH_BLOCK)
            cmask = c < C
            z = tl.load(base + c.to(tl.int64) * u_sc, mask=cmask, other=float("-inf")).to(tl.float32)
            key = _float_key(z)
            inside = cmask & (key >= lowest) & (key <= top_key)
            e = tl.where(inside, tl.exp(z * inv_tau - m), 0.0)
            mass_tile += tl.where(key[None, :] >= candidates32[:, None], e[None, :], 0.0)
        mass = above + tl.sum(mass_tile.to(tl.float64), axis=1)
        reached = mass >= threshold_mass  # true for a prefix of the candidates (mass falls with the key)
        lo = tl.maximum(lo, tl.max(tl.where(reached, candidates, lo), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(reached, hi, candidates), axis=0))
        # the new hi's mass: the largest of the candidates' that fall short (each >= above)
        above = tl.max(tl.where(reached, above, mass), axis=0)
    key_cross = lo.to(tl.int32)
    # among classes tied at the crossing key, walk in index order until the cumulative mass reaches
    # it, from mass(key > key_cross): the carried mass above the converged interval [lo, lo + 1)
    # WALK_BLOCK classes at a time (<= 1024): its scan is in float64, which over BLOCK_C = 4096
    # classes took the kernel to 146-154 registers (ptxas, sm_90; 64-89 with 1,024).
    running = above
    idx_cross = C
    for c0 in range(0, C, WALK_BLOCK):
        c = c0 + tl.arange(0, WALK_BLOCK)
        cmask = c < C
        z = tl.load(base + c.to(tl.int64) * u_sc, mask=cmask, other=float("-inf")).to(tl.float32)
        tied = cmask & (_float_key(z) == key_cross)
        if tl.max(tied.to(tl.int32), axis=0) > 0:
            e_tied = tl.where(tied, tl.exp(z * inv_tau - m), 0.0)
            cumulative = running + tl.cumsum(e_tied.to(tl.float64), axis=0)
            hit = tl.min(tl.where(tied & (cumulative >= threshold_mass), c, C), axis=0)
            idx_cross = tl.minimum(idx_cross, hit)
            running += tl.sum(e_tied.to(tl.float64), axis=0)
    # The whole mass below the threshold (head_threshold ~ 1 and rounding): every class is head.
    total_reached = running >= threshold_mass
    key_cross = tl.where(total_reached | (idx_cross < C), key_cross, INT32_MIN)
    tl.store(keys_ptr + row * 3 + 0, key_cross)
    tl.store(keys_ptr + row * 3 + 1, idx_cross)
    tl.store(keys_ptr + row * 3 + 2, top)


@triton.jit
def _load_tile(ptr, t, c, st, sc, mask):
    return tl.load(ptr + t[:, None].to(tl.int64) * st + c[None, :].to(tl.int64) * sc, mask=mask,
                   other=float("-inf")).to(tl.float32)


@triton.jit
def _hta_head(z_u, c, key_cross, idx_cross, idx_top):
    key = _float_key(z_u)
    return (key > key_cross[:, None]) | ((key == key_cross[:, None]) & (c[None, :] < idx_cross[:, None])) | (
        c[None, :] == idx_top[:, None])


@triton.jit
def _kd_forward_kernel(s_ptr, u_ptr, keys_ptr, rows_ptr, stats_ptr, T, B, C,
                       s_st, s_sb, s_sc, u_st, u_sb, u_sc,
                       inv_tau, inv_tau_h, tau_sq, entropy_weight,
                       LOSS: tl.constexpr, TEACHER_PER_T: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (B, programs over t): program (b, j) takes sample b's timestep tiles j, j + n, ... (rows are
    independent; more programs than samples fill a GPU when B is small)."""
    b = tl.program_id(0)
    s_base = s_ptr + b.to(tl.int64) * s_sb
    u_base = u_ptr + b.to(tl.int64) * u_sb
    for t0 in range(tl.program_id(1) * BLOCK_T, T, BLOCK_T * tl.num_programs(1)):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < T
        m_s = tl.full([BLOCK_T], NEG_BIG, tl.float32)
        l_s = tl.zeros([BLOCK_T], tl.float32)
        m_u = tl.full([BLOCK_T], NEG_BIG, tl.float32)
        l_u = tl.zeros([BLOCK_T], tl.float32)
        pu_diff = tl.zeros([BLOCK_T], tl.float32)   # sum e^(u - m_u) (u - s)
        qs_diff = tl.zeros([BLOCK_T], tl.float32)   # sum e^(s - m_s) (s - u)          (HTA)
        m_h = tl.full([BLOCK_T], NEG_BIG, tl.float32)
        l_h = tl.zeros([BLOCK_T], tl.float32)
        qh_s = tl.zeros([BLOCK_T], tl.float32)      # sum e^(s_H - m_h) s_H            (TSER)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = tmask[:, None] & (c < C)[None, :]
            z_s = _load_tile(s_base, t, c, s_st, s_sc, mask)
            s = z_s * inv_tau
            u = _load_tile(u_base, t, c, u_st, u_sc, mask) * inv_tau
            m_u_new = tl.maximum(m_u, tl.max(tl.where(mask, u, NEG_BIG), axis=1))
            scale_u = tl.exp(m_u - m_u_new)
            e_u = tl.where(mask, tl.exp(u - m_u_new[:, None]), 0.0)
            l_u = l_u * scale_u + tl.sum(e_u, axis=1)
            pu_diff = pu_diff * scale_u + tl.sum(tl.where(e_u > 0, e_u * (u - s), 0.0), axis=1)
            m_u = m_u_new
            m_s_new = tl.maximum(m_s, tl.max(tl.where(mask, s, NEG_BIG), axis=1))
            scale_s = tl.exp(m_s - m_s_new)
            e_s = tl.where(mask, tl.exp(s - m_s_new[:, None]), 0.0)
            l_s = l_s * scale_s + tl.sum(e_s, axis=1)
            if LOSS == 2:
                qs_diff = qs_diff * scale_s + tl.sum(tl.where(e_s > 0, e_s * (s - u), 0.0), axis=1)
            m_s = m_s_new
            if LOSS == 1:
                s_h = z_s * inv_tau_h
                m_h_new = tl.maximum(m_h, tl.max(tl.where(mask, s_h, NEG_BIG), axis=1))
                scale_h = tl.exp(m_h - m_h_new)
                e_h = tl.where(mask, tl.exp(s_h - m_h_new[:, None]), 0.0)
                l_h = l_h * scale_h + tl.sum(e_h, axis=1)
                qh_s = qh_s * scale_h + tl.sum(tl.where(e_h > 0, e_h * s_h, 0.0), axis=1)
                m_h = m_h_new
        lse_s = m_s + tl.log(l_s)
        lse_u = m_u + tl.log(l_u)
        kl_f = pu_diff / l_u - lse_u + lse_s
        aux0 = tl.zeros([BLOCK_T], tl.float32)
        aux1 = tl.zeros([BLOCK_T], tl.float32)
        if LOSS == 0:
            loss = tau_sq * kl_f
        elif LOSS == 1:
            lse_h = m_h + tl.log(l_h)
            entropy = lse_h - qh_s / l_h
            loss = tau_sq * kl_f - entropy_weight * entropy
            aux0 = lse_h
            aux1 = entropy
        else:
            kl_r = qs_diff / l_s - lse_s + lse_u
            # head/tail gaps need the normalised q: a second pass over the row
            if TEACHER_PER_T:
                krow = (t * B + b) * 3
            else:
                krow = b * 3 + t * 0
            key_cross = tl.load(keys_ptr + krow + 0, mask=tmask, other=0)
            idx_cross = tl.load(keys_ptr + krow + 1, mask=tmask, other=0)
            idx_top = tl.load(keys_ptr + krow + 2, mask=tmask, other=0)
            gap_head = tl.zeros([BLOCK_T], tl.float32)
            gap_all = tl.zeros([BLOCK_T], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                mask = tmask[:, None] & (c < C)[None, :]
                s = _load_tile(s_base, t, c, s_st, s_sc, mask) * inv_tau
                z_u = _load_tile(u_base, t, c, u_st, u_sc, mask)
                gap = tl.where(mask, tl.abs(tl.exp(z_u * inv_tau - lse_u[:, None]) - tl.exp(s - lse_s[:, None])), 0.0)
                gap_all += tl.sum(gap, axis=1)
                gap_head += tl.sum(tl.where(_hta_head(z_u, c, key_cross, idx_cross, idx_top), gap, 0.0), axis=1)
            w_head = tl.where(gap_all > 0, gap_head / gap_all, 0.5)
            loss = tau_sq * (w_head * kl_f + (1.0 - w_head) * kl_r)
            aux0 = w_head
            aux1 = kl_r
        row = t * B + b
        tl.store(rows_ptr + row, loss, mask=tmask)
        stat = stats_ptr + row * 5
        tl.store(stat + 0, lse_s, mask=tmask)
        tl.store(stat + 1, lse_u, mask=tmask)
        tl.store(stat + 2, kl_f, mask=tmask)
        tl.store(stat + 3, aux0, mask=tmask)
        tl.store(stat + 4, aux1, mask=tmask)


@triton.jit
def _kd_backward_kernel(s_ptr, u_ptr, keys_ptr, stats_ptr, grow_ptr, gs_ptr, gu_ptr, T, B, C,
                        s_st, s_sb, s_sc, u_st, u_sb, u_sc,
                        inv_tau, inv_tau_h, tau, entropy_weight,
                        LOSS: tl.constexpr, TEACHER_PER_T: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_student [T, B, C] and grad_teacher ([B, C] summed over t, or [T, B, C]) contiguous. Grid (B,
    programs over C): program (b, j) takes sample b's class chunks j, j + n, ..., every timestep of
    each (so the teacher gradient's sum over t stays inside one program: no atomics)."""
    b = tl.program_id(0)
    s_base = s_ptr + b.to(tl.int64) * s_sb
    u_base = u_ptr + b.to(tl.int64) * u_sb
    for c0 in range(tl.program_id(1) * BLOCK_C, C, BLOCK_C * tl.num_programs(1)):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        gu_sum = tl.zeros([BLOCK_C], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tmask = t < T
            mask = tmask[:, None] & cmask[None, :]
            row = t * B + b
            stat = stats_ptr + row * 5
            lse_s = tl.load(stat + 0, mask=tmask, other=0.0)
            lse_u = tl.load(stat + 1, mask=tmask, other=0.0)
            kl_f = tl.load(stat + 2, mask=tmask, other=0.0)
            aux0 = tl.load(stat + 3, mask=tmask, other=0.0)
            aux1 = tl.load(stat + 4, mask=tmask, other=0.0)
            g_row = tl.load(grow_ptr + row, mask=tmask, other=0.0)
            z_s = _load_tile(s_base, t, c, s_st, s_sc, mask)
            z_u = _load_tile(u_base, t, c, u_st, u_sc, mask)
            log_q = z_s * inv_tau - lse_s[:, None]
            log_p = z_u * inv_tau - lse_u[:, None]
            q = tl.where(mask, tl.exp(log_q), 0.0)
            p = tl.where(mask, tl.exp(log_p), 0.0)
            if LOSS == 2:
                w_head = aux0[:, None]
                kl_r = aux1[:, None]
                g_s = w_head * (q - p) + (1.0 - w_head) * tl.where(q > 0, q * (log_q - log_p - kl_r), 0.0)
            else:
                g_s = q - p
            g_s = g_s * tau
            if LOSS == 1:
                log_qh = z_s * inv_tau_h - aux0[:, None]
                q_h = tl.where(mask, tl.exp(log_qh), 0.0)
                g_s += (entropy_weight * inv_tau_h) * tl.where(q_h > 0, q_h * (log_qh + aux1[:, None]), 0.0)
            g_s = g_s * g_row[:, None]
            gs_offs = t[:, None].to(tl.int64) * B * C + b.to(tl.int64) * C + c[None, :]
            tl.store(gs_ptr + gs_offs, g_s.to(gs_ptr.dtype.element_ty), mask=mask)
            if TEACHER_GRAD:
                g_u = tl.where(p > 0, p * (log_p - log_q - kl_f[:, None]), 0.0)
                if LOSS == 2:
                    g_u = w_head * g_u + (1.0 - w_head) * (p - q)
                g_u = g_u * (tau * g_row[:, None])
                if TEACHER_PER_T:
                    tl.store(gu_ptr + gs_offs, g_u.to(gu_ptr.dtype.element_ty), mask=mask)
                else:
                    gu_sum += tl.sum(tl.where(mask, g_u, 0.0), axis=0)
        if TEACHER_GRAD and not TEACHER_PER_T:
            tl.store(gu_ptr + b.to(tl.int64) * C + c, gu_sum.to(gu_ptr.dtype.element_ty), mask=cmask)


# Launch shapes of the compiled kernels, module attributes so that benchmarks/tune_triton.py can sweep
# them on a GPU. The row kernels run one program per sample (B programs: few for a GPU when B is
# small) over a <= 4096-element tile: Triton's default 4 warps, as measured on the H100 so far.
# The HTA teacher kernel runs one program per teacher row with a [16, HTA_SEARCH_BLOCK] mass tile
# (16 registers per thread at 8 warps); 8 warps is not yet timed against 4 or 16.
KD_ROW_WARPS = 4
# Timesteps per tile at most (the tile holds <= 4096 elements; forward programs: B * cdiv(T, KD_BLOCK_T))
# and whether the backward runs one program per (sample, class chunk) instead of one per sample.
# The backward split changes no result (each chunk's arithmetic and its sum over t are the same) and
# multiplies its programs by C / chunk: 256 programs for [4, 256, 32000] become 8,000.
KD_BLOCK_T = 16
KD_BWD_SPLIT_C = True
# Forward programs wanted per SM at least: the tile height is halved (down to one timestep) until
# B * cdiv(T, BLOCK_T) reaches this many per SM. The H100 grid (4b3fab5) ran B = 64 samples at
# C = 128,000 as 64 programs on 132 SMs: the forward streamed at 10% of the HBM peak where the CUDA
# kernel (a block per row) reached 45%. 0 turns the rule off (tune_triton.py sweeps it).
KD_MIN_PROGRAMS_PER_SM = 4
HTA_TEACHER_WARPS = 8
HTA_SEARCH_BLOCK = 256
HTA_WALK_BLOCK = 1024  # the tied-class walk's chunk (its float64 scan's registers)


def _blocks(T: int, C: int, block_t: int = 0) -> tuple[int, int]:
    """Tile [BLOCK_T, BLOCK_C]: all timesteps of a sample at once when T is small (or ``block_t``),
    <= 4096 elements."""
    block_t = block_t or min(triton.next_power_of_2(T), KD_BLOCK_T)
    block_c = max(16, min(triton.next_power_of_2(C), 4096 // block_t))
    return block_t, block_c


def forward_block_t(T: int, B: int, sm_count: int) -> int:
    """The forward's tile height: at most KD_BLOCK_T timesteps, fewer while that leaves fewer than
    KD_MIN_PROGRAMS_PER_SM programs per SM (``sm_count`` 0: the interpreter, no rule)."""
    block_t = min(triton.next_power_of_2(T), KD_BLOCK_T)
    wanted = KD_MIN_PROGRAMS_PER_SM * sm_count
    while block_t > 1 and B * triton.cdiv(T, block_t) < wanted:
        block_t //= 2
    return block_t


_SM_COUNTS: dict[int, int] = {}


def _as_two_floats(value: float) -> tuple[float, float]:
    """value as hi + lo, each exactly a float32 (Triton passes Python floats as float32 scalars):
    hi + lo is value to ~2^-48 relative, which a kernel adds up in float64."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _teacher_view(teacher: torch.Tensor, T: int) -> tuple[torch.Tensor, bool, int]:
    """(the teacher as [Tt, B, C], whether it varies with t, its t stride (0 when broadcast))."""
    if teacher.dim() == 2:
        return teacher.unsqueeze(0), False, 0
    return teacher, True, teacher.stride(0)


def kd_rows_forward(student: torch.Tensor, teacher: torch.Tensor, loss: int, temperature: float,
                    entropy_temperature: float, entropy_weight: float, head_threshold: float):
    """student [T, B, C], teacher [B, C] or [T, B, C] (any strides) -> (rows [T, B], stats
    [T, B, NUM_STATS], hta_keys [Tt, B, 3] int32 (empty unless HTA)), all float32 except keys."""
    T, B, C = student.shape
    teacher3, per_t, u_st = _teacher_view(teacher, T)
    device = student.device
    rows = torch.empty(T, B, dtype=torch.float32, device=device)
    stats = torch.empty(T, B, NUM_STATS, dtype=torch.float32, device=device)
    keys = torch.empty((teacher3.shape[0], B, HTA_NUM) if loss == LOSS_HTA else (0, B, HTA_NUM), dtype=torch.int32,
                       device=device)
    if rows.numel() == 0:
        return rows, stats, keys
    block_t, block_c = _blocks(T, C, forward_block_t(T, B, _sm_count(device)))
    if loss == LOSS_HTA:
        _hta_teacher_kernel[(teacher3.shape[0] * B,)](
            teacher3, keys, B, C, u_st, teacher3.stride(1), teacher3.stride(2), 1.0 / temperature,
            *_as_two_floats(float(head_threshold)), BLOCK_C=max(16, min(triton.next_power_of_2(C), 4096)),
            SEARCH_BLOCK=max(16, min(triton.next_power_of_2(C), HTA_SEARCH_BLOCK)),
            WALK_BLOCK=max(16, min(triton.next_power_of_2(C), HTA_WALK_BLOCK)), NUM_CANDIDATES=16,
            **triton_launch_options(num_warps=HTA_TEACHER_WARPS))
    _kd_forward_kernel[(B, triton.cdiv(T, block_t))](
        student, teacher3, keys, rows, stats, T, B, C, *student.stride(), u_st, teacher3.stride(1),
        teacher3.stride(2), 1.0 / temperature, 1.0 / entropy_temperature, temperature * temperature,
        float(entropy_weight), LOSS=loss, TEACHER_PER_T=per_t, BLOCK_T=block_t, BLOCK_C=block_c,
        **triton_launch_options(num_warps=KD_ROW_WARPS))
    return rows, stats, keys


def kd_rows_backward(grad_rows: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, stats: torch.Tensor,
                     keys: torch.Tensor, loss: int, temperature: float, entropy_temperature: float,
                     entropy_weight: float, teacher_grad: bool):
    """-> (grad_student like student (contiguous), grad_teacher like teacher (contiguous) or None)."""
    T, B, C = student.shape
    teacher3, per_t, u_st = _teacher_view(teacher, T)
    grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    grad_teacher = torch.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device) if teacher_grad else None
    if grad_student.numel() == 0:
        if grad_teacher is not None:
            grad_teacher.zero_()
        return grad_student, grad_teacher
    block_t, block_c = _blocks(T, C)
    _kd_backward_kernel[(B, triton.cdiv(C, block_c) if KD_BWD_SPLIT_C else 1)](
        student, teacher3, keys, stats, grad_rows.contiguous(), grad_student,
        grad_teacher if grad_teacher is not None else grad_student, T, B, C, *student.stride(), u_st,
        teacher3.stride(1), teacher3.stride(2), 1.0 / temperature, 1.0 / entropy_temperature, temperature,
        float(entropy_weight), LOSS=loss, TEACHER_PER_T=per_t, TEACHER_GRAD=teacher_grad,
        BLOCK_T=block_t, BLOCK_C=block_c, **triton_launch_options(num_warps=KD_ROW_WARPS))
    return grad_student, grad_teacher
