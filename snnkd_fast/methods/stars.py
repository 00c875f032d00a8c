"""STARS: data-free ANN -> SNN distillation terms (Ye et al., arXiv 2605.27409, May 2026).

Source: **[abstract]** for the two named terms (Relational Consistency Alignment, Tail-Aware
Regularization) and their purpose; **[ours]** for every formula, default and the synthesizer around
them -- the paper's full text was not available, so everything here is reconstructed from the paper's
abstract and the project's specification (methods.md, "STARS"); the paper's exact formulas may differ.
The knobs that hide the unknown details are arguments.

The terms plug into a BN-guided synthesizer and do not care where the synthetic batch ``x`` came from:

* BN matching (DeepInversion, Yin et al. CVPR 2020 -- **[paper]** of that method):
  ``L_BN = sum_l ||sigma^2_l(x) - sigma^2_run,l||_2 + ||mu_l(x) - mu_run,l||_2`` over the frozen
  teacher's BatchNorm *inputs* (batch mean and biased batch variance over N and the spatial dims),
  plus ``CE(teacher(x), y_target)``.
* Relational Consistency Alignment: ``G = F_hat F_hat^T`` with ``F_hat`` the row-normalised batch
  features (teacher logits vs the student's time-mean logits by default),
  ``L_RCA = ||G_T - G_S||_F^2 / B^2``; its weight is signed (> 0 preserves the teacher's relational
  structure in the student, the abstract's "consistency"; < 0 makes the synthesizer adversarial).
* Tail-Aware Regularization, per teacher BN layer l and channel c: the soft exceedance
  ``pi_lc = mean_{n,h,w} sigmoid((a_lc - theta_lc) / (kappa |gamma_c|))`` of the BN *output* ``a`` over
  ``theta_lc = beta_c + k |gamma_c|``, pulled toward the Gaussian tail mass ``1 - Phi(k)``:
  ``L_TAR = mean_lc (pi_lc - (1 - Phi(k)))^2``, k = 2, kappa = 0.1.

Then the SNN student is trained on the synthetic batches with a KD loss of ours (``kd_kl`` by default,
:func:`train_student_step`). Gradients of the synthesis objective reach ``x`` through the frozen
teacher (parameters ``requires_grad=False``, inputs ``requires_grad=True``) and, for RCA, through the
student; only ``x`` (or the generator) is updated during synthesis -- ``torch.autograd.grad`` is
taken w.r.t. those alone, so no gradient accumulates in the teacher's or the student's parameters.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from numbers import Real
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..losses import kd_kl
from ._util import acc_dtype, reset_neurons, training_mode

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------
# BatchNorm statistics
# ------------------------------------------------------------------------------------------------

@dataclass
class BNRecord:
    """What one forward of a BatchNorm layer recorded. [ours]

    ``mean`` / ``var``: batch mean and biased batch variance of the layer's *input*, per channel
    ``[C]`` (over N and every dim after the channel dim), with autograd graph; ``output``: the
    layer's output (for TAR; ``None`` when not recorded).
    """
    module: _BatchNorm
    mean: Tensor
    var: Tensor
    output: Optional[Tensor]


class BNStatisticsHook:
    """Forward hooks on every BatchNorm layer of ``model`` (a frozen teacher), recording the batch
    statistics of each layer's input and, with ``record_outputs=True``, its output. [ours; DeepInversion's
    ``DeepInversionFeatureHook`` records the same statistics]

    Iterating yields the :class:`BNRecord` of each layer that ran in the last forward, in module
    order. A layer called several times in one forward keeps its last call. ``enabled = False``
    pauses recording; :meth:`clear` forgets the records (they hold the outputs and their graph);
    :meth:`remove` detaches the hooks (also on leaving a ``with`` block).
    """

    def __init__(self, model: nn.Module, record_outputs: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"BNStatisticsHook: model must be an nn.Module, got {type(model).__name__}")
        self.layers: List[_BatchNorm] = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        if not self.layers:
            raise ValueError("BNStatisticsHook: the model has no BatchNorm layer to match statistics against")
        self.record_outputs = bool(record_outputs)
        self.enabled = True
        self._records: List[Optional[BNRecord]] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(partial(self._hook, i)) for i, m in enumerate(self.layers)]

    def _hook(self, index: int, module: _BatchNorm, inputs, output) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        self._records[index] = BNRecord(module, mean, var, output if self.record_outputs else None)

    def __iter__(self):
        return iter([r for r in self._records if r is not None])

    def __len__(self) -> int:
        return sum(r is not None for r in self._records)

    def clear(self) -> None:
        self._records = [None] * len(self.layers)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "BNStatisticsHook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _records(records: Union[BNStatisticsHook, Iterable[BNRecord]], op: str) -> List[BNRecord]:
    out = list(records)
    if not out:
        raise ValueError(f"{op}: no BatchNorm statistics recorded; run the teacher on the batch first "
                         "(with a BNStatisticsHook attached and enabled)")
    return out


def bn_matching_loss(records: Union[BNStatisticsHook, Iterable[BNRecord]],
                     layer_weights: Optional[Sequence[float]] = None) -> Tensor:
    """DeepInversion's BN-statistics loss ``sum_l w_l (||var_l(x) - running_var_l||_2 +
    ||mean_l(x) - running_mean_l||_2)`` (L2 norms, not squared; biased batch variance).
    [paper: DeepInversion (Yin et al., CVPR 2020), as STARS' BN-guided synthesizer uses it]

    ``records``: a :class:`BNStatisticsHook` after a teacher forward, or its records.
    ``layer_weights``: one weight per recorded layer (default 1 each; DeepInversion up-weights the
    first layer).
    """
    recs = _records(records, "bn_matching_loss")
    if layer_weights is not None and len(layer_weights) != len(recs):
        raise ValueError(f"bn_matching_loss: layer_weights has {len(layer_weights)} entries for {len(recs)} layers")
    total = None
    for i, r in enumerate(recs):
        if r.module.running_mean is None or r.module.running_var is None:
            raise ValueError(f"bn_matching_loss: BatchNorm layer {i} ({r.module}) tracks no running statistics")
        term = torch.linalg.vector_norm(r.var - r.module.running_var.to(r.var.dtype)) + \
            torch.linalg.vector_norm(r.mean - r.module.running_mean.to(r.mean.dtype))
        if layer_weights is not None:
            term = term * float(layer_weights[i])
        total = term if total is None else total + term
    return total


# ------------------------------------------------------------------------------------------------
# Relational Consistency Alignment
# ------------------------------------------------------------------------------------------------

def relational_gram(features: Tensor, eps: float = 1e-12) -> Tensor:
    """``G = F_hat F_hat^T`` ``[B, B]`` of the batch's row-normalised features (flattened after dim 0;
    a zero row stays zero: ``F.normalize``'s ``eps``). [ours]"""
    f = features.flatten(1)
    f = F.normalize(f.to(acc_dtype(f)), dim=1, eps=eps)
    return f @ f.t()


def relational_consistency_loss(teacher_feats: Tensor, student_feats: Tensor, *,
                                student_time_mean: Optional[bool] = None, eps: float = 1e-12) -> Tensor:
    """STARS' Relational Consistency Alignment ``||G_T - G_S||_F^2 / B^2`` with ``G = F_hat F_hat^T``
    of the row-normalised features. [ours: reconstructed from the paper's abstract; the paper's exact
    formula may differ]

    ``teacher_feats`` ``[B, ...]`` (logits ``[B, K]`` by default, or penultimate features),
    ``student_feats`` ``[B, ...]`` or ``[T, B, ...]``: a student with one more dim than the teacher is
    averaged over its leading time dim (``student_time_mean=None``, auto; force with True/False).
    Teacher and student may have different feature widths (the Gram matrices are ``B x B``).
    Gradients flow to both. The weight (signed) is applied by the caller.
    """
    op = "relational_consistency_loss"
    for name, t in (("teacher_feats", teacher_feats), ("student_feats", student_feats)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 2:
            raise ValueError(f"{op}: {name} must be a floating-point tensor [B, ...] (or [T, B, ...] for the student)")
    if student_time_mean is None:
        student_time_mean = student_feats.dim() == teacher_feats.dim() + 1
    s = student_feats.to(acc_dtype(student_feats)).mean(0) if student_time_mean else student_feats
    if s.shape[0] != teacher_feats.shape[0]:
        raise ValueError(f"{op}: batch sizes differ: teacher {teacher_feats.shape[0]}, student {s.shape[0]} "
                         "(a [T, B, ...] student needs student_time_mean=True or one more dim than the teacher)")
    g_t, g_s = relational_gram(teacher_feats, eps), relational_gram(s, eps)
    dtype = torch.promote_types(g_t.dtype, g_s.dtype)
    B = g_t.shape[0]
    return (g_t.to(dtype) - g_s.to(dtype)).pow(2).sum() / (B * B)


# ------------------------------------------------------------------------------------------------
# Tail-Aware Regularization
# ------------------------------------------------------------------------------------------------

def gaussian_tail_mass(k: float) -> float:
    """``1 - Phi(k)``, the standard normal's mass above k (0.02275 for k = 2): TAR's target. [ours:
    reconstructed from the paper's abstract; the paper's exact formula may differ]"""
    return 0.5 * math.erfc(k / math.sqrt(2.0))


def soft_tail_exceedance(output: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], *, k: float = 2.0,
                         kappa: float = 0.1, eps: float = 1e-8) -> Tensor:
    """Per-channel soft exceedance ``pi_c = mean_{n,h,w} sigmoid((a - beta_c - k|gamma_c|) / (kappa|gamma_c|))``
    of a BN output ``a`` ``[N, C, ...]`` with affine weight gamma and bias beta (None: 1 and 0).
    ``kappa |gamma|`` is clamped below by ``eps`` (a channel with gamma = 0 has a constant output).
    gamma and beta are detached (a teacher-derived threshold). [ours: reconstructed from the paper's
    abstract; the paper's exact formula may differ]"""
    C = output.shape[1]
    acc = acc_dtype(output)
    a = output.to(acc)
    gamma = torch.ones(C, dtype=acc, device=a.device) if weight is None else weight.detach().to(acc)
    beta = torch.zeros(C, dtype=acc, device=a.device) if bias is None else bias.detach().to(acc)
    shape = (1, C) + (1,) * (a.dim() - 2)
    theta = (beta + k * gamma.abs()).view(shape)
    scale = (kappa * gamma.abs()).clamp_min(eps).view(shape)
    dims = [0] + list(range(2, a.dim()))
    return torch.sigmoid((a - theta) / scale).mean(dim=dims)


def tail_aware_regularization(records: Union[BNStatisticsHook, Iterable[BNRecord]], *, k: float = 2.0,
                              kappa: float = 0.1, target: Optional[float] = None, eps: float = 1e-8) -> Tensor:
    """STARS' Tail-Aware Regularization ``mean_lc (pi_lc - (1 - Phi(k)))^2`` over every channel c of
    every recorded teacher BN layer l (one mean over all (l, c) pairs, so wide layers count more),
    ``pi_lc`` from :func:`soft_tail_exceedance` on the BN outputs. k = 2, kappa = 0.1; ``target``
    overrides ``1 - Phi(k)``. [ours: reconstructed from the paper's abstract; the paper's exact formula
    may differ]

    ``records``: a :class:`BNStatisticsHook` (with ``record_outputs=True``) after a teacher forward,
    or its records.
    """
    op = "tail_aware_regularization"
    for name, v in (("k", k), ("kappa", kappa)):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or (name == "kappa" and v <= 0):
            raise ValueError(f"{op}: {name} must be a finite number{' > 0' if name == 'kappa' else ''}, got {v!r}")
    recs = _records(records, op)
    tail = gaussian_tail_mass(k) if target is None else float(target)
    pis = []
    for i, r in enumerate(recs):
        if r.output is None:
            raise ValueError(f"{op}: BN layer {i} has no recorded output; use BNStatisticsHook(record_outputs=True)")
        m = r.module
        pis.append(soft_tail_exceedance(r.output, m.weight if m.affine else None, m.bias if m.affine else None,
                                        k=k, kappa=kappa, eps=eps))
    pi = torch.cat(pis)
    return (pi - tail).pow(2).mean()


# ------------------------------------------------------------------------------------------------
# synthesizer
# ------------------------------------------------------------------------------------------------

class SmallGenerator(nn.Module):
    """A small convolutional generator ``z [B, latent_dim] -> x [B, C, H, W]`` in the style of
    DFAD/Fast-DFKD: linear -> BN -> (upsample x2, conv 3x3, BN, LeakyReLU) x 2 -> conv 3x3 -> tanh,
    resized to ``(H, W)`` if H or W is not a multiple of 4. [ours]"""

    def __init__(self, latent_dim: int, out_shape: Sequence[int], width: int = 32):
        super().__init__()
        if len(out_shape) != 3:
            raise ValueError(f"SmallGenerator: out_shape must be (C, H, W), got {tuple(out_shape)}")
        self.out_shape = tuple(int(s) for s in out_shape)
        C, H, W = self.out_shape
        self.init_hw = (max(1, math.ceil(H / 4)), max(1, math.ceil(W / 4)))
        self.width = width
        self.fc = nn.Linear(latent_dim, 2 * width * self.init_hw[0] * self.init_hw[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, C, 3, padding=1), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        x = self.body(self.fc(z).view(z.shape[0], 2 * self.width, *self.init_hw))
        if x.shape[-2:] != self.out_shape[1:]:
            x = F.interpolate(x, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return x


def _student_forward(student: nn.Module, x: Tensor) -> Tensor:
    reset_neurons(student)
    return student(x)


class Synthesizer:
    """BN-guided synthesis of a batch for data-free ANN -> SNN KD with STARS' terms. [ours: the
    synthesizer follows DeepInversion (pixels) / Fast-DFKD (generator); the RCA and TAR terms are
    reconstructed from the STARS abstract; the paper's exact formulas and weights may differ]

    Objective per step, for a batch ``x`` with target classes ``y``:
    ``bn_weight L_BN + ce_weight CE(teacher(x), y) + rca_weight L_RCA + tar_weight L_TAR``
    (:func:`bn_matching_loss`, :func:`relational_consistency_loss`, :func:`tail_aware_regularization`).
    RCA needs a student; without one it is skipped. ``rca_weight`` is signed (< 0: adversarial).
    Defaults [ours]: all weights 1, k = 2, kappa = 0.1; Adam with DeepInversion's betas (0.5, 0.9) at
    lr 0.1 on pixels, or Adam(1e-3, betas (0.5, 0.999)) on the generator.

    * ``mode="pixel"`` (DeepInversion): every :meth:`synthesize` call starts from ``x ~ N(0, 1)`` and
      optimises the pixels for ``steps`` steps.
    * ``mode="generator"`` (Fast-DFKD-style, small): a persistent generator (``generator`` or a
      :class:`SmallGenerator`) is trained for ``steps`` steps on fresh latents every call; the batch it
      returns is generated from those latents.

    The teacher is frozen at construction (``requires_grad_(False)``) and run in eval mode during
    synthesis (its BN normalises with running statistics; the hook records batch statistics). The
    student is run in eval mode during synthesis (its BN running statistics are not touched) and its
    neurons are reset before every forward. It takes the image batch ``[B, C, H, W]`` and returns
    logits ``[T, B, K]`` or ``[B, K]`` (encoding over time is the student's business).
    ``teacher_feature_fn`` / ``student_feature_fn`` (``x -> features``) replace the logits in RCA
    (e.g. penultimate features); they cost an extra forward each.
    """

    MODES = ("pixel", "generator")

    def __init__(self, teacher: nn.Module, input_shape: Sequence[int], num_classes: int, *, batch_size: int = 64,
                 steps: int = 200, lr: Optional[float] = None, bn_weight: float = 1.0, ce_weight: float = 1.0,
                 rca_weight: float = 1.0, tar_weight: float = 1.0, tar_k: float = 2.0, tar_kappa: float = 0.1,
                 bn_layer_weights: Optional[Sequence[float]] = None, mode: str = "pixel",
                 generator: Optional[nn.Module] = None, latent_dim: int = 64,
                 teacher_feature_fn: Optional[Callable[[Tensor], Tensor]] = None,
                 student_feature_fn: Optional[Callable[[Tensor], Tensor]] = None,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                 rng: Optional[torch.Generator] = None):
        if mode not in self.MODES:
            raise ValueError(f"Synthesizer: mode={mode!r}; choose 'pixel' or 'generator'")
        for name, v in (("batch_size", batch_size), ("steps", steps), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"Synthesizer: {name} must be a positive int, got {v!r}")
        for name, v in (("bn_weight", bn_weight), ("ce_weight", ce_weight), ("rca_weight", rca_weight),
                        ("tar_weight", tar_weight)):
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
                raise ValueError(f"Synthesizer: {name} must be a finite number, got {v!r}")
        self.teacher = teacher.requires_grad_(False)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes, self.batch_size, self.steps, self.mode = num_classes, batch_size, steps, mode
        self.bn_weight, self.ce_weight, self.rca_weight, self.tar_weight = \
            float(bn_weight), float(ce_weight), float(rca_weight), float(tar_weight)
        self.tar_k, self.tar_kappa, self.bn_layer_weights = tar_k, tar_kappa, bn_layer_weights
        self.teacher_feature_fn, self.student_feature_fn = teacher_feature_fn, student_feature_fn
        if device is None:
            device = next(iter(teacher.parameters()), torch.empty(0)).device
        self.device, self.dtype, self.rng = torch.device(device), dtype, rng
        self.hook = BNStatisticsHook(teacher, record_outputs=self.tar_weight != 0)
        self.hook.enabled = False
        self.history: List[dict] = []
        self.generator = None
        if mode == "generator":
            if len(self.input_shape) != 3 and generator is None:
                raise ValueError("Synthesizer: the default generator makes images (C, H, W); pass generator=")
            self.latent_dim = latent_dim
            self.generator = (generator if generator is not None else SmallGenerator(latent_dim, self.input_shape))
            self.generator = self.generator.to(self.device, self.dtype)
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=1e-3 if lr is None else lr,
                                              betas=(0.5, 0.999))
        self.lr = (0.1 if lr is None else lr) if mode == "pixel" else None

    # -- the objective ---------------------------------------------------------------------------
    def loss_terms(self, x: Tensor, y: Tensor, student: Optional[nn.Module] = None) -> dict:
        """The synthesis objective's terms on batch ``x`` (with graph): ``bn``, ``ce``, ``tar``,
        ``rca`` (with a student) and their weighted sum ``total``. Teacher (and student) must be in
        the mode you want; :meth:`synthesize` puts both in eval mode."""
        self.hook.clear()
        self.hook.enabled = True
        try:
            teacher_logits = self.teacher(x)
        finally:
            self.hook.enabled = False
        terms = {"bn": bn_matching_loss(self.hook, self.bn_layer_weights),
                 "ce": F.cross_entropy(teacher_logits.float(), y)}
        if self.tar_weight != 0:
            terms["tar"] = tail_aware_regularization(self.hook, k=self.tar_k, kappa=self.tar_kappa)
        if student is not None and self.rca_weight != 0:
            t_feat = teacher_logits if self.teacher_feature_fn is None else self.teacher_feature_fn(x)
            if self.student_feature_fn is None:
                s_feat = _student_forward(student, x)
            else:
                reset_neurons(student)
                s_feat = self.student_feature_fn(x)
            terms["rca"] = relational_consistency_loss(t_feat, s_feat)
        self.hook.clear()  # drop the recorded outputs (the graph keeps what the backward needs)
        weights = {"bn": self.bn_weight, "ce": self.ce_weight, "tar": self.tar_weight, "rca": self.rca_weight}
        total = None
        for name, value in terms.items():
            v = weights[name] * value
            total = v if total is None else total + v
        terms["total"] = total
        return terms

    def _rng_device(self) -> torch.device:
        return self.rng.device if self.rng is not None else self.device

    def sample_targets(self) -> Tensor:
        """Uniformly random target classes ``[batch_size]`` (from ``rng`` if given)."""
        return torch.randint(0, self.num_classes, (self.batch_size,), generator=self.rng,
                             device=self._rng_device()).to(self.device)

    def _randn(self, *shape) -> Tensor:
        return torch.randn(*shape, generator=self.rng, device=self._rng_device(), dtype=self.dtype).to(self.device)

    # -- synthesis -------------------------------------------------------------------------------
    def synthesize(self, student: Optional[nn.Module] = None, targets: Optional[Tensor] = None,
                   steps: Optional[int] = None):
        """Synthesise one batch; returns ``(x, y)`` (``x`` detached). Per-step float values of the
        terms are appended to :attr:`history` (one list per call)."""
        steps = self.steps if steps is None else steps
        y = self.sample_targets() if targets is None else targets.to(self.device)
        if y.shape != (self.batch_size,):
            raise ValueError(f"Synthesizer.synthesize: targets must be [batch_size] = ({self.batch_size},), "
                             f"got {tuple(y.shape)}")
        log: List[dict] = []
        self.history.append(log)
        with ExitStack() as stack:
            stack.enter_context(training_mode(self.teacher, False))
            if student is not None:
                stack.enter_context(training_mode(student, False))
            if self.mode == "pixel":
                x = self._randn(self.batch_size, *self.input_shape).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=self.lr, betas=(0.5, 0.9))
                for _ in range(steps):
                    terms = self.loss_terms(x, y, student)
                    (grad,) = torch.autograd.grad(terms["total"], [x])
                    opt.zero_grad(set_to_none=True)
                    x.grad = grad
                    opt.step()
                    log.append({k: float(v.detach()) for k, v in terms.items()})
                return x.detach(), y
            z = self._randn(self.batch_size, self.latent_dim)
            params = [p for p in self.generator.parameters() if p.requires_grad]
            self.generator.train()
            for _ in range(steps):
                terms = self.loss_terms(self.generator(z), y, student)
                grads = torch.autograd.grad(terms["total"], params)
                self.optimizer.zero_grad(set_to_none=True)
                for p, g in zip(params, grads):
                    p.grad = g
                self.optimizer.step()
                log.append({k: float(v.detach()) for k, v in terms.items()})
            with torch.no_grad():
                x = self.generator(z)
            return x.detach(), y


def train_student_step(student: nn.Module, x_syn: Tensor, teacher: nn.Module, *,
                       optimizer: Optional[torch.optim.Optimizer] = None,
                       kd_loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None, temperature: float = 4.0,
                       backend: str = "auto") -> Tensor:
    """One student step on a synthetic batch: ``kd_loss(student(x_syn), teacher(x_syn))``, by default
    Hinton KD on the student's time-averaged logits (:func:`snnkd_fast.losses.kd_kl`, tau = 4).
    [ours: STARS' abstract names no student loss]

    The teacher runs in eval mode without gradient; the student in train mode, its neurons reset
    first. With ``optimizer`` the step is taken (zero_grad, backward, step) and the detached loss is
    returned; without one the loss is returned with its graph for the caller to backpropagate.
    """
    with training_mode(teacher, False), torch.no_grad():
        teacher_logits = teacher(x_syn)
    student.train()
    student_logits = _student_forward(student, x_syn)
    if kd_loss is None:
        loss = kd_kl(student_logits, teacher_logits.to(student_logits.dtype), temperature=temperature,
                     backend=backend)
    else:
        loss = kd_loss(student_logits, teacher_logits)
    if optimizer is None:
        return loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


__all__ = ["BNRecord", "BNStatisticsHook", "bn_matching_loss", "relational_gram", "relational_consistency_loss",
           "gaussian_tail_mass", "soft_tail_exceedance", "tail_aware_regularization", "SmallGenerator",
           "Synthesizer", "train_student_step"]
