"""SAMD: saliency-scaled activation-map distillation (CKDSNN, Liu et al., AAAI 2026, arXiv 2511.06902).

Source: **[code]** the released code SinoLeu/CKDSNN (``plt_train_kd_ckd_snn.py``: ``getForwardCAM``,
``compute_cam``, ``compute_kl_divergence``), as the project's specification (methods.md, section
"CKDSNN") restates it. Distilled at the last stage only (ResNet-19 ``layer3``, 8x8 on both sides).

* Student map (``student_map="spike_sum"``, the released code): ``S = sum_t sum_ch F_s``, ``F_s`` the
  student's last-stage output ``[T, B, Ch, H, W]`` (spikes; in the released ResNet-19 the last block of
  ``layer3`` ends in a ReLU instead of a LIF, so there it is real-valued -- any float tensor works). ``"class_weighted"`` (their earlier code, at the paper's
  date): ``S = ReLU(sum_ch W_s[y_s, ch] mean_t F_s[:, :, ch])`` with the student's own (detached)
  classifier and its predicted class ``y_s``.
* Teacher map: ``A = ReLU(sum_ch W[y, ch] F_t[:, ch])``, ``F_t`` ``[B, Ch', H', W']``, ``W`` the
  teacher's classifier weight ``[K, Ch']`` (detached), ``y`` the teacher's argmax class
  (``target="pred"``, the code) or the label (``target="label"``, the paper's figure).
* Each map is min-max normalised over the **whole batch** (one min and one max per batch, not per
  sample): ``M = (X - min X) / (max(X - min X) + 1e-3)``.
* Spatial softmax at temperature tau (default 2) plus ``1e-10``: ``P = softmax(M / tau over H*W) + 1e-10``.
* ``L = (1/B) sum_b sum_hw P_t (log P_t - log P_s)`` -- no ``tau^2`` (``F.kl_div(P_s.log(), P_t,
  "batchmean")`` in their code).
* Maps of different spatial size are resized bilinearly (``align_corners=False``) before the
  normalisation; by default the student's map is resized to the teacher's grid (``resize_to``).

:func:`samd_loss_reference` spells every step out on full tensors (the ground truth of the tests);
:func:`samd_loss` computes the same loss with the maps formed by single reductions, so that nothing
larger than ``O(B*H*W)`` (plus the classifier rows, ``O(B*Ch)``) is allocated beyond the inputs.
Gradients flow to the student features and to the teacher features (the released code does not
detach them; its optimizer simply holds only the student). Detach ``teacher_features`` yourself to
keep the teacher out of the graph.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

TARGETS = ("pred", "label")
STUDENT_MAPS = ("spike_sum", "class_weighted")
RESIZE_TO = ("teacher", "student")
NORM_EPS = 1e-3   # the released code's "cam / (cam.max() + 1e-3)"
PROB_EPS = 1e-10  # the released code's "prob + eps" before the log
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# validation, once per public call
# ------------------------------------------------------------------------------------------------

def _check_tensor(x, name: str, op: str, dim: int, shape_doc: str, floating: bool = True) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if floating and x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{op}: {name} must be {shape_doc}, got shape {tuple(x.shape)}")


def _check_class_index(y: Tensor, name: str, op: str, batch: int) -> None:
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{op}: {name} must be an integer tensor [B], got "
                        f"{y.dtype if isinstance(y, Tensor) else type(y).__name__}")
    if y.shape != (batch,):
        raise ValueError(f"{op}: {name} must have shape [B] = ({batch},), got {tuple(y.shape)}")


def _validate(op: str, student_features, teacher_features, classifier_weight, labels, target, temperature,
              student_map, student_classifier_weight, teacher_logits, student_logits, classifier_bias,
              resize_to) -> float:
    _check_tensor(student_features, "student_features", op, 5, "[T, B, Ch, H, W]")
    _check_tensor(teacher_features, "teacher_features", op, 4, "[B, Ch', H', W']")
    _check_tensor(classifier_weight, "classifier_weight", op, 2, "[K, Ch']")
    T, B, Ch, H, W = student_features.shape
    if T == 0 or B == 0 or H == 0 or W == 0:
        raise ValueError(f"{op}: student_features has an empty dimension: {tuple(student_features.shape)}")
    if teacher_features.shape[0] != B:
        raise ValueError(f"{op}: teacher_features has batch {teacher_features.shape[0]} but student_features has {B}")
    if classifier_weight.shape[1] != teacher_features.shape[1]:
        raise ValueError(f"{op}: classifier_weight is [K, {classifier_weight.shape[1]}] but teacher_features has "
                         f"Ch' = {teacher_features.shape[1]} channels")
    devices = {t.device for t in (student_features, teacher_features, classifier_weight)}
    if len(devices) > 1:
        raise ValueError(f"{op}: student_features, teacher_features and classifier_weight must be on one device, "
                         f"got {sorted(map(str, devices))}")
    if target not in TARGETS:
        raise ValueError(f"{op}: target={target!r}; choose 'pred' (teacher argmax) or 'label'")
    if target == "label":
        if labels is None:
            raise ValueError(f"{op}: target='label' needs labels [B]")
        _check_class_index(labels, "labels", op, B)
    if teacher_logits is not None:
        _check_tensor(teacher_logits, "teacher_logits", op, 2, "[B, K]")
        if teacher_logits.shape != (B, classifier_weight.shape[0]):
            raise ValueError(f"{op}: teacher_logits must be [B, K] = ({B}, {classifier_weight.shape[0]}), "
                             f"got {tuple(teacher_logits.shape)}")
    if classifier_bias is not None:
        _check_tensor(classifier_bias, "classifier_bias", op, 1, "[K]")
        if classifier_bias.shape[0] != classifier_weight.shape[0]:
            raise ValueError(f"{op}: classifier_bias must be [K] = ({classifier_weight.shape[0]},), "
                             f"got {tuple(classifier_bias.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature) or \
            temperature <= 0:
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    if student_map not in STUDENT_MAPS:
        raise ValueError(f"{op}: student_map={student_map!r}; choose one of {', '.join(STUDENT_MAPS)}")
    if student_map == "class_weighted":
        if student_classifier_weight is None:
            raise ValueError(f"{op}: student_map='class_weighted' needs student_classifier_weight [K, Ch]")
        _check_tensor(student_classifier_weight, "student_classifier_weight", op, 2, "[K, Ch]")
        if student_classifier_weight.shape[1] != Ch:
            raise ValueError(f"{op}: student_classifier_weight is [K, {student_classifier_weight.shape[1]}] but "
                             f"student_features has Ch = {Ch} channels")
        if student_logits is not None:
            if not isinstance(student_logits, Tensor) or student_logits.dim() not in (2, 3) or \
                    student_logits.shape[-2:] != (B, student_classifier_weight.shape[0]):
                raise ValueError(f"{op}: student_logits must be [B, K] or [T, B, K] with B = {B}, "
                                 f"K = {student_classifier_weight.shape[0]}")
    if resize_to not in RESIZE_TO:
        raise ValueError(f"{op}: resize_to={resize_to!r}; choose 'teacher' or 'student'")
    return float(temperature)


def _acc_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _teacher_class(teacher_features: Tensor, weight: Tensor, labels: Optional[Tensor], target: str,
                   teacher_logits: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """y [B] (no gradient): the label, the argmax of ``teacher_logits``, or -- without them -- the
    argmax of the GAP -> linear head ``mean_hw F_t @ W^T (+ bias)`` (the ResNet teachers' head)."""
    if target == "label":
        return labels.long()
    if teacher_logits is not None:
        return teacher_logits.detach().argmax(-1)
    pooled = teacher_features.detach().mean(dim=(2, 3)).to(weight.dtype)
    logits = pooled @ weight.t()
    if bias is not None:
        logits = logits + bias.detach().to(logits.dtype)
    return logits.argmax(-1)


def _student_class(student_features: Tensor, weight: Tensor, student_logits: Optional[Tensor]) -> Tensor:
    """The student's own predicted class (the earlier code's ``out.argmax(1)``): from ``student_logits``
    (time-averaged if ``[T, B, K]``) or the GAP -> linear head on the time-mean features."""
    if student_logits is not None:
        z = student_logits.detach()
        return (z.float().mean(0) if z.dim() == 3 else z).argmax(-1)
    pooled = student_features.detach().to(weight.dtype).mean(dim=(0, 3, 4))
    return (pooled @ weight.t()).argmax(-1)


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------

def samd_loss_reference(student_features: Tensor, teacher_features: Tensor, classifier_weight: Tensor, *,
                        labels: Optional[Tensor] = None, target: str = "pred", temperature: float = 2.0,
                        student_map: str = "spike_sum", student_classifier_weight: Optional[Tensor] = None,
                        teacher_logits: Optional[Tensor] = None, student_logits: Optional[Tensor] = None,
                        classifier_bias: Optional[Tensor] = None, resize_to: str = "teacher") -> Tensor:
    """SAMD loss, readable reference (every intermediate tensor materialised). [code: SinoLeu/CKDSNN]

    Args:
        student_features: the student's last-stage spikes ``[T, B, Ch, H, W]``.
        teacher_features: the teacher's last-stage map ``[B, Ch', H', W']``.
        classifier_weight: the teacher's classifier weight ``[K, Ch']`` (detached here).
        labels: ``[B]`` class indices, needed for ``target="label"``.
        target: "pred" (default, the code): the teacher's argmax class; "label" (the figure).
        temperature: tau of the spatial softmax (2.0; no ``tau^2`` on the loss).
        student_map: "spike_sum" (default, ``sum_t sum_ch F_s``) or "class_weighted" (earlier code).
        student_classifier_weight: ``[K, Ch]`` the student's classifier, for "class_weighted" (detached).
        teacher_logits: ``[B, K]``; its argmax is the "pred" class. Without it the class is the argmax
            of ``mean_hw F_t @ W^T + classifier_bias`` (exact for a GAP -> linear head).
        student_logits: ``[B, K]`` or ``[T, B, K]``; "class_weighted" uses its argmax (else the GAP head
            of the time-mean student features).
        classifier_bias: ``[K]``, only used for the fallback "pred" class.
        resize_to: the grid both maps are compared on when their ``H, W`` differ (bilinear): "teacher"
            (default) or "student". [ours]: the code never resizes (8x8 on both sides).

    Returns the scalar loss in float32 (float64 if any input is float64).
    """
    op = "samd_loss_reference"
    tau = _validate(op, student_features, teacher_features, classifier_weight, labels, target, temperature,
                    student_map, student_classifier_weight, teacher_logits, student_logits, classifier_bias,
                    resize_to)
    acc = _acc_dtype(student_features, teacher_features)
    fs = student_features.to(acc)
    ft = teacher_features.to(acc)
    w = classifier_weight.detach().to(acc)
    B = ft.shape[0]

    # Teacher map: class-weighted channel sum at the target class, then ReLU.
    y = _teacher_class(ft, w, labels, target, teacher_logits, classifier_bias)
    teacher_map = torch.relu((ft * w[y][:, :, None, None]).sum(dim=1))           # [B, H', W']

    # Student map.
    if student_map == "spike_sum":
        student_map_ = fs.sum(dim=0).sum(dim=1)                                   # [B, H, W]
    else:
        ws = student_classifier_weight.detach().to(acc)
        ys = _student_class(fs, ws, student_logits)
        student_map_ = torch.relu((fs.mean(dim=0) * ws[ys][:, :, None, None]).sum(dim=1))

    if student_map_.shape[-2:] != teacher_map.shape[-2:]:
        if resize_to == "teacher":
            student_map_ = F.interpolate(student_map_[:, None], size=teacher_map.shape[-2:], mode="bilinear",
                                         align_corners=False)[:, 0]
        else:
            teacher_map = F.interpolate(teacher_map[:, None], size=student_map_.shape[-2:], mode="bilinear",
                                        align_corners=False)[:, 0]

    def normalise(m):  # one min and one max over the whole batch
        m = m - m.min()
        return m / (m.max() + NORM_EPS)

    p_s = F.softmax(normalise(student_map_).reshape(B, -1) / tau, dim=1) + PROB_EPS
    p_t = F.softmax(normalise(teacher_map).reshape(B, -1) / tau, dim=1) + PROB_EPS
    return (p_t * (p_t.log() - p_s.log())).sum() / B


# ------------------------------------------------------------------------------------------------
# lean version
# ------------------------------------------------------------------------------------------------

def _resize(m: Tensor, size) -> Tensor:
    return F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _map_kl(student_map: Tensor, teacher_map: Tensor, tau: float, resize_to: str) -> Tensor:
    """Batch min-max, spatial softmax + 1e-10 and the batchmean KL of two ``[B, H, W]`` maps."""
    if student_map.shape[-2:] != teacher_map.shape[-2:]:
        if resize_to == "teacher":
            student_map = _resize(student_map, teacher_map.shape[-2:])
        else:
            teacher_map = _resize(teacher_map, student_map.shape[-2:])
    B = teacher_map.shape[0]

    def probs(m):
        m = m - m.amin()
        m = m / (m.amax() + NORM_EPS)
        return F.softmax(m.reshape(B, -1) / tau, dim=1) + PROB_EPS

    p_s, p_t = probs(student_map), probs(teacher_map)
    return (p_t * (p_t.log() - p_s.log())).sum() / B


def samd_loss(student_features: Tensor, teacher_features: Tensor, classifier_weight: Tensor, *,
              labels: Optional[Tensor] = None, target: str = "pred", temperature: float = 2.0,
              student_map: str = "spike_sum", student_classifier_weight: Optional[Tensor] = None,
              teacher_logits: Optional[Tensor] = None, student_logits: Optional[Tensor] = None,
              classifier_bias: Optional[Tensor] = None, resize_to: str = "teacher") -> Tensor:
    """SAMD loss (CKDSNN), the memory-lean version of :func:`samd_loss_reference` (same arguments,
    same value and gradients up to float summation order). [code: SinoLeu/CKDSNN]

    Memory (beyond the inputs and their gradients):

    * "spike_sum": ``S = sum_t sum_ch F_s`` is one reduction over dims (0, 2) straight into a
      ``[B, H, W]`` float32 (float64) buffer: no ``[B, Ch, H, W]`` partial sum, and its backward is a
      broadcast view. float32 spikes are read in place; float16/bfloat16 spikes are accumulated in
      float32 inside the reduction on CUDA, while PyTorch's CPU reduction upcasts them first (one
      float32 temporary of the input's size).
    * "class_weighted": ``sum_ch W_s[y_s, ch] mean_t F_s`` is T batched mat-vec products
      ``[B, 1, Ch] @ [B, Ch, H*W]`` accumulated into one ``[B, H*W]`` buffer (a float32 student is read
      in place; a half-precision one is upcast one timestep at a time).
    * Teacher map: one batched mat-vec ``[B, 1, Ch'] @ [B, Ch', H'*W']`` (the reference multiplies out
      a ``[B, Ch', H', W']`` product first). A contiguous float32 teacher is read in place.
    * Everything after the maps (normalisation, softmax, KL) is ``O(B*H*W)``.

    The classifier weights are detached; gradients reach ``student_features`` and ``teacher_features``.
    Returns the scalar loss in float32 (float64 if any input is float64).
    """
    op = "samd_loss"
    tau = _validate(op, student_features, teacher_features, classifier_weight, labels, target, temperature,
                    student_map, student_classifier_weight, teacher_logits, student_logits, classifier_bias,
                    resize_to)
    acc = _acc_dtype(student_features, teacher_features)
    T, B, Ch, H, W = student_features.shape
    w = classifier_weight.detach().to(acc)

    y = _teacher_class(teacher_features, w, labels, target, teacher_logits, classifier_bias)
    ft = teacher_features.to(acc).flatten(2)                                      # [B, Ch', H'W'], a view
    teacher_map = torch.relu(torch.bmm(w[y].unsqueeze(1), ft)).view(B, *teacher_features.shape[2:])

    if student_map == "spike_sum":
        s_map = student_features.sum(dim=(0, 2), dtype=acc)                        # [B, H, W]
    else:
        ws = student_classifier_weight.detach().to(acc)
        ys = _student_class(student_features, ws, student_logits)
        w_rows = (ws[ys] / T).unsqueeze(1)                                         # [B, 1, Ch]: mean over t
        s_flat = None
        for t in range(T):
            term = torch.bmm(w_rows, student_features[t].to(acc).flatten(2))       # [B, 1, HW]
            s_flat = term if s_flat is None else s_flat + term
        s_map = torch.relu(s_flat).view(B, H, W)
    return _map_kl(s_map, teacher_map, tau, resize_to)


class SAMDLoss(nn.Module):
    """Module form of :func:`samd_loss` (SAMD, CKDSNN). [code: SinoLeu/CKDSNN]

    ``forward(student_features, teacher_features, classifier_weight, labels=None, teacher_logits=None,
    student_classifier_weight=None, student_logits=None, classifier_bias=None)``; the options of
    :func:`samd_loss` are fixed at construction. ``reference=True`` runs :func:`samd_loss_reference`.
    """

    def __init__(self, temperature: float = 2.0, target: str = "pred", student_map: str = "spike_sum",
                 resize_to: str = "teacher", reference: bool = False):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"SAMDLoss: target={target!r}; choose 'pred' or 'label'")
        if student_map not in STUDENT_MAPS:
            raise ValueError(f"SAMDLoss: student_map={student_map!r}; choose one of {', '.join(STUDENT_MAPS)}")
        if resize_to not in RESIZE_TO:
            raise ValueError(f"SAMDLoss: resize_to={resize_to!r}; choose 'teacher' or 'student'")
        self.temperature, self.target, self.student_map, self.resize_to = temperature, target, student_map, resize_to
        self.reference = bool(reference)

    def forward(self, student_features: Tensor, teacher_features: Tensor, classifier_weight: Tensor,
                labels: Optional[Tensor] = None, teacher_logits: Optional[Tensor] = None,
                student_classifier_weight: Optional[Tensor] = None, student_logits: Optional[Tensor] = None,
                classifier_bias: Optional[Tensor] = None) -> Tensor:
        fn = samd_loss_reference if self.reference else samd_loss
        return fn(student_features, teacher_features, classifier_weight, labels=labels, target=self.target,
                  temperature=self.temperature, student_map=self.student_map,
                  student_classifier_weight=student_classifier_weight, teacher_logits=teacher_logits,
                  student_logits=student_logits, classifier_bias=classifier_bias, resize_to=self.resize_to)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, target={self.target!r}, student_map={self.student_map!r}, "
                f"resize_to={self.resize_to!r}")


__all__ = ["samd_loss", "samd_loss_reference", "SAMDLoss"]
