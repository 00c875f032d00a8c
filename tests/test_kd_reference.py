"""The KD-loss references themselves (snnkd_fast/kd/reference.py), before any kernel is compared with them.

* gradcheck in float64 of every loss w.r.t. student *and* teacher, for every reduction;
* known values: torch's own ``kl_div``, ``Categorical.entropy``, a transcription of CKDSNN's released
  ``soft_loss_smooth``, and the identities between the losses (T = 1, lambda = 0, noise_weight = 0);
* autograd of the references equals the closed-form gradients of methods.md, which the kernels
  implement -- so a kernel that matches the reference implements the spec's formulas;
* HTA's tie rule, its class-order mask (joint permutation invariance) and its 0/0 weight fallback;
* extreme logits (+-1e4, a -inf masked class), C = 1, reductions and dtypes.

Chain rule used by the closed forms: with ``s = z_s / tau`` and a row loss ``l = tau^2 KL(.)``,
``dl/dz_s = tau^2 * (1/tau) * dKL/ds = tau * dKL/ds`` (same for the teacher with ``u = z_t / tau``);
an entropy term at ``tau_H`` without ``tau^2`` gives ``dH/dz = (1/tau_H) dH/ds``. The closed-form
tests backpropagate a random upstream gradient G through the per-row losses (reduction "none"), so
they do not depend on the reduction; time-averaged losses add a factor 1/T per timestep.

HTA's weights are detached but are *not* piecewise constant: they move continuously with p and q.
Finite differences see that motion and autograd (by the spec) does not, so HTA is gradchecked with
the weights frozen at the unperturbed inputs; the closed-form test pins the detached semantics.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from snnkd_fast.kd import reference as ref
from snnkd_fast.kd.reference import (hta_head_mask_reference, hta_kl_reference, hta_weights_reference,
                                     kd_kl_reference, nld_loss_reference, nld_noise, per_timestep_kl_reference,
                                     reduce_rows, student_entropy_reference, tser_loss_reference)

from tolerances import assert_grad_close, assert_value_close

F64 = torch.float64
T, B, C = 2, 3, 5
REDUCTIONS = ["none", "sum", "batchmean", "mean"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


def _noise(shape):
    """A fixed eps for NLD: the same tensor on every call (gradcheck re-evaluates the loss)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=F64)


# name -> (loss(student, teacher, reduction), per-timestep rows?). Non-default knobs on purpose.
LOSSES = {
    "kd_kl": (lambda s, t, r: kd_kl_reference(s, t, temperature=3.0, reduction=r), False),
    "per_timestep_kl": (lambda s, t, r: per_timestep_kl_reference(s, t, temperature=3.0, reduction=r), True),
    "tser": (lambda s, t, r: tser_loss_reference(s, t, temperature=3.0, entropy_weight=0.3, entropy_temperature=1.5,
                                                 reduction=r), True),
    "hta": (lambda s, t, r: hta_kl_reference(s, t, temperature=3.0, head_threshold=0.6, reduction=r), True),
    "hta_mean_logits": (lambda s, t, r: hta_kl_reference(s, t, temperature=3.0, head_threshold=0.6,
                                                         time_reduction="mean_logits", reduction=r), False),
    "nld": (lambda s, t, r: nld_loss_reference(s, t, temperature=2.0, noise_weight=0.3, noise=_noise(s.shape[-2:]),
                                               reduction=r), False),
    "nld_fixed_std": (lambda s, t, r: nld_loss_reference(s, t, temperature=2.0, noise_weight=0.3, noise_std=0.7,
                                                         noise=_noise(s.shape[-2:]), reduction=r), False),
    "nld_per_timestep": (lambda s, t, r: nld_loss_reference(s, t, temperature=2.0, noise_weight=0.3,
                                                            noise=_noise(s.shape), per_timestep=True,
                                                            reduction=r), True),
    "nld_additive": (lambda s, t, r: nld_loss_reference(s, t, temperature=2.0, noise_std=0.5,
                                                        noise=_noise(s.shape[-2:]), mode="additive",
                                                        reduction=r), False),
}
NO_INF_LOSSES = [name for name in LOSSES if not name.startswith("nld")]  # NLD needs finite logits (mean, variance)


def _freeze_hta_weights(monkeypatch):
    """Make hta_kl_reference reuse the weights of its first call (detached weights as constants)."""
    original = ref.hta_weights_reference
    frozen = []

    def weights(p, q, head):
        if not frozen:
            frozen.append(original(p, q, head))
        return frozen[0]

    monkeypatch.setattr(ref, "hta_weights_reference", weights)


def _inputs(teacher_steps, dtype=F64, classes=C, scale=2.0):
    s = (torch.randn(T, B, classes, dtype=F64) * scale).to(dtype).requires_grad_(True)
    t_shape = (teacher_steps, B, classes) if teacher_steps else (B, classes)
    t = (torch.randn(t_shape, dtype=F64) * scale).to(dtype).requires_grad_(True)
    return s, t


def _grads(loss, s, t, upstream=None):
    return torch.autograd.grad(loss, (s, t), grad_outputs=upstream)


