"""STARS data-free KD terms and synthesizer (snnkd_fast/methods/stars.py; formulas reconstructed from
the abstract, as methods.md specifies them)."""
import copy
import functools

import pytest
import torch
from torch import nn

from snnkd_fast.kd.reference import kd_kl_reference
from snnkd_fast.methods import (BNRecord, BNStatisticsHook, Synthesizer, TimeDistributed, bn_matching_loss,
                                gaussian_tail_mass, relational_consistency_loss, soft_tail_exceedance,
                                tail_aware_regularization, train_student_step)
from snnkd_fast.nn import LIFNode

from tolerances import assert_value_close

K, SHAPE = 5, (3, 8, 8)


def tiny_teacher(seed=0):
    return copy.deepcopy(_calibrated_teacher(seed))


@functools.lru_cache(maxsize=None)
def _calibrated_teacher(seed):
    """A small CNN whose BN running statistics come from a "real" data distribution (pixels
    ~ N(0.5, 1.5^2) with a per-channel offset), so that matching them is achievable from N(0, 1) noise."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, K))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average over the calibration batches
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
        net.train()
        offset = torch.tensor([0.8, -0.5, 0.2]).view(1, 3, 1, 1)
        for _ in range(4):
            net(0.5 + offset + 1.5 * torch.randn(32, *SHAPE, generator=g))
    return net.eval()


class TinySNN(nn.Module):
    """Direct encoding over T, conv -> LIF -> pooled linear readout; logits [T, B, K]."""

    def __init__(self, T=2):
        super().__init__()
        self.T = T
        self.conv = TimeDistributed(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.lif = LIFNode(step_mode="m")
        self.head = TimeDistributed(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, K))

    def forward(self, x):
        return self.head(self.lif(self.conv(x.unsqueeze(0).expand(self.T, *x.shape) * 3.0)))


# -------------------------------------------------------------------------------------------- hooks, BN loss

def test_hook_records_batch_statistics():
    teacher = tiny_teacher()
    x = torch.randn(6, *SHAPE)
    inputs = {}
    bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_hook(lambda mod, inp, out: inputs.__setitem__(mod, inp[0])) for m in bns]
    with BNStatisticsHook(teacher) as hook:
        teacher(x)
        recs = list(hook)
        assert len(recs) == 3 and [r.module for r in recs] == bns
        for r in recs:
            a = inputs[r.module]
            dims = [0] + list(range(2, a.dim()))
            assert_value_close(r.mean, a.mean(dims), torch.float32, "mean")
            assert_value_close(r.var, a.var(dims, unbiased=False), torch.float32, "biased var")
            assert r.output is not None
        expected = sum(torch.linalg.vector_norm(r.var - r.module.running_var) +
                       torch.linalg.vector_norm(r.mean - r.module.running_mean) for r in recs)
        assert_value_close(bn_matching_loss(hook), expected, torch.float32, "L_BN")
        assert_value_close(bn_matching_loss(hook, [2.0, 0.0, 0.0]), 2 * (
            torch.linalg.vector_norm(recs[0].var - bns[0].running_var) +
            torch.linalg.vector_norm(recs[0].mean - bns[0].running_mean)), torch.float32, "layer weights")
        hook.enabled = False
        hook.clear()
        teacher(x)
        assert len(hook) == 0
        with pytest.raises(ValueError, match="no BatchNorm statistics"):
            bn_matching_loss(hook)
    for h in handles:
        h.remove()
    assert all(len(m._forward_hooks) == 0 for m in bns)  # removed on exit


def test_bn_loss_decreases_over_synthesis_steps():
    teacher = tiny_teacher()
    synth = Synthesizer(teacher, SHAPE, K, batch_size=16, steps=25, ce_weight=0.0, rca_weight=0.0, tar_weight=0.0,
                        rng=torch.Generator().manual_seed(0))
    x, y = synth.synthesize()
    bn = [step["bn"] for step in synth.history[-1]]
    assert x.shape == (16, *SHAPE) and y.shape == (16,)
    assert bn[-1] < 0.2 * bn[0], bn                          # 2.8 -> ~0.2 with these seeds
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen


# ------------------------------------------------------------------------------------------------------ RCA

def test_rca_zero_for_identical_features_and_positive_otherwise():
    t = torch.randn(6, K)
    assert relational_consistency_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-12)
    # [T, B, K] student, constant over time and scaled: row normalisation makes it identical.
    s = (3.0 * t).unsqueeze(0).expand(4, 6, K)
    assert relational_consistency_loss(t, s).item() == pytest.approx(0.0, abs=1e-10)
    assert relational_consistency_loss(t, torch.randn(2, 6, K)).item() > 1e-3
    # Known value: G_T = I (orthogonal rows), G_S = all ones (parallel rows): ||G_T - G_S||^2 / B^2 = 2 / 4.
    e = torch.eye(2)
    assert relational_consistency_loss(e, torch.ones(2, 2)).item() == pytest.approx(0.5)
    # Different feature widths are fine (B x B Gram matrices).
    assert relational_consistency_loss(torch.randn(6, 32), torch.randn(6, K)).item() > 0


def test_rca_gradcheck():
    t = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: relational_consistency_loss(a, b), (t, s))


# ------------------------------------------------------------------------------------------------------ TAR

def test_tail_mass():
    assert gaussian_tail_mass(2.0) == pytest.approx(0.022750131948179195, rel=1e-12)
    assert gaussian_tail_mass(0.0) == pytest.approx(0.5)


def test_tar_known_configuration():
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.5]))
    # Channel 0 sits exactly on its threshold theta = 0 + 2*1 (sigmoid(0) = 1/2); channel 1 far above
    # theta = 0.5 + 2*2 (sigmoid -> 1).
    out = torch.empty(3, 2, 2, 2)
    out[:, 0] = 2.0
    out[:, 1] = 100.0
    pi = soft_tail_exceedance(out, bn.weight, bn.bias, k=2.0, kappa=0.1)
    assert torch.allclose(pi, torch.tensor([0.5, 1.0]))
    m = gaussian_tail_mass(2.0)
    rec = BNRecord(bn, torch.zeros(2), torch.ones(2), out)
    got = tail_aware_regularization([rec])
    assert got.item() == pytest.approx(((0.5 - m) ** 2 + (1.0 - m) ** 2) / 2, rel=1e-6)
    # One step below the threshold by kappa|gamma|: sigmoid(-1).
    out2 = torch.full((4, 2, 1, 1), 0.0)
    out2[:, 0] = 2.0 - 0.1 * 1.0
    out2[:, 1] = 4.5 - 0.1 * 2.0
    pi2 = soft_tail_exceedance(out2, bn.weight, bn.bias)
    assert torch.allclose(pi2, torch.sigmoid(torch.tensor(-1.0)).expand(2))


def test_tar_near_zero_for_gaussian_bn_outputs():
    # a ~ N(beta, gamma^2) exceeds beta + k|gamma| with probability 1 - Phi(k); a sharp sigmoid recovers it.
    g = torch.Generator().manual_seed(0)
    gamma, beta = torch.tensor([0.7, -1.3, 2.0]), torch.tensor([0.1, -0.4, 0.0])
    a = beta.view(1, 3, 1) + gamma.view(1, 3, 1) * torch.randn(20000, 3, 4, generator=g)
    pi = soft_tail_exceedance(a, gamma, beta, k=2.0, kappa=0.01)
    assert torch.allclose(pi, torch.full((3,), gaussian_tail_mass(2.0)), atol=2e-3)


# ------------------------------------------------------------------------------------------------ synthesizer

def test_synthetic_inputs_receive_gradient_through_teacher_and_student():
    teacher, student = tiny_teacher(), TinySNN()
    synth = Synthesizer(teacher, SHAPE, K, batch_size=8, steps=1, rca_weight=-0.5)
    x = torch.randn(8, *SHAPE, requires_grad=True)
    y = torch.randint(0, K, (8,))
    student.eval()
    terms = synth.loss_terms(x, y, student)
    assert set(terms) == {"bn", "ce", "tar", "rca", "total"}
    for name in ("bn", "ce", "tar", "rca"):
        (g,) = torch.autograd.grad(terms[name], [x], retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    expected_total = terms["bn"] + terms["ce"] + terms["tar"] - 0.5 * terms["rca"]
    assert_value_close(terms["total"], expected_total, torch.float32, "weighted sum")
    # RCA's gradient also reaches x through the student alone (teacher side detached).
    from snnkd_fast.methods import reset_neurons
    reset_neurons(student)
    rca_student_only = relational_consistency_loss(teacher(x).detach(), student(x))
    (g,) = torch.autograd.grad(rca_student_only, [x])
    assert g.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())


def test_synthesize_with_student_leaves_models_untouched():
    teacher, student = tiny_teacher(), TinySNN()
    student.train()
    running = student.conv.module[1].running_mean.clone()
    synth = Synthesizer(teacher, SHAPE, K, batch_size=4, steps=3)
    x, y = synth.synthesize(student)
    assert student.training and not teacher.training            # modes restored
    assert torch.equal(student.conv.module[1].running_mean, running)  # eval during synthesis
    assert all(p.grad is None for p in student.parameters())
    assert len(synth.history[-1]) == 3 and "rca" in synth.history[-1][0]


def test_generator_mode():
    teacher = tiny_teacher()
    synth = Synthesizer(teacher, SHAPE, K, batch_size=4, steps=2, mode="generator", latent_dim=8,
                        rng=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in synth.generator.parameters()]
    x, y = synth.synthesize()
    assert x.shape == (4, *SHAPE) and not x.requires_grad
    assert any(not torch.equal(b, p) for b, p in zip(before, synth.generator.parameters()))


def test_train_student_step():
    teacher, student = tiny_teacher(), TinySNN()
    x = torch.randn(4, *SHAPE)
    loss = train_student_step(student, x, teacher)                # no optimizer: loss with graph
    from snnkd_fast.methods import reset_neurons
    reset_neurons(student)
    with torch.no_grad():
        expected = kd_kl_reference(student(x), teacher(x), temperature=4.0)
    assert_value_close(loss.detach(), expected, torch.float32, "kd_kl default")
    loss.backward()
    assert student.conv.module[0].weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    w0 = student.head.module[2].weight.detach().clone()
    train_student_step(student, x, teacher, optimizer=opt)
    assert not torch.equal(w0, student.head.module[2].weight)
    assert all(p.grad is None for p in teacher.parameters())
