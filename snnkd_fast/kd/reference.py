"""Pure-PyTorch reference of the knowledge-distillation losses: the ground truth every fused KD kernel
is tested against. Readable on purpose: whole ``[T, B, C]`` tensors are materialized and autograd
does the backward (the closed-form gradients the kernels implement are checked against it in
tests/test_kd_reference.py).

Specification: the project's shared/methods.md, section "KD losses" (TSER, HTA-KL, CKDSNN/NLD). Notation per
row (one ``(t, b)`` pair): ``s = z_s / tau``, ``u = z_t / tau``, student ``q = softmax(s)``, teacher
``p = softmax(u)``. Every KL term carries the Hinton scaling ``tau**2``.

* ``kd_kl``: ``tau^2 KL(p || q)`` on the time-averaged logits ``mean_t z[t]`` (student and, if it is
  ``[T, B, C]``, teacher) -- Hinton KD for SNNs.
* ``per_timestep_kl``: ``(1/T) sum_t tau^2 KL(p_t || q_t)``; a ``[B, C]`` teacher is reused at every t.
* ``tser_loss`` (Yu et al., CVPR 2025; only the Fig. 1 caption is the paper's, the rest is the spec's
  reconstruction): per row ``tau^2 KL(p || q_t) - lambda H(softmax(z_s[t] / tau_H))`` -- the student's
  entropy is *maximized* (a confidence penalty), ``tau_H`` defaults to ``tau``, no ``tau^2`` on H.
* ``hta_kl`` (Zhang et al., IJCNN 2025, via AKL arXiv 2404.02657): head/tail split of the classes
  by the teacher's sorted cumulative probability, detached gap-based weights, and
  ``tau^2 (w_head KL(p || q) + w_tail KL(q || p))`` with both KLs over all classes.
* ``nld_loss`` (CKDSNN, Liu et al., AAAI 2026; definition from the released code SinoLeu/CKDSNN
  ``utils/utils.py: soft_loss_smooth``): ``tau^2 KL(p_t || p_s)`` with the student distribution a
  mixture of ``softmax(z / tau)`` and the softmax of per-row noise logits ``mu + eps * var``.

Reductions (one helper, :func:`reduce_rows`): a loss is ``(1/T) sum_t L_t`` where ``L_t`` reduces the
batch -- "sum" sums rows, "batchmean" divides that by B, "mean" by ``B * C`` (``torch.nn.KLDivLoss``'s
elementwise mean), "none" returns the per-row losses ``[T, B]`` (``[B]`` for the losses on
time-averaged logits, where T = 1).

Numerics: arithmetic in float32 for float16/bfloat16/float32 inputs, float64 if any input is
float64; the loss is returned in that dtype. Probabilities are never logged: every log-probability
comes from ``log_softmax``, and every ``a * (log a - log b)`` term uses xlogy semantics (``a = 0``
contributes exactly 0, and its gradient too), so logits of +-1e4 or -inf (a masked class) give finite,
correct losses and gradients. NLD is the exception for -inf: a row's mean and variance of the logits
are then undefined, so NLD needs finite logits. Losses are compared with the kernels within
tests/tolerances.py, not bit for bit, so ``/ tau`` is a plain Python-float division here.

Gradients flow to the student and to the teacher (data-free KD trains through the teacher); only the
HTA mask and HTA weights are detached, as the spec says.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .params import HTA_THRESHOLD_MARGIN

REDUCTIONS = ("none", "sum", "batchmean", "mean")


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _time_mean(logits: torch.Tensor) -> torch.Tensor:
    """``mean_t z[t]`` of ``[T, B, C]`` logits; ``[B, C]`` logits are already one distribution per row."""
    return logits.mean(0) if logits.dim() == 3 else logits


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b) = sum_k a_k (log a_k - log b_k)`` over the last dim, with ``a_k = 0`` contributing 0.

    The difference is zeroed *before* the product (not the product afterwards): where ``a_k = 0`` the
    difference can be -inf or nan (both classes masked), and ``torch.where`` on the product would still
    send ``0 * nan`` into the backward. Broadcasts ``[B, C]`` against ``[T, B, C]``.
    """
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=log_a.device))
    return (a * diff).sum(-1)


def reduction_divisor(reduction: str, num_steps: int, batch: int, num_classes: int) -> int:
    """What :func:`reduce_rows` divides the sum of ``num_steps x batch`` per-row losses by: T for
    "sum", T*B for "batchmean", T*B*C for "mean"; 0 for "none" (no reduction). The C++ eager ops
    (snnkd_fast::kd_loss, nld_loss) take it as their ``divisor`` and reduce the same way."""
    if reduction == "none":
        return 0
    per_step = {"sum": 1, "batchmean": batch, "mean": batch * num_classes}.get(reduction)
    if per_step is None:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return num_steps * per_step