# ----------------------------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_student_and_teacher(name, reduction, teacher_steps, monkeypatch):
    s, t = _inputs(teacher_steps)
    loss_fn = LOSSES[name][0]
    fn = lambda s, t: loss_fn(s, t, reduction)  # noqa: E731
    if name.startswith("hta"):
        _freeze_hta_weights(monkeypatch)
        fn(s, t)  # records the weights at the unperturbed inputs
    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-8, rtol=1e-6)


# -------------------------------------------------------------------------------------------- known values

@pytest.mark.parametrize("name", LOSSES)
def test_identical_distributions_give_zero(name):
    s = torch.randn(T, B, C, dtype=F64) * 2
    t = s + 3.25  # shifted logits: the same distribution
    if name == "tser":  # no entropy term
        loss = tser_loss_reference(s, t, entropy_weight=0.0)
    elif name == "nld_additive":  # no noise
        loss = nld_loss_reference(s, t, noise_std=0.0, noise=_noise((B, C)), mode="additive")
    elif name.startswith("nld"):  # no noise distribution in the mixture
        per_timestep = name == "nld_per_timestep"
        loss = nld_loss_reference(s, t, noise_weight=0.0, noise=_noise(s.shape if per_timestep else (B, C)),
                                  per_timestep=per_timestep)
    else:
        loss = LOSSES[name][0](s, t, "batchmean")
    assert_value_close(loss, torch.zeros((), dtype=F64), F64, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("student_steps", [0, T])
def test_kd_kl_equals_torch_kl_div(reduction, student_steps):
    tau = 3.0
    s = torch.randn(student_steps, B, C, dtype=F64) if student_steps else torch.randn(B, C, dtype=F64)
    t = torch.randn(B, C, dtype=F64)
    s_mean = s.mean(0) if student_steps else s
    with warnings.catch_warnings():  # torch warns that its "mean" divides by B * C: that is what we check
        warnings.simplefilter("ignore", UserWarning)
        expected = F.kl_div(F.log_softmax(s_mean / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                            reduction=reduction) * tau ** 2
    if reduction == "none":
        expected = expected.sum(-1)
    assert_value_close(kd_kl_reference(s, t, temperature=tau, reduction=reduction), expected, F64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_per_timestep_kl_is_kd_kl_per_step(reduction):
    tau = 2.5
    s, t = torch.randn(T, B, C, dtype=F64), torch.randn(B, C, dtype=F64)
    # T = 1 is kd_kl.
    assert_value_close(per_timestep_kl_reference(s[:1], t, temperature=tau, reduction=reduction),
                       kd_kl_reference(s[0], t, temperature=tau, reduction=reduction).unsqueeze(0)
                       if reduction == "none" else kd_kl_reference(s[0], t, temperature=tau, reduction=reduction), F64)
    # General T: the time mean of kd_kl at each step (teacher broadcast, or one teacher per step).
    t_seq = torch.randn(T, B, C, dtype=F64)
    for teacher, teacher_at in ((t, lambda i: t), (t_seq, lambda i: t_seq[i])):
        per_step = [kd_kl_reference(s[i], teacher_at(i), temperature=tau, reduction=reduction) for i in range(T)]
        expected = torch.stack(per_step) if reduction == "none" else torch.stack(per_step).mean()
        assert_value_close(per_timestep_kl_reference(s, teacher, temperature=tau, reduction=reduction), expected, F64)


@pytest.mark.parametrize("teacher_steps", [0, T])
def test_tser_is_per_timestep_kl_minus_entropy(teacher_steps):
    s, t = _inputs(teacher_steps)
    assert_value_close(tser_loss_reference(s, t, temperature=3.0, entropy_weight=0.0),
                       per_timestep_kl_reference(s, t, temperature=3.0), F64)
    lam, tau_h = 0.4, 1.7
    entropy = torch.distributions.Categorical(logits=s / tau_h).entropy()  # [T, B]
    expected = per_timestep_kl_reference(s, t, temperature=3.0, reduction="none") - lam * entropy
    assert_value_close(tser_loss_reference(s, t, temperature=3.0, entropy_weight=lam, entropy_temperature=tau_h,
                                           reduction="none"), expected, F64)
    # entropy_temperature=None means tau.
    assert_value_close(tser_loss_reference(s, t, temperature=3.0, entropy_weight=lam),
                       tser_loss_reference(s, t, temperature=3.0, entropy_weight=lam, entropy_temperature=3.0), F64)


def test_student_entropy():
    assert_value_close(student_entropy_reference(torch.full((4, 7), 2.5, dtype=F64), 3.0),
                       torch.full((4,), math.log(7), dtype=F64), F64, "uniform")
    z = torch.randn(T, B, C, dtype=F64)
    expected = torch.distributions.Categorical(logits=z / 1.5).entropy()
    assert_value_close(student_entropy_reference(z, 1.5), expected, F64)
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=F64)
    assert_value_close(student_entropy_reference(one_hot, 1.0), torch.zeros(1, dtype=F64), F64, "one-hot")


def test_reduce_rows():
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)  # [T=2, B=3], C = 5
    assert torch.equal(reduce_rows(rows, "none", 5), rows)
    assert reduce_rows(rows, "sum", 5).item() == pytest.approx(21 / 2)
    assert reduce_rows(rows, "batchmean", 5).item() == pytest.approx(21 / 6)
    assert reduce_rows(rows, "mean", 5).item() == pytest.approx(21 / 30)
    assert reduce_rows(rows[0], "sum", 5).item() == pytest.approx(6)  # [B]: T = 1
    assert reduce_rows(rows[0], "batchmean", 5).item() == pytest.approx(2)
    assert reduce_rows(rows[0], "mean", 5).item() == pytest.approx(6 / 15)
    with pytest.raises(ValueError, match="reduction must be one of"):
        reduce_rows(rows, "average", 5)


@pytest.mark.parametrize("name", LOSSES)
def test_reductions_are_related(name):
    loss_fn, per_step = LOSSES[name]
    s, t = _inputs(T)
    rows = loss_fn(s, t, "none")
    assert rows.shape == ((T, B) if per_step else (B,))
    steps = T if per_step else 1
    assert_value_close(loss_fn(s, t, "sum"), rows.sum() / steps, F64, "sum")
    assert_value_close(loss_fn(s, t, "batchmean"), rows.sum() / (steps * B), F64, "batchmean")
    assert_value_close(loss_fn(s, t, "mean"), rows.sum() / (steps * B * C), F64, "mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64], ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_accumulation_dtype(name, dtype):
    s, t = _inputs(T, dtype=dtype)
    loss = LOSSES[name][0](s, t, "batchmean")
    acc = F64 if dtype == F64 else torch.float32
    assert loss.dtype == acc
    # The half types are upcast first, so their loss is the float32 loss of the upcast values.
    expected = LOSSES[name][0](s.detach().to(acc), t.detach().to(acc), "batchmean")
    assert torch.equal(loss.detach(), expected)
    grad_s, grad_t = _grads(loss, s, t)
    assert grad_s.dtype == dtype and grad_t.dtype == dtype
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()


# ------------------------------------------------------------------------------ closed-form gradients (spec)

def _softmax_parts(z, tau):
    log_prob = F.log_softmax(z / tau, -1)
    return log_prob, log_prob.exp()


def _forward_kl_closed_form(z_s, z_t, tau):
    """Row loss tau^2 KL(p||q): dz_s = tau (q - p); dz_t = tau p (log p - log q - KL) (xlogy at p = 0)."""
    log_q, q = _softmax_parts(z_s, tau)
    log_p, p = _softmax_parts(z_t, tau)
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    kl = (p * log_ratio).sum(-1, keepdim=True)
    return tau * (q - p), tau * p * (log_ratio - kl)


def _reverse_kl_closed_form(z_s, z_t, tau):
    """Row loss tau^2 KL(q||p): r = log q - log p, K = sum q r: dz_s = tau q (r - K); dz_t = tau (p - q)."""
    log_q, q = _softmax_parts(z_s, tau)
    log_p, p = _softmax_parts(z_t, tau)
    r = log_q - log_p
    big_k = (q * r).sum(-1, keepdim=True)
    return tau * q * (r - big_k), tau * (p - q)


def _entropy_closed_form(z, tau_h):
    """dH/dz = (1/tau_H) * (-q (log q + H))."""
    log_q, q = _softmax_parts(z, tau_h)
    entropy = -(q * log_q).sum(-1, keepdim=True)
    return -q * (log_q + entropy) / tau_h


def _teacher_grad(row_grad_t, teacher):
    """A [B, C] teacher is shared by every t: its gradient sums over t."""
    return row_grad_t.sum(0) if teacher.dim() == 2 and row_grad_t.dim() == 3 else row_grad_t


@pytest.mark.parametrize("teacher_masked", [False, True], ids=["dense", "teacher_masked_class"])
@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
@pytest.mark.parametrize("name", ["per_timestep_kl", "tser"])
def test_per_timestep_kl_and_tser_gradients_match_closed_form(name, teacher_steps, teacher_masked):
    tau, lam, tau_h = 3.0, 0.3, 1.5
    s, t = _inputs(teacher_steps)
    if teacher_masked:  # p = 0 on class 1: q there is pushed down, the teacher's gradient there is 0
        t = t.detach().index_fill(-1, torch.tensor([1]), -math.inf).requires_grad_(True)
    upstream = torch.randn(T, B, dtype=F64)
    if name == "tser":
        rows = tser_loss_reference(s, t, temperature=tau, entropy_weight=lam, entropy_temperature=tau_h,
                                   reduction="none")
    else:
        rows = per_timestep_kl_reference(s, t, temperature=tau, reduction="none")
    grad_s, grad_t = _grads(rows, s, t, upstream)
    row_s, row_t = _forward_kl_closed_form(s.detach(), t.detach(), tau)
    if name == "tser":  # the loss subtracts lambda H
        row_s = row_s - lam * _entropy_closed_form(s.detach(), tau_h)
    g = upstream[..., None]
    assert_grad_close(grad_s, g * row_s, F64, "student")
    assert_grad_close(grad_t, _teacher_grad(g * row_t, t), F64, "teacher")
    assert torch.isfinite(grad_t).all()


@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
def test_kd_kl_gradient_matches_closed_form(teacher_steps):
    tau = 3.0
    s, t = _inputs(teacher_steps)
    upstream = torch.randn(B, dtype=F64)
    grad_s, grad_t = _grads(kd_kl_reference(s, t, temperature=tau, reduction="none"), s, t, upstream)
    t_mean = t.detach().mean(0) if teacher_steps else t.detach()
    row_s, row_t = _forward_kl_closed_form(s.detach().mean(0), t_mean, tau)
    g = upstream[:, None]
    assert_grad_close(grad_s, (g * row_s / T).expand(T, B, C), F64, "student")  # d mean_t / d z[t] = 1/T
    expected_t = (g * row_t / T).expand(T, B, C) if teacher_steps else g * row_t
    assert_grad_close(grad_t, expected_t, F64, "teacher")


@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
@pytest.mark.parametrize("time_reduction", ["per_timestep", "mean_logits"])
def test_hta_gradients_match_closed_form(time_reduction, teacher_steps):
    """dl/dz_s = tau (w_h (q - p) + w_t q (r - K)), dl/dz_t = tau (w_h p (log p - log q - KL) + w_t (p - q)),
    with the weights as constants (detached)."""
    tau, mu = 3.0, 0.6
    s, t = _inputs(teacher_steps, classes=7)
    rows = hta_kl_reference(s, t, temperature=tau, head_threshold=mu, time_reduction=time_reduction,
                            reduction="none")
    upstream = torch.randn(rows.shape, dtype=F64)
    grad_s, grad_t = _grads(rows, s, t, upstream)

    z_s, z_t = s.detach(), t.detach()
    if time_reduction == "mean_logits":
        z_s, z_t = z_s.mean(0), (z_t.mean(0) if teacher_steps else z_t)
    p, q = F.softmax(z_t / tau, -1), F.softmax(z_s / tau, -1)
    w_head, w_tail = hta_weights_reference(p, q, hta_head_mask_reference(p, mu))
    w_head, w_tail = w_head[..., None], w_tail[..., None]
    fwd_s, fwd_t = _forward_kl_closed_form(z_s, z_t, tau)
    rev_s, rev_t = _reverse_kl_closed_form(z_s, z_t, tau)
    row_s = upstream[..., None] * (w_head * fwd_s + w_tail * rev_s)
    row_t = upstream[..., None] * (w_head * fwd_t + w_tail * rev_t)
    if time_reduction == "mean_logits":
        row_s = (row_s / T).expand(T, B, 7)
        row_t = (row_t / T).expand(T, B, 7) if teacher_steps else row_t
    assert_grad_close(grad_s, row_s, F64, "student")
    assert_grad_close(grad_t, _teacher_grad(row_t, t), F64, "teacher")


def _nld_closed_form(z, z_t, eps, tau, noise_weight, noise_std):
    """methods.md's NLD gradient per row: u = dl/dp_s, g = ((1-w)/tau) r (u - sum r u),
    dl/dz = (w/tau) q (u - sum q u) + (2/(C-1)) (sum g eps)(z - mu) [adaptive scale only];
    dl/dz_t = tau p_t (log p_t - log p_s - KL). Here w = 1 - noise_weight."""
    w = 1.0 - noise_weight
    num_classes = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    scale = z.var(-1, keepdim=True) if noise_std is None else noise_std
    q = F.softmax(z / tau, -1)
    r = F.softmax((mu + eps * scale) / tau, -1)
    p_s = w * q + (1 - w) * r
    log_p_t, p_t = _softmax_parts(z_t, tau)
    u = -tau ** 2 * p_t / p_s
    g = ((1 - w) / tau) * r * (u - (r * u).sum(-1, keepdim=True))
    grad_z = (w / tau) * q * (u - (q * u).sum(-1, keepdim=True))
    if noise_std is None:
        grad_z = grad_z + (2 / (num_classes - 1)) * (g * eps).sum(-1, keepdim=True) * (z - mu)
    else:  # dn/dz = 1/C: contributes sum(g)/C = 0
        assert torch.allclose(g.sum(-1), torch.zeros((), dtype=F64), atol=1e-12)
    kl = (p_t * (log_p_t - p_s.log())).sum(-1, keepdim=True)
    return grad_z, tau * p_t * (log_p_t - p_s.log() - kl)


@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
@pytest.mark.parametrize("per_timestep", [False, True], ids=["time_mean", "per_timestep"])
@pytest.mark.parametrize("noise_std", [None, 0.7], ids=["adaptive", "fixed_std"])
def test_nld_gradients_match_closed_form(noise_std, per_timestep, teacher_steps):
    tau, nw = 2.0, 0.3
    s, t = _inputs(teacher_steps)
    eps = _noise((T, B, C) if per_timestep else (B, C))
    rows = nld_loss_reference(s, t, temperature=tau, noise_weight=nw, noise_std=noise_std, noise=eps,
                              per_timestep=per_timestep, reduction="none")
    upstream = torch.randn(rows.shape, dtype=F64)
    grad_s, grad_t = _grads(rows, s, t, upstream)
    z, z_t = s.detach(), t.detach()
    if not per_timestep:
        z, z_t = z.mean(0), (z_t.mean(0) if teacher_steps else z_t)
    row_s, row_t = _nld_closed_form(z, z_t, eps, tau, nw, noise_std)
    row_s, row_t = upstream[..., None] * row_s, upstream[..., None] * row_t
    if not per_timestep:
        row_s = (row_s / T).expand(T, B, C)
        row_t = (row_t / T).expand(T, B, C) if teacher_steps else row_t
    assert_grad_close(grad_s, row_s, F64, "student")
    assert_grad_close(grad_t, _teacher_grad(row_t, t), F64, "teacher")


# ------------------------------------------------------------------------------------------------- HTA

def _probs(logits):
    return F.softmax(torch.tensor(logits, dtype=F64), -1)


def test_hta_tie_rule_lower_index_first():
    # Four exactly equal probabilities (exact in binary): cumsum 0.25, 0.5, 0.75, 1 -> head = two lowest indices.
    quarter = torch.full((4,), 0.25, dtype=F64)
    assert hta_head_mask_reference(quarter, 0.6).tolist() == [True, True, False, False]
    # Head is S < mu strictly: the class whose cumsum reaches mu exactly is tail.
    assert hta_head_mask_reference(quarter, 0.5).tolist() == [True, False, False, False]
    assert hta_head_mask_reference(quarter, 0.75).tolist() == [True, True, False, False]
    # Logits [2, 2, 2, 0, 0]: p = 0.306 each for the tie, cumsum 0.306, 0.611, 0.917.
    assert hta_head_mask_reference(_probs([2, 2, 2, 0, 0]), 0.7).tolist() == [True, True, False, False, False]
    assert hta_head_mask_reference(_probs([2, 2, 2, 0, 0]), 0.5).tolist() == [True, False, False, False, False]
    # The same tie at scattered indices: the mask is in class order, ties go to the lower indices.
    assert hta_head_mask_reference(_probs([0, 2, 0, 2, 2]), 0.7).tolist() == [False, True, False, True, False]
    assert hta_head_mask_reference(_probs([0, 2, 0, 2, 2]), 0.5).tolist() == [False, True, False, False, False]
    # Batched rows are independent.
    batch = torch.stack([_probs([2, 2, 2, 0, 0]), _probs([0, 2, 0, 2, 2])])
    assert hta_head_mask_reference(batch, 0.7).tolist() == [[True, True, False, False, False],
                                                            [False, True, False, True, False]]


def test_hta_confident_teacher_head_is_top1():
    # p_max >= mu: no cumsum is below mu, the top-1 class is forced into the head.
    assert hta_head_mask_reference(torch.tensor([0.05, 0.8, 0.05, 0.1], dtype=F64), 0.5).tolist() == \
        [False, True, False, False]
    # A tie at the top with p_max = mu: only the lower index.
    assert hta_head_mask_reference(torch.tensor([0.5, 0.5], dtype=F64), 0.5).tolist() == [True, False]
    assert hta_head_mask_reference(torch.tensor([0.125, 0.4375, 0.4375], dtype=F64), 0.4).tolist() == \
        [False, True, False]
    # The class whose cumsum crosses mu is tail: 0.25 < 0.3, then 0.5 >= 0.3.
    assert hta_head_mask_reference(torch.tensor([0.25, 0.25, 0.5], dtype=F64), 0.3).tolist() == [False, False, True]


def test_hta_mask_equals_the_sort_free_formula():
    """S_j = sum_i p_i [p_i > p_j] + sum_{i<=j} p_i [p_i = p_j]; head = S_j < mu or j = top-1 (the
    kernels' threshold search). Quantized logits make many exact ties."""
    z = torch.randint(-3, 4, (64, 9)).to(F64)
    p = F.softmax(z, -1)
    idx = torch.arange(9)
    greater = p[:, None, :] > p[:, :, None]              # [row, j, i]: p_i > p_j
    tied_before = (p[:, None, :] == p[:, :, None]) & (idx[None, :] <= idx[:, None])[None]
    cum = (p[:, None, :] * (greater | tied_before)).sum(-1)
    for mu in (0.3, 0.5, 0.8):
        keep = ((cum - mu).abs() > 1e-9).all(-1)  # rows where the two summation orders cannot disagree
        top1 = F.one_hot(torch.argmax(p, -1), 9).bool()  # argmax returns the first maximum
        expected = (cum < mu) | top1
        assert keep.sum() > 32
        assert torch.equal(hta_head_mask_reference(p, mu)[keep], expected[keep])


@pytest.mark.parametrize("time_reduction", ["per_timestep", "mean_logits"])
@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
def test_hta_joint_class_permutation(teacher_steps, time_reduction):
    """A joint permutation of the classes leaves loss unchanged and permutes the gradients (a mask
    built in sorted order but applied in class order fails this)."""
    s, t = _inputs(teacher_steps, classes=8)
    perm = torch.randperm(8)
    loss_fn = lambda s, t: hta_kl_reference(s, t, temperature=2.0, head_threshold=0.5,  # noqa: E731
                                            time_reduction=time_reduction, reduction="sum")
    loss = loss_fn(s, t)
    grad_s, grad_t = _grads(loss, s, t)
    s_perm = s.detach()[..., perm].requires_grad_(True)
    t_perm = t.detach()[..., perm].requires_grad_(True)
    loss_perm = loss_fn(s_perm, t_perm)
    grad_s_perm, grad_t_perm = _grads(loss_perm, s_perm, t_perm)
    assert_value_close(loss_perm, loss, F64)
    assert_grad_close(grad_s_perm, grad_s[..., perm], F64, "student")
    assert_grad_close(grad_t_perm, grad_t[..., perm], F64, "teacher")
    p = F.softmax(t.detach() / 2.0, -1)
    assert torch.equal(hta_head_mask_reference(p[..., perm], 0.5), hta_head_mask_reference(p, 0.5)[..., perm])
    # The weights differ from 1/2 here, so a wrong head/tail split would change the loss.
    q = F.softmax(s.detach() / 2.0, -1)
    w_head, _ = hta_weights_reference(p, q, hta_head_mask_reference(p, 0.5))
    assert ((w_head - 0.5).abs() > 1e-3).any()


@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
def test_hta_student_equals_teacher(teacher_steps):
    z = torch.randn(T, B, C, dtype=F64)
    if teacher_steps == 0:  # an ANN teacher: the student repeats it at every step
        z = z[0].expand(T, B, C)
    s = z.clone().requires_grad_(True)
    t = (z if teacher_steps else z[0]).clone().requires_grad_(True)
    loss = hta_kl_reference(s, t, reduction="sum")
    grad_s, grad_t = _grads(loss, s, t)
    assert loss.item() == 0.0
    assert torch.equal(grad_s, torch.zeros_like(grad_s)) and torch.equal(grad_t, torch.zeros_like(grad_t))
    p = F.softmax(t.detach() / 4.0, -1)
    w_head, w_tail = hta_weights_reference(p, p, hta_head_mask_reference(p, 0.5))
    assert torch.equal(w_head, torch.full_like(w_head, 0.5)) and torch.equal(w_tail, torch.full_like(w_tail, 0.5))


def test_hta_weights_are_the_gap_ratio_and_detached():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=F64, requires_grad=True)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=F64, requires_grad=True)
    head = hta_head_mask_reference(p, 0.5)  # cumsum 0.5 -> only the forced top-1
    assert head.tolist() == [True, False, False]
    w_head, w_tail = hta_weights_reference(p, q, head)
    assert w_head.item() == pytest.approx(0.3 / 0.6) and w_tail.item() == pytest.approx(0.3 / 0.6)
    assert not w_head.requires_grad and not w_tail.requires_grad
    w_head, w_tail = hta_weights_reference(p, torch.tensor([0.4, 0.4, 0.2], dtype=F64), head)
    assert w_head.item() == pytest.approx(0.5) and w_tail.item() == pytest.approx(0.5)  # gaps 0.1 | 0.1 + 0
    w_head, _ = hta_weights_reference(p, torch.tensor([0.2, 0.4, 0.4], dtype=F64), head)
    assert w_head.item() == pytest.approx(0.3 / 0.6)
    # The loss with known weights: tau^2 (w_h KL(p||q) + w_t KL(q||p)).
    z_t, z_s = torch.tensor([[2.0, 0.5, -1.0]], dtype=F64), torch.tensor([[[0.0, 1.0, 0.5]]], dtype=F64)
    p, q = F.softmax(z_t / 2.0, -1), F.softmax(z_s[0] / 2.0, -1)
    w_head, w_tail = hta_weights_reference(p, q, hta_head_mask_reference(p, 0.5))
    kl_f, kl_r = (p * (p / q).log()).sum(), (q * (q / p).log()).sum()
    assert_value_close(hta_kl_reference(z_s, z_t, temperature=2.0, reduction="sum"),
                       4.0 * (w_head * kl_f + w_tail * kl_r).sum(), F64)


