"""Helpers for the fused-loss tests: one table of the losses under test, and a runner that returns
the loss and the gradients of student and teacher, so every test compares the same things."""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import snnkd_fast.losses as L
from snnkd_fast.kd import reference as ref
from snnkd_fast.kd.op import nld_noise


@dataclass
class LossCase:
    name: str
    fn: Callable                      # the public loss
    kwargs: dict = field(default_factory=dict)
    nld: bool = False                 # the reference needs the kernel's noise
    per_timestep: bool = True         # NLD only: rows are (t, b) rather than time-averaged samples

    def reference(self, student, teacher, seed_backend, reduction):
        """The reference loss; NLD's is fed the noise the kernel backend ``seed_backend`` draws."""
        if not self.nld:
            return self.fn(student, teacher, backend="torch", reduction=reduction, **self.kwargs)
        acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        opts = {k: v for k, v in self.kwargs.items() if k not in ("per_timestep", "seed")}
        rows_input = student if self.per_timestep else student.to(acc).mean(0, keepdim=True)
        if not self.per_timestep and teacher.dim() == 3:
            teacher = teacher.to(acc).mean(0)
        noise = nld_noise(torch.tensor(self.kwargs["seed"], device=student.device), rows_input.shape, seed_backend)
        rows = ref.nld_loss_reference(rows_input, teacher, noise=noise, per_timestep=True, reduction="none", **opts)
        return ref.reduce_rows(rows if self.per_timestep else rows[0], reduction, student.shape[-1])


CASES = [
    LossCase("kd_kl", L.kd_kl, {"temperature": 3.0}),
    LossCase("per_timestep_kl", L.per_timestep_kl, {"temperature": 2.0}),
    LossCase("tser", L.tser_loss, {"temperature": 2.0, "entropy_weight": 0.3, "entropy_temperature": 1.5}),
    # the default entropy temperature (= temperature): the kernels reuse the KL's softmax for the entropy
    LossCase("tser_shared_softmax", L.tser_loss, {"temperature": 2.0, "entropy_weight": 0.3}),
    LossCase("hta", L.hta_kl, {"temperature": 2.0, "head_threshold": 0.6}),
    LossCase("hta_mean_logits", L.hta_kl, {"temperature": 2.0, "time_reduction": "mean_logits"}),
    LossCase("nld", L.nld_loss, {"temperature": 2.0, "seed": 7, "per_timestep": False}, nld=True,
             per_timestep=False),
    LossCase("nld_fixed_std_per_t", L.nld_loss, {"temperature": 2.0, "seed": 7, "noise_std": 0.7,
                                                 "noise_weight": 0.3, "per_timestep": True}, nld=True),
    LossCase("nld_additive", L.nld_loss, {"temperature": 2.0, "seed": 7, "noise_std": 0.5, "mode": "additive",
                                          "per_timestep": True}, nld=True),
]
CASE_IDS = [c.name for c in CASES]


@dataclass
class LossRun:
    loss: torch.Tensor
    grad_student: torch.Tensor
    grad_teacher: Optional[torch.Tensor]


def run_loss(case: LossCase, student, teacher, backend: str, reduction="batchmean", teacher_grad=True,
             seed_backend: str = "cpp", transform=None) -> LossRun:
    """Loss and gradients w.r.t. the given (leaf) student and teacher. ``transform(student, teacher)``
    may view them differently (non-contiguous, expanded) before the loss; with reduction="none" the
    rows are weighted by a fixed ramp so that every row's gradient is checked."""
    s_leaf = student.detach().clone().requires_grad_(True)
    t_leaf = teacher.detach().clone().requires_grad_(teacher_grad)
    s_in, t_in = transform(s_leaf, t_leaf) if transform is not None else (s_leaf, t_leaf)
    if backend == "torch":
        loss = case.reference(s_in, t_in, seed_backend, reduction)
    else:
        loss = case.fn(s_in, t_in, backend=backend, reduction=reduction, **case.kwargs)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    (loss * weights).sum().backward()
    return LossRun(loss.detach(), s_leaf.grad, t_leaf.grad)


def float64_head_order(teacher, temperature=4.0):
    """HTA's class order of each teacher row (logit descending, ties to the lower index) and the
    inclusive cumulative probability along it, in float64: (order, cumulative), both [rows, C]."""
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    order = torch.sort(teacher, dim=-1, descending=True, stable=True).indices
    return order, p.gather(-1, order).cumsum(-1)


def thresholds_beside_a_cumulative_sum(teacher, fractions, margin):
    """(row, threshold, expected crossing class) for thresholds `margin` below and above the float64
    cumulative probability of the class where each row's cumulative sum first reaches each fraction:
    that class crosses, resp. the next."""
    order, cumulative = float64_head_order(teacher)
    for fraction in fractions:
        for row in range(teacher.shape[0]):
            k = int((cumulative[row] < fraction).sum())
            for offset, expected in ((-margin, order[row, k]), (margin, order[row, k + 1])):
                yield row, float(cumulative[row, k]) + offset, int(expected)