def reduce_rows(rows: torch.Tensor, reduction: str, num_classes: int) -> torch.Tensor:
    """Reduce per-row losses ``[T, B]`` (or ``[B]``, T = 1) as ``(1/T) sum_t L_t``.

    "sum": ``L_t = sum_b l_tb``; "batchmean": ``/ B``; "mean": ``/ (B * C)`` (KLDivLoss's elementwise
    mean, C = ``num_classes``); "none": ``rows`` unchanged (no 1/T).
    """
    divisor = reduction_divisor(reduction, rows.shape[0] if rows.dim() == 2 else 1, rows.shape[-1], num_classes)
    if divisor == 0:
        return rows
    # one division by the exact integer count (a sum and a division, forward and backward: the
    # reduction runs on every call of every loss, so its op count is part of their overhead); for
    # "batchmean" the count is every row: one mean, which is that sum and division in one op (one
    # autograd node less: 6-8 us of a small loss's ~150 us fwd+bwd on a CPU)
    if divisor == rows.numel() and divisor != 1:
        return rows.mean()
    return rows.sum() / divisor if divisor != 1 else rows.sum()


def student_entropy_reference(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row entropy ``H(softmax(logits / temperature)) = -sum_k q_k log q_k`` (``q_k = 0`` adds 0).

    Shape ``[..., C] -> [...]``, in the accumulation dtype. ``dH/ds = -q (log q + H)``.
    """
    log_q = F.log_softmax(logits.to(acc_dtype(logits)) / temperature, dim=-1)
    q = log_q.exp()
    # Zero log q where q = 0 before the product, for the same reason as in _kl_rows.
    return -(q * torch.where(q > 0, log_q, torch.zeros((), dtype=q.dtype, device=q.device))).sum(-1)


def kd_kl_reference(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
                    reduction: str = "batchmean") -> torch.Tensor:
    """Hinton KD: ``tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))`` per row ``b``.

    ``student`` / ``teacher`` are ``[B, C]`` or ``[T, B, C]``; a ``[T, B, C]`` input is averaged over
    time first (logits, not probabilities: an SNN's readout is the mean membrane/spike count).
    """
    acc = acc_dtype(student, teacher)
    s = _time_mean(student.to(acc)) / temperature
    u = _time_mean(teacher.to(acc)) / temperature
    rows = temperature ** 2 * _kl_rows(F.log_softmax(u, dim=-1), F.log_softmax(s, dim=-1))
    return reduce_rows(rows, reduction, s.shape[-1])


def _per_timestep_kl_rows(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 KL(p || q_t)`` per row ``[T, B]``; a ``[B, C]`` teacher broadcasts over t (its
    ``log_softmax`` is computed once per sample, as the kernels do)."""
    log_q = F.log_softmax(z_s / temperature, dim=-1)
    log_p = F.log_softmax(z_t / temperature, dim=-1)
    return temperature ** 2 * _kl_rows(log_p, log_q)


def per_timestep_kl_reference(student_seq: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
                              reduction: str = "batchmean") -> torch.Tensor:
    """``(1/T) sum_t tau^2 KL(p || q_t)`` with ``student_seq`` ``[T, B, C]``, teacher ``[B, C]`` or ``[T, B, C]``."""
    acc = acc_dtype(student_seq, teacher)
    rows = _per_timestep_kl_rows(student_seq.to(acc), teacher.to(acc), temperature)
    return reduce_rows(rows, reduction, student_seq.shape[-1])


def tser_loss_reference(student_seq: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
                        entropy_weight: float = 0.1, entropy_temperature: Optional[float] = None,
                        reduction: str = "batchmean") -> torch.Tensor:
    """TSER: per row ``tau^2 KL(p || q_t) - lambda H(softmax(z_s[t] / tau_H))``, ``tau_H`` =
    ``entropy_temperature`` or ``tau``.

    The minus sign maximizes the student's entropy (methods.md: a confidence penalty steering away
    from the teacher's over-confident errors); lambda is not multiplied by ``tau^2``. Reconstructed
    from the paper's Fig. 1 caption; the paper's exact formula may differ.
    """
    acc = acc_dtype(student_seq, teacher)
    z_s = student_seq.to(acc)
    entropy_temperature = temperature if entropy_temperature is None else entropy_temperature
    rows = _per_timestep_kl_rows(z_s, teacher.to(acc), temperature)
    rows = rows - entropy_weight * student_entropy_reference(z_s, entropy_temperature)
    return reduce_rows(rows, reduction, student_seq.shape[-1])


def hta_head_mask_reference(teacher_probs: torch.Tensor, head_threshold: float) -> torch.Tensor:
    """HTA head mask ``bool [..., C]`` in *class* order.

    Classes sorted by p descending, ties by the lower class index first (a stable sort keeps equal
    values in index order); ``S`` = inclusive cumulative sum in that order. Head =
    ``S < mu - HTA_THRESHOLD_MARGIN`` ([ours]: 2^-20, so that a sum equal to mu in exact arithmetic,
    as on a flat teacher row, is tail whatever the rounding; see snnkd_fast/kd/params.py) plus the
    top-1 class always (otherwise a confident teacher, ``p_max >= mu``, has an empty head); the class
    whose cumsum crosses is tail. The mask is built in sorted order and scattered back to class
    order -- applying the sorted-order mask to class-order tensors (SakanaAI/TAID ``adaptive_kl.py``)
    is the bug this avoids.
    """
    sorted_p, order = torch.sort(teacher_probs.detach(), dim=-1, descending=True, stable=True)
    head_sorted = sorted_p.cumsum(-1) < head_threshold - HTA_THRESHOLD_MARGIN
    head_sorted[..., 0] = True
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)