# ----------------------------------------------------------------------------------------------- extremes

def _quantized(shape, scale=3.0):
    """Multiples of 1/64: adding +-1e4-size shifts is exact in float32 and float64."""
    return (torch.randn(shape, dtype=F64) * scale * 64).round() / 64


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
@pytest.mark.parametrize("name", LOSSES)
def test_extreme_logits_are_finite_and_shift_invariant(name, teacher_steps, dtype):
    loss_fn = LOSSES[name][0]
    s = _quantized((T, B, C))
    t = _quantized((teacher_steps, B, C) if teacher_steps else (B, C))
    s[0, 0, 1], s[1, 1, 3], s[..., 2, 4] = 1e4, -1e4, -1e4  # confident / saturated rows
    t[..., 0, 1], t[..., 1, 0], t[..., 2, 2] = -1e4, 1e4, 1e4
    shift_s = (torch.randint(-8, 9, (T, B, 1)) * 2500.0).to(F64)
    shift_t = (torch.randint(-8, 9, t.shape[:-1] + (1,)) * 2500.0).to(F64)
    if name in ("kd_kl", "hta_mean_logits", "nld", "nld_fixed_std", "nld_additive"):
        shift_s = shift_s[:1].expand(T, B, 1)  # time-averaged: the shift must be per (b), not per (t, b)
        shift_t = shift_t[:1].expand(t.shape[:-1] + (1,))
    results = []
    for z_s, z_t, z_dtype in ((s, t, F64), (s, t, dtype), (s + shift_s, t + shift_t, dtype)):
        z_s = z_s.to(z_dtype).requires_grad_(True)  # exact: multiples of 1/64 below 2^17
        z_t = z_t.to(z_dtype).requires_grad_(True)
        loss = loss_fn(z_s, z_t, "batchmean")
        results.append((loss, *_grads(loss, z_s, z_t)))
    exact, unshifted, shifted = results
    for value in unshifted + shifted:
        assert torch.isfinite(value).all()
    # float32: tau = 3 rounds s = z / tau to its ulp (2.4e-4 at 3333, 1e-3 at 1e4 after the shift), so
    # the saturated rows' probabilities carry that much relative error before any arithmetic of ours.
    tol = 1e-9 if dtype == F64 else 3e-3
    for what, want, got_unshifted, got_shifted in zip(("loss", "grad student", "grad teacher"), exact, unshifted,
                                                      shifted):
        torch.testing.assert_close(got_unshifted.double(), want, rtol=tol, atol=tol,
                                   msg=lambda m: f"{what} {dtype} vs float64: {m}")
        torch.testing.assert_close(got_shifted.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{what} shifted: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("name", NO_INF_LOSSES)
def test_masked_class_is_a_dropped_class(name, dtype):
    """A class at -inf in teacher and student (p = q = 0) adds nothing: loss and gradients equal those
    of the inputs without that class, and its own gradients are 0."""
    loss_fn = LOSSES[name][0]
    s, t = torch.randn(T, B, C, dtype=F64) * 2, torch.randn(T, B, C, dtype=F64) * 2
    s[..., 2], t[..., 2] = -math.inf, -math.inf
    keep = [0, 1, 3, 4]
    s_full, t_full = s.to(dtype).requires_grad_(True), t.to(dtype).requires_grad_(True)
    s_kept, t_kept = s[..., keep].to(dtype).requires_grad_(True), t[..., keep].to(dtype).requires_grad_(True)
    loss_full, loss_kept = loss_fn(s_full, t_full, "batchmean"), loss_fn(s_kept, t_kept, "batchmean")
    grads_full, grads_kept = _grads(loss_full, s_full, t_full), _grads(loss_kept, s_kept, t_kept)
    assert torch.isfinite(loss_full)
    assert_value_close(loss_full, loss_kept, dtype, "loss")
    for full, kept, what in zip(grads_full, grads_kept, ("student", "teacher")):
        assert torch.isfinite(full).all(), what
        assert torch.equal(full[..., 2], torch.zeros_like(full[..., 2])), what
        assert_grad_close(full[..., keep], kept, dtype, what)


def test_student_masked_where_teacher_is_not_is_infinite():
    s, t = torch.randn(B, C, dtype=F64), torch.randn(B, C, dtype=F64)
    s[0, 3] = -math.inf  # q = 0 where p > 0: KL(p || q) = +inf, the correct value
    assert kd_kl_reference(s, t).item() == math.inf
    # Teacher masked where the student is not: forward KL finite (p = 0 adds 0).
    assert math.isfinite(kd_kl_reference(t, s).item())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_one_class_gives_zero(name, reduction):
    s, t = _inputs(T, classes=1)
    loss = LOSSES[name][0](s, t, reduction)
    # Exactly 0 except NLD, whose mixture log(w e^0 + (1-w) e^0) rounds to a few ulp.
    assert_value_close(loss, torch.zeros_like(loss), F64, "loss")
    grad_s, grad_t = _grads(loss.sum(), s, t)
    assert_grad_close(grad_s, torch.zeros_like(grad_s), F64, "student")
    assert_grad_close(grad_t, torch.zeros_like(grad_t), F64, "teacher")


# ------------------------------------------------------------------------------------------------- NLD

@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
@pytest.mark.parametrize("noise_std", [None, 0.7], ids=["adaptive", "fixed_std"])
def test_nld_without_noise_weight_is_kd_kl(noise_std, teacher_steps):
    s, t = _inputs(teacher_steps)
    loss = nld_loss_reference(s, t, temperature=2.0, noise_weight=0.0, noise_std=noise_std, noise=_noise((B, C)))
    expected = kd_kl_reference(s, t, temperature=2.0)
    assert_value_close(loss, expected, F64)
    for got, want, what in zip(_grads(loss, s, t), _grads(expected, s, t), ("student", "teacher")):
        assert_grad_close(got, want, F64, what)


def test_nld_matches_ckdsnn_soft_loss_smooth():
    """Transcription of CKDSNN's released utils/utils.py (soft_loss_smooth -> smooth_noise_softmax ->
    generate_gaussian_noise) with the noise made explicit; their `weight` is our 1 - noise_weight."""
    tau, weight = 2.0, 0.9
    out, out_t, eps = torch.randn(B, 10, dtype=F64) * 3, torch.randn(B, 10, dtype=F64) * 3, _noise((B, 10))
    soft_targets = F.softmax(out_t / tau, dim=1)
    smoothed_probs = F.softmax(out / tau, dim=1)
    mean, stdv = out.mean(dim=-1, keepdim=True), out.std(dim=-1, keepdim=True)
    noisy_probs = F.softmax((mean + eps * stdv ** 2) / tau, dim=1)
    combined = weight * smoothed_probs + (1 - weight) * noisy_probs
    expected = F.kl_div(combined.log(), soft_targets, reduction="batchmean") * tau ** 2
    assert_value_close(nld_loss_reference(out, out_t, temperature=tau, noise=eps), expected, F64)
    # A [T, B, C] student is averaged over time first.
    seq = torch.stack([out - 1.0, out + 1.0])
    assert_value_close(nld_loss_reference(seq, out_t, temperature=tau, noise=eps), expected, F64)


def test_nld_noise_paths():
    s, t = _inputs(T)
    eps = _noise((B, C))
    kw = dict(temperature=2.0, noise_weight=0.25)
    # Fixed noise: deterministic; other noise: another loss.
    first, second = nld_loss_reference(s, t, noise=eps, **kw), nld_loss_reference(s, t, noise=eps.clone(), **kw)
    assert torch.equal(first, second)
    assert not torch.allclose(first, nld_loss_reference(s, t, noise=-eps, **kw))
    # noise_std = 0 (or eps = 0): the noise logits are the row mean, softmax(n) is uniform.
    z, p_t = s.detach().mean(0), F.softmax(t.detach().mean(0) / 2.0, -1)  # both [T, B, C]: time-averaged
    p_s = 0.75 * F.softmax(z / 2.0, -1) + 0.25 / C
    uniform_mix = 4.0 * (p_t * (p_t / p_s).log()).sum(-1).mean()
    assert_value_close(nld_loss_reference(s, t, noise=eps, noise_std=0.0, **kw), uniform_mix, F64)
    assert_value_close(nld_loss_reference(s, t, noise=torch.zeros_like(eps), **kw), uniform_mix, F64)
    # Float noise_std: n = mu + sigma eps.
    r = F.softmax((z.mean(-1, keepdim=True) + 0.7 * eps) / 2.0, -1)
    p_s = 0.75 * F.softmax(z / 2.0, -1) + 0.25 * r
    assert_value_close(nld_loss_reference(s, t, noise=eps, noise_std=0.7, **kw),
                       4.0 * (p_t * (p_t / p_s).log()).sum(-1).mean(), F64)
    # Additive mode: the student's logits plus sigma eps, no mixture.
    assert_value_close(nld_loss_reference(s, t, noise=eps, noise_std=0.7, mode="additive", **kw),
                       kd_kl_reference(z + 0.7 * eps, t, temperature=2.0), F64)
    with pytest.raises(ValueError, match="needs a float noise_std"):
        nld_loss_reference(s, t, noise=eps, mode="additive", **kw)


@pytest.mark.parametrize("teacher_steps", [0, T], ids=["ann_teacher", "snn_teacher"])
def test_nld_per_timestep_is_nld_per_step(teacher_steps):
    s, t = _inputs(teacher_steps)
    eps = _noise((T, B, C))
    per_step = [nld_loss_reference(s[i], t[i] if teacher_steps else t, noise=eps[i], noise_weight=0.3)
                for i in range(T)]
    assert_value_close(nld_loss_reference(s, t, noise=eps, noise_weight=0.3, per_timestep=True),
                       torch.stack(per_step).mean(), F64)


def test_nld_noise_helper():
    a = nld_noise((T, B, C), generator=torch.Generator().manual_seed(3))
    b = nld_noise((T, B, C), generator=torch.Generator().manual_seed(3))
    assert a.shape == (T, B, C) and a.dtype == torch.float32 and torch.equal(a, b)
    assert nld_noise((B, C), dtype=F64).dtype == F64


def test_philox_reference_known_answers():
    """The reference Philox4x32-10 against Random123's known-answer vector (kat_vectors: philox4x32,
    10 rounds, counter and key all zeros), and its normals' first moments."""
    from snnkd_fast.kd.reference import philox4x32_10_reference, philox_noise_reference

    words = philox4x32_10_reference(torch.tensor(0), torch.tensor([0]))
    assert [int(w) for w in words] == [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    eps = philox_noise_reference(torch.tensor(12345), 64, 1000)
    assert eps.shape == (64, 1000) and eps.dtype == torch.float32
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    # a row of C classes is the first C components of its ceil(C / 4) draws (C = 5 and 8: two each)
    seven = torch.tensor(7)
    assert torch.equal(philox_noise_reference(seven, 3, 5), philox_noise_reference(seven, 3, 8)[:, :5])
