"""Knowledge-distillation losses for spiking students, fused so that no ``[T, B, C]`` probability
tensor is ever materialised (backends "triton" and "cpp"; "torch" runs the readable references of
:mod:`snnkd_fast.kd.reference`, which do materialise them).

Shapes: the student emits logits at every timestep, ``[T, B, C]``; the teacher is an ANN ``[B, C]``
(its statistics are computed once per sample and reused for every t) or an SNN ``[T, B, C]``.
Inputs are read in place (non-contiguous and expanded tensors are fine); arithmetic is float32
(float64 for float64 inputs on "torch"/"cpp") and the loss comes back in float32 (float64).

Reductions (every loss is ``L = (1/T) sum_t L_t``): "batchmean" (default) ``(1/T) sum_t (1/B) sum_b l_tb``;
"sum" ``(1/T) sum_tb l_tb``; "mean" ``(1/T) sum_t (1/(B C)) sum_b l_tb``; "none" the per-row losses
``l`` ``[T, B]`` (``[B]`` for losses on time-averaged logits). With DDP, "batchmean" is over the
local batch, so DDP's gradient averaging gives the global batch's answer for equal local batches.

Gradients flow to the student and, when it requires grad (data-free KD), to the teacher. On the CPU
("cpp", eager) a call whose student alone requires grad has its forward form the student's gradient
(KL and TSER -- at its default entropy temperature -- at C = 32 or C >= 48, HTA-KL and NLD at any C),
so the backward reads nothing again: compute losses you only log under ``torch.no_grad()``.
Policy for non-finite logits: -inf marks a masked class (probability 0, handled exactly); +inf or
NaN makes that row's loss NaN. Nothing is checked on the host (no synchronisation).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import nn

from ._backends import resolve_backend
from .kd import reference as ref
from .kd.op import kd_loss, nld_loss as _nld_loss
from .kd.params import HTA_THRESHOLD_MARGIN, LOSS_HTA, LOSS_KL, LOSS_TSER

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ref.REDUCTIONS
TIME_REDUCTIONS = ("per_timestep", "mean_logits")
NLD_MODES = ("mixture", "additive")


# ------------------------------------------------------------------------------------------------
# validation, once per public call
# ------------------------------------------------------------------------------------------------

def _check_positive(value, name: str, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_finite(value, name: str, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
    return float(value)


def _check_logits(x, name: str, op: str, dims: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64 logits, got {x.dtype}")
    if x.dim() not in dims:
        shapes = " or ".join({2: "[B, C]", 3: "[T, B, C]"}[d] for d in dims)
        raise ValueError(f"{op}: {name} must be {shapes}, got shape {tuple(x.shape)}")


def _check_pair(student, teacher, op: str, student_dims=(3,)) -> None:
    _check_logits(student, "student", op, student_dims)
    _check_logits(teacher, "teacher", op, (2, 3))
    if teacher.device != student.device:
        raise ValueError(f"{op}: teacher is on {teacher.device} but student is on {student.device}")
    if student.dim() == 3 and student.shape[0] == 0:
        raise ValueError(f"{op}: student has T=0 timesteps; need T >= 1")
    if student.shape[-1] == 0:
        raise ValueError(f"{op}: C=0 classes; need C >= 1")
    if teacher.dim() == 3 and teacher.shape[0] == 0:
        raise ValueError(f"{op}: teacher has T=0 timesteps; need T >= 1")
    same_time = teacher.dim() == 2 or student.dim() == 2 or teacher.shape[0] == student.shape[0]
    if teacher.shape[-2:] != student.shape[-2:] or not same_time:
        raise ValueError(f"{op}: teacher shape {tuple(teacher.shape)} does not match student shape "
                         f"{tuple(student.shape)} (need the same B and C, and the same T for a [T, B, C] teacher)")


def _check_reduction(reduction, op: str, student: Tensor) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if reduction in ("batchmean", "mean") and student.shape[-2] == 0:
        # An average over no samples is 0/0: refuse rather than return a silent NaN.
        raise ValueError(f"{op}: student has B=0 samples (shape {tuple(student.shape)}); reduction={reduction!r} "
                         "averages over the batch, which is undefined for an empty batch; use reduction='sum' or "
                         "'none'")
    return reduction


def _time_averaged(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(student [1, B, C], teacher [B, C]): each side that is a [T, B, C] sequence averaged over time."""
    # Averaged in the call's compute dtype (ref.acc_dtype: float64 if either side is, as the reference
    # averages after casting both), never in a half type, whose mean would round. mean(dtype=) rather
    # than .to(float32).mean(): on a GPU the reduction reads 16-bit logits in place (a 2T*B*C-byte
    # read instead of a cast writing a float32 [T, B, C] copy and reading it back; 0.095 ms of Hinton
    # KD's 0.40 at bf16 4x256x32000 on an H200). The CPU casts inside either way; the values are the same.
    acc = ref.acc_dtype(student, teacher)
    s = student.mean(0, dtype=acc) if student.dim() == 3 else student
    u = teacher.mean(0, dtype=acc) if teacher.dim() == 3 else teacher
    return s.unsqueeze(0), u


