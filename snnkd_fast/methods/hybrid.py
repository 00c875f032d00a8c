"""Hybrid block-wise replacement for ANN -> SNN distillation (Yang et al., CVPR 2025, arXiv 2503.16572).

Source: **[paper: Fig. 1 caption]** for the idea -- the student SNN's blocks progressively replace the
teacher ANN's blocks, forming hybrid networks whose outputs are distilled from the teacher -- and
**[ours]** for everything else (the paper's full text was not available; methods.md "Hybrid block-wise
replacement" is the specification): the formulas below are our reconstruction from the caption and
may differ from the paper's.

Teacher ANN and student SNN are aligned lists of L blocks. Hybrid ``M_k`` (k = 1..L-1) = student blocks
1..k -> their time-averaged (**rate**) output -> a learnable align module (1x1 conv + BN for maps,
linear for vectors) -> teacher blocks k+1..L -> teacher head. Data flows SNN -> ANN only; the teacher is
frozen (parameters ``requires_grad=False``, always in eval mode) but gradients flow *through* its blocks
to the align modules and the student. Loss:

    ``ce_weight CE(y_S, y) + sum_k w_k tau^2 KL(y_A || y_Mk) + w_S tau^2 KL(y_A || y_S)``

(``y_S`` the student's time-averaged logits, ``y_A`` the teacher's, ``w = 1``, ``tau = 4`` by default,
:func:`snnkd_fast.losses.kd_kl`), plus optionally ``feature_weight sum_k MSE(align_k(r_k), F_T,k)``
(rate-based feature alignment against the teacher block's output). "Progressively" is read as depth:
every hybrid every step by default; ``schedule="progressive"`` adds hybrids over training instead.

Training with rate-based backpropagation (Yu et al., NeurIPS 2024) is the paper's recipe; here
``neuron_backward="rate"`` switches every snnkd_fast neuron of the student to the LIF op's
``backward="rate"`` option (forward emits the same spikes, keeps an O(N) eligibility instead of the
T-long membrane, and gives every timestep ``(1/T) e sum_t dL/dS[t]``). Unlike the authors' two-pass
code, the non-neuron layers still keep their T-long activations for the backward; the approximation
is exact only through linear ops (conv, linear, average pooling, residual adds) -- max pooling and
BatchNorm's batch statistics break it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import kd_kl
from ..nn.neurons import _MultiStepNeuron
from ._util import is_spiking_neuron, reset_neurons, training_mode

Tensor = torch.Tensor
SCHEDULES = ("all", "progressive")
SCHEDULE_ORDERS = ("shallow_first", "deep_first")
NEURON_BACKWARDS = ("bptt", "rate")


class TimeDistributed(nn.Module):
    """Apply stateless layers to a ``[T, B, ...]`` sequence by merging T into the batch
    (SpikingJelly's ``SeqToANNContainer``): BatchNorm then normalises over ``T*B`` samples. [ours]"""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.module = modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        T, B = x.shape[:2]
        y = self.module(x.reshape(T * B, *x.shape[2:]))
        return y.view(T, B, *y.shape[1:])


def direct_encoding(x: Tensor, T: int) -> Tensor:
    """The image repeated over T timesteps, ``[T, B, ...]`` (a broadcast view, no copy). [ours: the
    usual direct encoding]"""
    return x.unsqueeze(0).expand(T, *x.shape)


def make_align_module(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """The learnable bridge from a student rate ``[B, *student_shape]`` to the teacher's block input
    ``[B, *teacher_shape]``: 1x1 conv (no bias) + BatchNorm2d for ``(C, H, W)`` maps (same H, W), a
    linear layer on the last dim otherwise (same leading dims). [ours: reconstructed from the paper's
    Fig. 1 caption; the paper's align module may differ]"""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) != len(t):
        raise ValueError(f"make_align_module: student rate shape {s} and teacher feature shape {t} differ in rank")
    if len(s) == 3:
        if s[1:] != t[1:]:
            raise ValueError(f"make_align_module: student map {s} and teacher map {t} have different spatial sizes; "
                             "the align module is a 1x1 conv, so the blocks must downsample alike")
        return nn.Sequential(nn.Conv2d(s[0], t[0], kernel_size=1, bias=False), nn.BatchNorm2d(t[0]))
    if s[:-1] != t[:-1]:
        raise ValueError(f"make_align_module: student {s} and teacher {t} differ before the last dim")
    return nn.Linear(s[-1], t[-1])


@dataclass
class HybridOutputs:
    """Everything one :meth:`HybridDistiller.forward` computed. [ours]"""
    student_logits: Tensor                                  # [T, B, K] (or [B, K]) from the student head
    teacher_logits: Tensor                                  # [B, K], no graph
    hybrid_logits: Dict[int, Tensor] = field(default_factory=dict)     # k -> [B, K] of M_k
    aligned_rates: Dict[int, Tensor] = field(default_factory=dict)     # k -> align_k(mean_t student block k)
    teacher_features: List[Tensor] = field(default_factory=list)       # teacher block outputs, no graph


class HybridDistiller(nn.Module):
    """Hybrid block-wise ANN -> SNN distillation. [ours: reconstructed from the paper's Fig. 1 caption;
    the paper's exact formulation may differ]

    Args:
        student_blocks: L modules taking and returning ``[T, B, ...]`` (containing snnkd_fast neurons).
        teacher_blocks: L modules ``[B, ...] -> [B, ...]`` (frozen here: ``requires_grad_(False)``,
            kept in eval mode whatever :meth:`train` says).
        teacher_head: the teacher's classifier on block L's output -> ``[B, K]`` (frozen).
        student_head: the student's classifier on block L's output ``[T, B, ...]`` -> ``[T, B, K]`` (or
            ``[B, K]``); None: the last student block already returns logits.
        T: timesteps of the direct encoding (the image repeated T times; ``encoder(x, T)`` replaces it).
        temperature: tau of every KD term (4.0; Hinton ``tau^2`` scaling).
        hybrid_weights: w_k, one float for all or a sequence of L-1 (1.0).
        student_kd_weight: w_S (1.0). ``ce_weight``: weight of CE on the student's logits (1.0).
        feature_weight: weight of the rate-based feature alignment
            ``sum_k MSE(align_k(mean_t S_k), F_T,k)`` (0.0: off).
        align_shapes: L-1 pairs ``(student_rate_shape, teacher_feature_shape)`` without the batch dim
            to build the align modules now; None builds them from a dry run in :meth:`initialize` (or,
            with a warning, lazily at the first forward -- build the optimizer after that).
        schedule: "all" (default: every hybrid every step) or "progressive": after
            :meth:`set_epoch`, ``min(L-1, 1 + floor(epoch / epochs_per_stage))`` hybrids are active,
            the shallowest first (``schedule_order="shallow_first"``: k = 1, 2, ...) or the deepest
            first ("deep_first": k = L-1, L-2, ...).
        neuron_backward: "bptt" (default) or "rate": sets ``.backward`` on every snnkd_fast neuron of
            the student (blocks and head); "rate" needs a neuron op with that option, and PLIF
            neurons need a frozen ``w`` under it (the op refuses otherwise: the rate approximation
            gives no time-constant gradient).
        backend: the KD loss backend ("auto").
    """

    def __init__(self, student_blocks: Sequence[nn.Module], teacher_blocks: Sequence[nn.Module],
                 teacher_head: nn.Module, *, student_head: Optional[nn.Module] = None, T: int = 4,
                 temperature: float = 4.0, hybrid_weights: Union[float, Sequence[float]] = 1.0,
                 student_kd_weight: float = 1.0, ce_weight: float = 1.0, feature_weight: float = 0.0,
                 align_shapes: Optional[Sequence[Tuple[Sequence[int], Sequence[int]]]] = None,
                 schedule: str = "all", epochs_per_stage: float = 1.0, schedule_order: str = "shallow_first",
                 neuron_backward: str = "bptt", encoder: Optional[Callable[[Tensor, int], Tensor]] = None,
                 backend: str = "auto"):
        super().__init__()
        if len(student_blocks) != len(teacher_blocks) or len(student_blocks) == 0:
            raise ValueError(f"HybridDistiller: student_blocks ({len(student_blocks)}) and teacher_blocks "
                             f"({len(teacher_blocks)}) must be aligned, non-empty lists of the same length")
        self.num_blocks = L = len(student_blocks)
        self.student_blocks = nn.ModuleList(student_blocks)
        self.student_head = student_head
        self.teacher_blocks = nn.ModuleList(teacher_blocks)
        self.teacher_head = teacher_head
        for m in (self.teacher_blocks, self.teacher_head):
            m.requires_grad_(False)
            m.eval()
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"HybridDistiller: T must be an int >= 1, got {T!r}")
        self.T = T
        for name, v in (("temperature", temperature), ("student_kd_weight", student_kd_weight),
                        ("ce_weight", ce_weight), ("feature_weight", feature_weight)):
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v < 0 or \
                    (name == "temperature" and v == 0):
                raise ValueError(f"HybridDistiller: {name} must be a finite number "
                                 f"{'> 0' if name == 'temperature' else '>= 0'}, got {v!r}")
        self.temperature, self.student_kd_weight = float(temperature), float(student_kd_weight)
        self.ce_weight, self.feature_weight = float(ce_weight), float(feature_weight)
        if isinstance(hybrid_weights, Real) and not isinstance(hybrid_weights, bool):
            weights = [float(hybrid_weights)] * (L - 1)
        else:
            weights = [float(w) for w in hybrid_weights]
            if len(weights) != L - 1:
                raise ValueError(f"HybridDistiller: hybrid_weights needs L-1 = {L - 1} entries, got {len(weights)}")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"HybridDistiller: hybrid_weights must be finite and >= 0, got {weights}")
        self.hybrid_weights = weights
        if schedule not in SCHEDULES:
            raise ValueError(f"HybridDistiller: schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if schedule_order not in SCHEDULE_ORDERS:
            raise ValueError(f"HybridDistiller: schedule_order={schedule_order!r}; "
                             f"choose one of {', '.join(SCHEDULE_ORDERS)}")
        if isinstance(epochs_per_stage, bool) or not isinstance(epochs_per_stage, Real) or not epochs_per_stage > 0:
            raise ValueError(f"HybridDistiller: epochs_per_stage must be > 0, got {epochs_per_stage!r}")
        self.schedule, self.schedule_order, self.epochs_per_stage = schedule, schedule_order, float(epochs_per_stage)
        self.epoch = 0.0
        self.encoder = encoder
        self.backend = backend
        self.align: Optional[nn.ModuleList] = None
        if align_shapes is not None:
            if len(align_shapes) != L - 1:
                raise ValueError(f"HybridDistiller: align_shapes needs L-1 = {L - 1} pairs, got {len(align_shapes)}")
            self.align = nn.ModuleList(make_align_module(s, t) for s, t in align_shapes)
        self.neuron_backward = "bptt"
        self.set_neuron_backward(neuron_backward)

    # -- configuration ---------------------------------------------------------------------------
    def student_modules(self) -> List[nn.Module]:
        return [m for m in (self.student_blocks, self.student_head) if m is not None]

    def set_neuron_backward(self, mode: str) -> int:
        """Set ``.backward = mode`` on every snnkd_fast neuron in the student; returns how many.
        "rate" raises if the student holds spiking neurons that are not snnkd_fast's (e.g. SpikingJelly
        nodes: swap them with snnkd_fast.compat.spikingjelly.replace_neurons first)."""
        if mode not in NEURON_BACKWARDS:
            raise ValueError(f"HybridDistiller: neuron_backward={mode!r}; choose 'bptt' or 'rate'")
        neurons = [m for part in self.student_modules() for m in part.modules() if is_spiking_neuron(m)]
        if mode == "rate":
            unsupported = [type(m).__name__ for m in neurons if not isinstance(m, _MultiStepNeuron)]
            if unsupported:
                raise NotImplementedError(
                    "HybridDistiller: neuron_backward='rate' needs snnkd_fast neurons with the backward='rate' "
                    f"option; these do not have it: {sorted(set(unsupported))}")
        count = 0
        for m in neurons:
            if isinstance(m, _MultiStepNeuron):
                m.backward = mode
                count += 1
        self.neuron_backward = mode
        return count

    def set_epoch(self, epoch: float) -> None:
        """Set the current epoch (float allowed) for ``schedule="progressive"``."""
        if isinstance(epoch, bool) or not isinstance(epoch, Real) or not math.isfinite(epoch) or epoch < 0:
            raise ValueError(f"HybridDistiller.set_epoch: epoch must be a finite number >= 0, got {epoch!r}")
        self.epoch = float(epoch)

    def active_hybrids(self) -> List[int]:
        """The k (1-based, ascending) of the hybrids trained at the current epoch. [ours]"""
        L = self.num_blocks
        if self.schedule == "all" or L == 1:
            return list(range(1, L))
        n = min(L - 1, 1 + int(math.floor(self.epoch / self.epochs_per_stage)))
        if self.schedule_order == "shallow_first":
            return list(range(1, n + 1))
        return list(range(L - n, L))

    def train(self, mode: bool = True) -> "HybridDistiller":
        super().train(mode)
        self.teacher_blocks.eval()  # the teacher is frozen: BN always on its running statistics
        self.teacher_head.eval()
        return self

    def student_parameters(self):
        """Parameters to optimise: the student's and the align modules' (build the optimizer from
        these after :meth:`initialize` when ``align_shapes`` was not given)."""
        params = [p for part in self.student_modules() for p in part.parameters()]
        if self.align is not None:
            params += list(self.align.parameters())
        return params

    # -- forward ---------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        return direct_encoding(x, self.T) if self.encoder is None else self.encoder(x, self.T)

    def _run_student(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        for part in self.student_modules():
            reset_neurons(part)
        h = self.encode(x)
        outs = []
        for block in self.student_blocks:
            h = block(h)
            outs.append(h)
        logits = h if self.student_head is None else self.student_head(h)
        return outs, logits

    def _run_teacher(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        with torch.no_grad():
            feats = []
            h = x
            for block in self.teacher_blocks:
                h = block(h)
                feats.append(h)
            return feats, self.teacher_head(h)

    @staticmethod
    def _rate(spikes: Tensor) -> Tensor:
        return spikes.mean(0)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Build the align modules from a dry run on a batch ``x`` (student and teacher in eval mode,
        nothing updated). A no-op if they exist."""
        if self.align is not None:
            return
        t_feats, _ = self._run_teacher(x)
        with training_mode(self, False):
            s_outs, _ = self._run_student(x)
        for part in self.student_modules():
            reset_neurons(part)
        shapes = [(tuple(s_outs[k - 1].shape[2:]), tuple(t_feats[k - 1].shape[1:])) for k in range(1, self.num_blocks)]
        ref = next(iter(self.student_blocks.parameters()), None)
        align = nn.ModuleList(make_align_module(s, t) for s, t in shapes)
        if ref is not None:
            align = align.to(device=ref.device, dtype=ref.dtype)
        align.train(self.training)
        self.align = align

    def forward(self, x: Tensor) -> HybridOutputs:
        """Teacher pass (no graph), one student pass shared by every hybrid, and the active hybrids."""
        if self.align is None:
            warnings.warn("HybridDistiller: align modules created lazily at the first forward; build the optimizer "
                          "after this call (or call initialize(x) / pass align_shapes first)", stacklevel=2)
            self.initialize(x)
        t_feats, t_logits = self._run_teacher(x)
        s_outs, s_logits = self._run_student(x)
        out = HybridOutputs(student_logits=s_logits, teacher_logits=t_logits, teacher_features=t_feats)
        for k in self.active_hybrids():
            h = self.align[k - 1](self._rate(s_outs[k - 1]))
            out.aligned_rates[k] = h
            for block in self.teacher_blocks[k:]:
                h = block(h)
            out.hybrid_logits[k] = self.teacher_head(h)
        return out

    def loss(self, x: Tensor, y: Tensor, return_terms: bool = False):
        """``ce_weight CE(y_S, y) + sum_k w_k tau^2 KL(y_A || y_Mk) + w_S tau^2 KL(y_A || y_S)`` (+ the
        feature term). ``return_terms=True`` also returns ``(terms, outputs)``: the detached
        unweighted terms (``ce``, ``student_kd``, ``hybrid_kd`` {k: value}, ``feature`` {k: value})
        and the :class:`HybridOutputs`."""
        out = self(x)
        s_logits = out.student_logits
        s_mean = s_logits.float().mean(0) if s_logits.dim() == 3 else s_logits
        ce = F.cross_entropy(s_mean, y)
        total = self.ce_weight * ce
        terms = {"ce": ce.detach(), "hybrid_kd": {}, "feature": {}}
        t_logits = out.teacher_logits
        if self.student_kd_weight > 0 or return_terms:
            kd_s = kd_kl(s_logits, t_logits.to(s_logits.dtype), temperature=self.temperature, backend=self.backend)
            terms["student_kd"] = kd_s.detach()
            total = total + self.student_kd_weight * kd_s
        for k, logits in out.hybrid_logits.items():
            kd_k = kd_kl(logits, t_logits.to(logits.dtype), temperature=self.temperature, backend=self.backend)
            terms["hybrid_kd"][k] = kd_k.detach()
            total = total + self.hybrid_weights[k - 1] * kd_k
        if self.feature_weight > 0:
            for k, h in out.aligned_rates.items():
                f = F.mse_loss(h, out.teacher_features[k - 1].to(h.dtype))
                terms["feature"][k] = f.detach()
                total = total + self.feature_weight * f
        return (total, terms, out) if return_terms else total

    def extra_repr(self) -> str:
        return (f"L={self.num_blocks}, T={self.T}, temperature={self.temperature}, hybrid_weights={self.hybrid_weights}, "
                f"student_kd_weight={self.student_kd_weight}, feature_weight={self.feature_weight}, "
                f"schedule={self.schedule!r}, neuron_backward={self.neuron_backward!r}")


__all__ = ["HybridDistiller", "HybridOutputs", "TimeDistributed", "direct_encoding", "make_align_module"]
