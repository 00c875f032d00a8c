"""CKDSNN's training objective: CE + SAMD + NLD (Liu et al., AAAI 2026, arXiv 2511.06902).

Source: **[code]** SinoLeu/CKDSNN ``plt_train_kd_ckd_snn.py`` (``training_step``):
``loss = CE(out, y) + SAMD + NLD`` with all weights 1 and tau = 2 for both distillation terms,
``out`` the student's logits (their network averages over time before the classifier, so CE is on the
time-averaged logits). NLD is :func:`snnkd_fast.losses.nld_loss`, SAMD
:func:`snnkd_fast.methods.samd.samd_loss`. Their ``validation_step`` and ``test_step`` use CE alone:
NLD draws fresh noise every call and both distillation terms need the teacher, so evaluation is CE on
the student's logits only -- :class:`CKDSNNObjective` returns exactly that in ``eval()`` mode.

The KD-weight schedule is **[ours]** (the released code has none): "constant" (the code) or
"linear_warmup", which scales both KD weights by ``min(1, epoch / warmup_epochs)`` (DKD's warm-up
form; epoch 0 is pure CE).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import nld_loss
from .samd import samd_loss, samd_loss_reference

Tensor = torch.Tensor
SCHEDULES = ("constant", "linear_warmup")


def _check_weight(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"CKDSNNObjective: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


class CKDSNNObjective(nn.Module):
    """CKDSNN's loss ``ce_weight CE(mean_t z_s, y) + s (samd_weight SAMD + nld_weight NLD)``.
    [code: SinoLeu/CKDSNN; the weight schedule is ours]

    ``s`` is the schedule factor (1 for "constant"; ``min(1, epoch / warmup_epochs)`` for
    "linear_warmup", set with :meth:`set_epoch`). Defaults follow the released code: all weights 1,
    tau = 2 for SAMD and NLD, NLD's mixture weight ``noise_weight = 0.1`` (their ``w = 0.9``),
    SAMD on the teacher's predicted class with the spike-sum student map.

    ``forward(student_logits, labels, teacher_logits=None, student_features=None,
    teacher_features=None, classifier_weight=None, classifier_bias=None, student_classifier_weight=None,
    return_terms=False)``:

    * ``student_logits`` ``[T, B, K]`` (averaged over time for CE and NLD) or ``[B, K]``.
    * ``teacher_logits`` ``[B, K]``: NLD's target and SAMD's "pred" class (needed in training).
    * ``student_features`` ``[T, B, Ch, H, W]``, ``teacher_features`` ``[B, Ch', H', W']`` and the
      teacher's ``classifier_weight`` ``[K, Ch']``: needed when ``samd_weight > 0``.
    * ``return_terms=True`` also returns a dict of the detached, unweighted terms
      (``ce``, ``samd``, ``nld``) and the schedule ``factor``, for logging.

    In ``eval()`` mode the objective is CE alone (the released code's validation loss) and the
    teacher arguments are ignored. The teacher is not touched: run it as you like (the released code
    keeps it in train mode, unfrozen, and optimises only the student).
    """

    def __init__(self, ce_weight: float = 1.0, samd_weight: float = 1.0, nld_weight: float = 1.0, *,
                 samd_temperature: float = 2.0, samd_target: str = "pred", samd_student_map: str = "spike_sum",
                 nld_temperature: float = 2.0, noise_weight: float = 0.1, noise_std: Optional[float] = None,
                 nld_mode: str = "mixture", nld_per_timestep: bool = False,
                 generator: Optional[torch.Generator] = None, schedule: str = "constant",
                 warmup_epochs: float = 5.0, samd_reference: bool = False, backend: str = "auto"):
        super().__init__()
        self.ce_weight = _check_weight(ce_weight, "ce_weight")
        self.samd_weight = _check_weight(samd_weight, "samd_weight")
        self.nld_weight = _check_weight(nld_weight, "nld_weight")
        if schedule not in SCHEDULES:
            raise ValueError(f"CKDSNNObjective: schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if schedule == "linear_warmup" and (isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, Real)
                                            or not warmup_epochs > 0):
            raise ValueError(f"CKDSNNObjective: warmup_epochs must be > 0, got {warmup_epochs!r}")
        self.schedule, self.warmup_epochs = schedule, float(warmup_epochs)
        self.samd_temperature, self.samd_target, self.samd_student_map = samd_temperature, samd_target, samd_student_map
        self.samd_reference = bool(samd_reference)
        self.nld_temperature, self.noise_weight, self.noise_std = nld_temperature, noise_weight, noise_std
        self.nld_mode, self.nld_per_timestep, self.generator, self.backend = nld_mode, nld_per_timestep, generator, backend
        self.epoch = 0.0

    # -- schedule ------------------------------------------------------------------------------
    def set_epoch(self, epoch: float) -> None:
        """Set the current epoch (a float is fine for per-step warm-up) for the KD-weight schedule. [ours]"""
        if isinstance(epoch, bool) or not isinstance(epoch, Real) or not math.isfinite(epoch) or epoch < 0:
            raise ValueError(f"CKDSNNObjective.set_epoch: epoch must be a finite number >= 0, got {epoch!r}")
        self.epoch = float(epoch)

    def kd_factor(self) -> float:
        """The schedule's factor on both KD weights at the current epoch. [ours]"""
        if self.schedule == "constant":
            return 1.0
        return min(1.0, self.epoch / self.warmup_epochs)

    # -- loss ----------------------------------------------------------------------------------
    @staticmethod
    def evaluation_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
        """CE on the time-averaged student logits: CKDSNN's evaluation loss. [code]"""
        z = student_logits.float().mean(0) if student_logits.dim() == 3 else student_logits
        return F.cross_entropy(z, labels)

    def forward(self, student_logits: Tensor, labels: Tensor, teacher_logits: Optional[Tensor] = None,
                student_features: Optional[Tensor] = None, teacher_features: Optional[Tensor] = None,
                classifier_weight: Optional[Tensor] = None, classifier_bias: Optional[Tensor] = None,
                student_classifier_weight: Optional[Tensor] = None, return_terms: bool = False):
        if not isinstance(student_logits, Tensor) or student_logits.dim() not in (2, 3):
            raise ValueError("CKDSNNObjective: student_logits must be [T, B, K] or [B, K]")
        ce = self.evaluation_loss(student_logits, labels)
        terms = {"ce": ce.detach()}
        factor = self.kd_factor() if self.training else 0.0
        terms["factor"] = factor
        loss = self.ce_weight * ce
        # A zero schedule factor skips the KD terms (unless they are asked for, for logging).
        active = self.training and (factor > 0 or return_terms)
        if active and self.nld_weight > 0:
            if teacher_logits is None:
                raise ValueError("CKDSNNObjective: nld_weight > 0 needs teacher_logits [B, K] in training")
            nld = nld_loss(student_logits, teacher_logits, temperature=self.nld_temperature,
                           noise_std=self.noise_std, noise_weight=self.noise_weight, generator=self.generator,
                           per_timestep=self.nld_per_timestep, mode=self.nld_mode, backend=self.backend)
            terms["nld"] = nld.detach()
            if factor > 0:
                loss = loss + (factor * self.nld_weight) * nld
        if active and self.samd_weight > 0:
            if student_features is None or teacher_features is None or classifier_weight is None:
                raise ValueError("CKDSNNObjective: samd_weight > 0 needs student_features [T, B, Ch, H, W], "
                                 "teacher_features [B, Ch', H', W'] and classifier_weight [K, Ch'] in training "
                                 "(or set samd_weight=0)")
            fn = samd_loss_reference if self.samd_reference else samd_loss
            samd = fn(student_features, teacher_features, classifier_weight, labels=labels, target=self.samd_target,
                      temperature=self.samd_temperature, student_map=self.samd_student_map,
                      student_classifier_weight=student_classifier_weight,
                      teacher_logits=None if teacher_logits is None or teacher_logits.dim() != 2 else teacher_logits,
                      student_logits=student_logits, classifier_bias=classifier_bias)
            terms["samd"] = samd.detach()
            if factor > 0:
                loss = loss + (factor * self.samd_weight) * samd
        return (loss, terms) if return_terms else loss

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, samd_weight={self.samd_weight}, nld_weight={self.nld_weight}, "
                f"samd_temperature={self.samd_temperature}, nld_temperature={self.nld_temperature}, "
                f"noise_weight={self.noise_weight}, schedule={self.schedule!r}")


__all__ = ["CKDSNNObjective"]