def _kernel_backend(student: Tensor, teacher: Tensor, backend: str, op: str) -> str:
    backend = resolve_backend(backend, student.device, op, family="kd")
    if backend == "triton" and torch.float64 in (student.dtype, teacher.dtype):
        raise TypeError(f"{op}: backend='triton' computes in float32 and does not take float64 logits; use "
                        "backend='cpp' or 'torch' for float64")
    return backend


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------

def per_timestep_kl(student_seq: Tensor, teacher: Tensor, *, temperature: float = 4.0,
                    reduction: str = "batchmean", backend: str = "auto") -> Tensor:
    """Temporal-separation KD: ``(1/T) sum_t tau^2 KL(softmax(z_t/tau) || softmax(z_s[t]/tau))``."""
    op = "per_timestep_kl"
    _check_pair(student_seq, teacher, op)
    temperature = _check_positive(temperature, "temperature", op)
    reduction = _check_reduction(reduction, op, student_seq)
    backend = _kernel_backend(student_seq, teacher, backend, op)
    if backend == "torch":
        return ref.per_timestep_kl_reference(student_seq, teacher, temperature=temperature, reduction=reduction)
    return kd_loss(student_seq, teacher, LOSS_KL, backend, temperature, temperature, 0.0, 0.5, reduction,
                   student_seq.shape[-1])


def kd_kl(student: Tensor, teacher: Tensor, *, temperature: float = 4.0, reduction: str = "batchmean",
          backend: str = "auto") -> Tensor:
    """Hinton KD ``tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau))``; a ``[T, B, C]`` student (or
    teacher) is averaged over time first, the classic SNN practice. "none" gives ``[B]``."""
    op = "kd_kl"
    _check_pair(student, teacher, op, student_dims=(2, 3))
    temperature = _check_positive(temperature, "temperature", op)
    reduction = _check_reduction(reduction, op, student)
    backend = _kernel_backend(student, teacher, backend, op)
    if backend == "torch":
        return ref.kd_kl_reference(student, teacher, temperature=temperature, reduction=reduction)
    s, u = _time_averaged(student, teacher)
    return kd_loss(s, u, LOSS_KL, backend, temperature, temperature, 0.0, 0.5, reduction,
                   student.shape[-1], time_averaged=True)


def tser_loss(student_seq: Tensor, teacher: Tensor, *, temperature: float = 4.0, entropy_weight: float = 0.1,
              entropy_temperature: Optional[float] = None, reduction: str = "batchmean",
              backend: str = "auto") -> Tensor:
    """TSER (Yu et al., CVPR 2025): per-timestep KL plus an entropy regulariser,
    ``(1/T) sum_t [tau^2 KL(p || q_t) - lambda H(softmax(z_s[t]/tau_H))]``: the student's entropy is
    maximised (a confidence penalty against the teacher's over-confident errors).

    [ours] The paper's code was not available: the sign, ``entropy_weight`` lambda = 0.1 and
    ``entropy_temperature`` tau_H (default: ``temperature``) are our reconstruction from the paper's
    text; the paper's exact formula may differ.
    """
    op = "tser_loss"
    _check_pair(student_seq, teacher, op)
    temperature = _check_positive(temperature, "temperature", op)
    entropy_weight = _check_finite(entropy_weight, "entropy_weight", op)
    entropy_temperature = temperature if entropy_temperature is None else _check_positive(
        entropy_temperature, "entropy_temperature", op)
    reduction = _check_reduction(reduction, op, student_seq)
    backend = _kernel_backend(student_seq, teacher, backend, op)
    if backend == "torch":
        return ref.tser_loss_reference(student_seq, teacher, temperature=temperature, entropy_weight=entropy_weight,
                                       entropy_temperature=entropy_temperature, reduction=reduction)
    return kd_loss(student_seq, teacher, LOSS_TSER, backend, temperature, entropy_temperature, entropy_weight, 0.5,
                   reduction, student_seq.shape[-1])