def hta_weights_reference(teacher_probs: torch.Tensor, student_probs: torch.Tensor,
                          head_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached HTA weights ``(w_head, w_tail)`` per row.

    ``g_head = sum_head |p - q|``, ``g_tail = sum_tail |p - q|``, ``w_head = g_head / (g_head + g_tail)``,
    ``w_tail = 1 - w_head``; ½ each where ``g_head + g_tail = 0`` (p == q: AKL's 0/0; the loss is 0
    there anyway). No gradient flows through them (AKL detaches q here).
    """
    gap = (teacher_probs - student_probs).detach().abs()
    zero = torch.zeros((), dtype=gap.dtype, device=gap.device)
    g_head = torch.where(head_mask, gap, zero).sum(-1)
    g_tail = torch.where(head_mask, zero, gap).sum(-1)
    total = g_head + g_tail
    nonzero = total > 0
    # The inner where keeps 0/0 out of the division (detached, so only for tidiness of the values).
    w_head = torch.where(nonzero, g_head / torch.where(nonzero, total, torch.ones_like(total)), 0.5)
    return w_head, 1.0 - w_head


def hta_kl_reference(student_seq: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
                     head_threshold: float = 0.5, time_reduction: str = "per_timestep",
                     reduction: str = "batchmean") -> torch.Tensor:
    """HTA-KL: per row ``tau^2 (w_head KL(p || q) + w_tail KL(q || p))``, both KLs over all classes.

    The head mask comes from the teacher (:func:`hta_head_mask_reference`), the weights from the
    head/tail gaps (:func:`hta_weights_reference`); both are detached.
    ``time_reduction="per_timestep"`` (default): one row per ``(t, b)``, a ``[B, C]`` teacher's p and
    mask shared by every t. ``"mean_logits"``: once on the time-averaged student logits (and the
    time-averaged teacher logits if it is ``[T, B, C]``), T = 1 in the reduction, "none" gives ``[B]``.
    """
    acc = acc_dtype(student_seq, teacher)
    z_s, z_t = student_seq.to(acc), teacher.to(acc)
    if time_reduction == "mean_logits":
        z_s, z_t = _time_mean(z_s), _time_mean(z_t)
    elif time_reduction != "per_timestep":
        raise ValueError(f"time_reduction must be 'per_timestep' or 'mean_logits', got {time_reduction!r}")
    log_q = F.log_softmax(z_s / temperature, dim=-1)
    log_p = F.log_softmax(z_t / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    head = hta_head_mask_reference(p, head_threshold)
    w_head, w_tail = hta_weights_reference(p, q, head)
    rows = temperature ** 2 * (w_head * _kl_rows(log_p, log_q) + w_tail * _kl_rows(log_q, log_p))
    return reduce_rows(rows, reduction, z_s.shape[-1])


def _log_weight(weight: float) -> float:
    return math.log(weight) if weight > 0 else -math.inf


def nld_loss_reference(student_seq: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 2.0,
                       noise_weight: float = 0.1, noise_std: Optional[float] = None, noise: torch.Tensor,
                       per_timestep: bool = False, mode: str = "mixture",
                       reduction: str = "batchmean") -> torch.Tensor:
    """CKDSNN noise-smoothed logits distillation (NLD): per row ``tau^2 KL(p_t || p_s)``.

    Rows: the time-averaged student logits ``[B, C]`` (and time-averaged teacher if ``[T, B, C]``), or
    every ``(t, b)`` with ``per_timestep=True``. ``noise`` is the standard-normal eps of that shape
    (the kernels draw it from a counter-based RNG; tests hand the same eps here).

    ``mode="mixture"`` (the released code): per row ``mu = mean_k z``, ``s2`` = unbiased variance of
    ``z`` over classes (0 when C = 1), noise logits ``n = mu + eps * s2`` -- the *variance* scales eps
    and z itself is not added (``noise_std=None``), or ``n = mu + noise_std * eps`` for a float;
    ``p_s = (1 - noise_weight) softmax(z / tau) + noise_weight softmax(n / tau)``. Gradient flows
    through mu and s2 (autograd). ``log p_s`` is a ``logaddexp`` of the two log-softmaxes, so no
    probability is logged.
    ``mode="additive"`` (the paper's figure): ``p_s = softmax((z + noise_std * eps) / tau)``, no
    mixture; ``noise_std`` must be a float.
    Training only: evaluation uses CE alone.
    """
    acc = acc_dtype(student_seq, teacher)
    z, z_t, eps = student_seq.to(acc), teacher.to(acc), noise.to(acc)
    if not per_timestep:
        z, z_t = _time_mean(z), _time_mean(z_t)
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)
    if mode == "additive":
        if noise_std is None:
            raise ValueError("mode='additive' needs a float noise_std")
        log_p_s = F.log_softmax((z + noise_std * eps) / temperature, dim=-1)
    elif mode == "mixture":
        mu = z.mean(-1, keepdim=True)
        if noise_std is not None:
            scale = noise_std
        elif z.shape[-1] > 1:
            scale = z.var(-1, correction=1, keepdim=True)
        else:  # the unbiased variance of one value is 0/0; one class has nothing to smooth
            scale = torch.zeros_like(mu)
        noise_logits = mu + eps * scale
        log_p_s = torch.logaddexp(_log_weight(1.0 - noise_weight) + F.log_softmax(z / temperature, dim=-1),
                                  _log_weight(noise_weight) + F.log_softmax(noise_logits / temperature, dim=-1))
    else:
        raise ValueError(f"mode must be 'mixture' or 'additive', got {mode!r}")
    rows = temperature ** 2 * _kl_rows(log_p_t, log_p_s)
    return reduce_rows(rows, reduction, z.shape[-1])


def nld_noise(shape, generator: Optional[torch.Generator] = None, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal eps for :func:`nld_loss_reference` (convenience; kernels use their own RNG)."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(x: torch.Tensor, multiplier: int):
    """Both 32-bit halves of ``x * multiplier`` for ``x`` and ``multiplier`` below 2^32, in int64
    without overflow: ``x = x_hi 2^16 + x_lo``, each partial product below 2^48."""
    a = (x >> 16) * multiplier  # x_hi * m
    b = (x & 0xFFFF) * multiplier  # x_lo * m
    lo = (((a & 0xFFFF) << 16) + b) & _MASK32
    hi = (a + (b >> 16)) >> 16
    return hi, lo


def philox4x32_10_reference(seed: torch.Tensor, counter: torch.Tensor):
    """Philox4x32-10 (Salmon et al., SC 2011) with key ``seed`` and counter words ``(counter lo,
    counter hi, 0, 0)``, for an int64 ``counter`` tensor: its four output words, as int64 tensors
    holding uint32 values (csrc/common/philox.h's philox4x32_10, element by element)."""
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_a, lo_a = _mul_hi_lo(c2, 0xCD9E8D57)
        hi_b, lo_b = _mul_hi_lo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_a ^ c1 ^ k0, lo_a, hi_b ^ c3 ^ k1, lo_b
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def philox_noise_reference(seed: torch.Tensor, rows: int, num_classes: int) -> torch.Tensor:
    """The standard normals the NLD kernels draw for ``seed`` (a 0-dim int64 tensor, or an int in
    [0, 2^63)), as a float32 ``[rows, num_classes]`` tensor on ``seed``'s device: class c of row r is
    component ``c mod 4`` of Philox4x32-10 at counter ``r * ceil(C / 4) + c // 4`` with key ``seed``,
    turned into four normals by Box-Muller on its two word pairs (cos, then sin), as Triton's
    ``tl.randn4x`` does (csrc/common/philox.h). The kernels' values up to the last bits of their
    log/cos/sin (a few 1e-7 times the radius), in plain tensor ops (traceable: the "torch"
    backend's noise under torch.compile too).
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    draws_per_row = (num_classes + 3) // 4
    counter = torch.arange(rows * draws_per_row, dtype=torch.int64, device=seed.device)
    c0, c1, c2, c3 = philox4x32_10_reference(seed, counter)

    def uniform(bits):  # Triton's uint_to_uniform_float: the word as int32, negatives complemented
        folded = torch.where(bits >= 2 ** 31, _MASK32 - bits, bits)
        return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    normals = []
    for bits_radius, bits_angle in ((c0, c1), (c2, c3)):
        u1 = torch.clamp_min(uniform(bits_radius), 1.0e-7)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * uniform(bits_angle).double()  # cos/sin of the exact turn, rounded once
        normals += [radius * torch.cos(angle).float(), radius * torch.sin(angle).float()]
    eps = torch.stack(normals, dim=-1).view(rows, 4 * draws_per_row)
    return eps[:, :num_classes]