def hta_kl(student_seq: Tensor, teacher: Tensor, *, temperature: float = 4.0, head_threshold: float = 0.5,
           time_reduction: str = "per_timestep", reduction: str = "batchmean", backend: str = "auto") -> Tensor:
    """Head-Tail-Aware KL (Zhang et al., IJCNN 2025; on adaptive KL, AKL):
    ``tau^2 (w_head KL(p || q) + w_tail KL(q || p))`` per row.

    The teacher's classes, ordered by probability (ties: lower class index first), form the head
    while their inclusive cumulative probability stays below ``head_threshold`` (the top-1 class is
    always head, as in AKL's code); the rest is the tail. ``w_head = g_head / (g_head + g_tail)`` with
    ``g = sum |p - q|`` over each part, detached (1/2 each when both gaps are 0). The mask and weights
    carry no gradient. ``time_reduction="per_timestep"`` (default) applies the loss at every t;
    ``"mean_logits"`` once to the time-averaged student (the review's description of the paper).
    Kernels order by the teacher logit (equal logits tie exactly as equal probabilities do).

    [ours] "Below" means below ``head_threshold - 2^-20`` (``kd.params.HTA_THRESHOLD_MARGIN``): a
    cumulative probability equal to the threshold in exact arithmetic -- a flat teacher row (all
    logits equal, e.g. a zero-initialised head) with ``C * head_threshold`` an integer -- is then tail
    in every backend and dtype, as exact arithmetic says, instead of head or tail by the last bits of
    each one's rounding (C = 10 at 0.5 gave the float64 reference five head classes and the cpp
    kernel four: that row's loss differed by a few percent). Any cumulative sum in
    ``[head_threshold - 2^-20, head_threshold)`` is tail too, not only those exact ties. Sums within a
    few 1e-7 of the shifted threshold still round either way (the kernels' float exps), but no
    structured input lands there.
    """
    op = "hta_kl"
    _check_pair(student_seq, teacher, op)
    temperature = _check_positive(temperature, "temperature", op)
    if isinstance(head_threshold, bool) or not isinstance(head_threshold, Real) or not 0 < head_threshold < 1:
        raise ValueError(f"{op}: head_threshold must be in (0, 1), got {head_threshold!r}")
    if time_reduction not in TIME_REDUCTIONS:
        raise ValueError(f"{op}: time_reduction={time_reduction!r}; choose one of {', '.join(TIME_REDUCTIONS)}")
    reduction = _check_reduction(reduction, op, student_seq)
    backend = _kernel_backend(student_seq, teacher, backend, op)
    if backend == "torch":
        return ref.hta_kl_reference(student_seq, teacher, temperature=temperature, head_threshold=head_threshold,
                                    time_reduction=time_reduction, reduction=reduction)
    # the ops compare the cumulative probability with the threshold they get: the reference's margin
    kernel_threshold = float(head_threshold) - HTA_THRESHOLD_MARGIN
    if time_reduction == "mean_logits":
        s, u = _time_averaged(student_seq, teacher)
        return kd_loss(s, u, LOSS_HTA, backend, temperature, temperature, 0.0, kernel_threshold, reduction,
                       student_seq.shape[-1], time_averaged=True)
    return kd_loss(student_seq, teacher, LOSS_HTA, backend, temperature, temperature, 0.0, kernel_threshold,
                   reduction, student_seq.shape[-1])


def _check_seed_args(generator, seed, op: str) -> None:
    """``seed`` and ``generator`` checked before the backend is resolved, so a bad one is named whatever
    the backend (the torch backend's own torch.randn would otherwise reject a bad generator)."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"{op}: seed must be an int in [0, 2**63), got {seed!r}")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")


def _draw_seed(generator: Optional[torch.Generator], seed: Optional[int], device: torch.device, op: str) -> Tensor:
    """A fresh 0-dim int64 seed tensor on ``device`` (no host synchronisation, traceable); ``seed`` and
    ``generator`` as :func:`_check_seed_args` passed them."""
    if seed is not None:
        return torch.tensor(seed, dtype=torch.int64, device=device)
    gen_device = generator.device if generator is not None else device
    drawn = torch.randint(0, 2 ** 62, (), dtype=torch.int64, device=gen_device, generator=generator)
    return drawn.to(device, non_blocking=True)


def nld_loss(student_seq: Tensor, teacher: Tensor, *, temperature: float = 2.0, noise_std: Optional[float] = None,
             noise_weight: float = 0.1, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             per_timestep: bool = False, mode: str = "mixture", reduction: str = "batchmean",
             backend: str = "auto") -> Tensor:
    """CKDSNN's noise-smoothed logits distillation (Liu et al., AAAI 2026), as its released code does:
    on the time-averaged student logits (``per_timestep=True``: at every t), per row ``mu = mean z``,
    ``s2`` = unbiased variance of z, noise logits ``n = mu + eps * s2`` (``noise_std=None``; a float
    replaces s2 by a fixed scale), ``p_s = (1 - noise_weight) softmax(z/tau) + noise_weight
    softmax(n/tau)`` and ``l = tau^2 KL(softmax(z_t/tau) || p_s)``. ``mode="additive"``:
    ``p_s = softmax((z + noise_std eps)/tau)`` (the paper's figure; needs a float ``noise_std``).

    eps ~ N(0, 1) is drawn inside the kernels from a counter-based RNG (Philox, four normals per
    draw as ``tl.randn4x``) keyed by a seed and the element's row and class, regenerated identically
    in the backward, never materialised. The seed is
    drawn from ``generator`` (default: the device's default generator) on every call, or given as
    ``seed`` (then ``generator`` is not used). The "torch" backend draws eps with ``torch.randn``
    from ``generator``; given a ``seed``, it computes the kernels' eps for that seed in plain tensor
    ops instead (``kd.reference.philox_noise_reference``, equal to theirs up to the last bits of
    log/cos/sin; ten rounds of 64-bit integer ops: ~50x ``torch.randn``'s time on a CPU), so that
    every backend gives the same loss for a seed, within float tolerance. Training only: evaluate
    with CE alone.
    """
    op = "nld_loss"
    _check_pair(student_seq, teacher, op, student_dims=(2, 3))
    temperature = _check_positive(temperature, "temperature", op)
    if noise_std is not None:
        if isinstance(noise_std, bool) or not isinstance(noise_std, Real) or not math.isfinite(noise_std) or \
                noise_std < 0:
            raise ValueError(f"{op}: noise_std must be None (adaptive) or a finite float >= 0, got {noise_std!r}")
        noise_std = float(noise_std)
    if isinstance(noise_weight, bool) or not isinstance(noise_weight, Real) or not 0 <= noise_weight <= 1:
        raise ValueError(f"{op}: noise_weight must be in [0, 1], got {noise_weight!r}")
    if mode not in NLD_MODES:
        raise ValueError(f"{op}: mode={mode!r}; choose one of {', '.join(NLD_MODES)}")
    if mode == "additive" and noise_std is None:
        raise ValueError(f"{op}: mode='additive' adds noise_std * eps to the logits; give a float noise_std")
    reduction = _check_reduction(reduction, op, student_seq)
    _check_seed_args(generator, seed, op)
    backend = _kernel_backend(student_seq, teacher, backend, op)
    student3 = student_seq if student_seq.dim() == 3 else student_seq.unsqueeze(0)
    if per_timestep and teacher.dim() == 3 and student3.shape[0] != teacher.shape[0]:
        # A [B, C] student against a [T, B, C] teacher: one row per teacher timestep, as the reference
        # broadcasts (the row kernels would otherwise read only the teacher's first timestep).
        student3 = student3.expand(teacher.shape[0], -1, -1)
    if not per_timestep:
        student3, teacher = _time_averaged(student3, teacher)
    if backend == "torch":
        if seed is None:  # fresh noise, drawn as the papers' code draws it
            noise = torch.randn(student3.shape, generator=generator, device=student3.device, dtype=torch.float32)
        else:  # the kernels' noise for this seed
            steps, batch, classes = student3.shape
            noise = ref.philox_noise_reference(_draw_seed(None, seed, student3.device, op), steps * batch,
                                               classes).view(student3.shape)
        rows = ref.nld_loss_reference(student3, teacher, temperature=temperature, noise_weight=noise_weight,
                                      noise_std=noise_std, noise=noise, per_timestep=True, mode=mode,
                                      reduction="none")
        return ref.reduce_rows(rows if per_timestep else rows[0], reduction, student3.shape[-1])
    seed_tensor = _draw_seed(generator, seed, student3.device, op)
    return _nld_loss(student3, teacher, seed_tensor, backend, temperature, noise_weight, noise_std, mode == "additive",
                     reduction, student3.shape[-1], time_averaged=not per_timestep)


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------

class KDKLLoss(nn.Module):
    """Module form of :func:`kd_kl`."""

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return kd_kl(student, teacher, temperature=self.temperature, reduction=self.reduction, backend=self.backend)


class PerTimestepKLLoss(nn.Module):
    """Module form of :func:`per_timestep_kl`."""

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, student_seq: Tensor, teacher: Tensor) -> Tensor:
        return per_timestep_kl(student_seq, teacher, temperature=self.temperature, reduction=self.reduction,
                               backend=self.backend)


class TSERLoss(nn.Module):
    """Module form of :func:`tser_loss`. With ``alpha < 1`` it is TSER's whole training objective
    ``(1 - alpha) (1/T) sum_t CE(z_s[t], y) + alpha tser_loss`` (CE at temperature 1, per timestep),
    and ``forward`` needs the labels. The CE rows are reduced as the KD rows are (``reduction``:
    "batchmean" the mean over t and b, "sum" over b summed, "mean" also divided by C, "none"
    ``[T, B]``). [ours] The paper computes CE and KL per timestep and averages them (Fig. 1's
    caption); the alpha mixing is our reconstruction, its code not being available."""

    def __init__(self, temperature: float = 4.0, entropy_weight: float = 0.1,
                 entropy_temperature: Optional[float] = None, alpha: float = 1.0, reduction: str = "batchmean",
                 backend: str = "auto"):
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0 <= alpha <= 1:
            raise ValueError(f"TSERLoss: alpha must be in [0, 1], got {alpha!r}")
        self.temperature, self.entropy_weight, self.entropy_temperature = temperature, entropy_weight, entropy_temperature
        self.alpha, self.reduction, self.backend = float(alpha), reduction, backend

    def forward(self, student_seq: Tensor, teacher: Tensor, target: Optional[Tensor] = None) -> Tensor:
        loss = tser_loss(student_seq, teacher, temperature=self.temperature, entropy_weight=self.entropy_weight,
                         entropy_temperature=self.entropy_temperature, reduction=self.reduction, backend=self.backend)
        if self.alpha == 1.0:
            return loss
        if target is None:
            raise ValueError("TSERLoss: alpha < 1 adds the per-timestep cross-entropy; pass target (labels [B])")
        T = student_seq.shape[0]
        ce_rows = nn.functional.cross_entropy(student_seq.flatten(0, 1).float(), target.repeat(T),
                                              reduction="none").view(T, -1)
        # reduced as the KD rows are (one reduction for the whole objective): "mean" divides by C too
        ce = ref.reduce_rows(ce_rows, self.reduction, student_seq.shape[-1])
        return (1 - self.alpha) * ce + self.alpha * loss


class HTAKLLoss(nn.Module):
    """Module form of :func:`hta_kl`."""

    def __init__(self, temperature: float = 4.0, head_threshold: float = 0.5, time_reduction: str = "per_timestep",
                 reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.head_threshold, self.time_reduction = temperature, head_threshold, time_reduction
        self.reduction, self.backend = reduction, backend

    def forward(self, student_seq: Tensor, teacher: Tensor) -> Tensor:
        return hta_kl(student_seq, teacher, temperature=self.temperature, head_threshold=self.head_threshold,
                      time_reduction=self.time_reduction, reduction=self.reduction, backend=self.backend)


class NLDLoss(nn.Module):
    """Module form of :func:`nld_loss` (a fresh noise draw on every call)."""

    def __init__(self, temperature: float = 2.0, noise_std: Optional[float] = None, noise_weight: float = 0.1,
                 generator: Optional[torch.Generator] = None, per_timestep: bool = False, mode: str = "mixture",
                 reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.noise_std, self.noise_weight, self.generator = temperature, noise_std, noise_weight, generator
        self.per_timestep, self.mode, self.reduction, self.backend = per_timestep, mode, reduction, backend

    def forward(self, student_seq: Tensor, teacher: Tensor) -> Tensor:
        return nld_loss(student_seq, teacher, temperature=self.temperature, noise_std=self.noise_std,
                        noise_weight=self.noise_weight, generator=self.generator, per_timestep=self.per_timestep,
                        mode=self.mode, reduction=self.reduction, backend=self.backend)


__all__ = ["kd_kl", "per_timestep_kl", "tser_loss", "hta_kl", "nld_loss", "KDKLLoss", "PerTimestepKLLoss",
           "TSERLoss", "HTAKLLoss", "NLDLoss"]
