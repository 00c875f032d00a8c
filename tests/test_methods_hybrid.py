"""Hybrid block-wise replacement distillation (snnkd_fast/methods/hybrid.py; reconstructed from the
paper's Fig. 1 caption as methods.md specifies it)."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snnkd_fast.kd.reference import kd_kl_reference
from snnkd_fast.methods import HybridDistiller, TimeDistributed
from snnkd_fast.nn import LIFNode

from tolerances import assert_value_close

K, T, B = 5, 2, 4


def teacher_cnn():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
              nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, K))
    return blocks, head


def student_cnn():
    torch.manual_seed(1)

    def block(cin, cout, stride):
        return nn.Sequential(TimeDistributed(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                             nn.BatchNorm2d(cout)), LIFNode(step_mode="m"))

    blocks = [block(3, 6, 1), block(6, 12, 2), block(12, 12, 1)]
    head = TimeDistributed(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, K))
    return blocks, head


@functools.lru_cache(maxsize=None)
def _distiller(**kwargs):
    t_blocks, t_head = teacher_cnn()
    s_blocks, s_head = student_cnn()
    d = HybridDistiller(s_blocks, t_blocks, t_head, student_head=s_head, T=T, **kwargs)
    d.initialize(batch()[0])
    return d


def make_distiller(**kwargs):
    return copy.deepcopy(_distiller(**kwargs))


def batch():
    g = torch.Generator().manual_seed(2)
    return 2.0 * torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, K, (B,), generator=g)


def teacher_params(d):
    return list(d.teacher_blocks.parameters()) + list(d.teacher_head.parameters())


def test_hybrids_forward_backward_every_k():
    d = make_distiller()
    x, y = batch()
    loss, terms, out = d.loss(x, y, return_terms=True)
    assert sorted(out.hybrid_logits) == [1, 2]
    for k, logits in out.hybrid_logits.items():
        assert logits.shape == (B, K) and logits.requires_grad
    assert out.student_logits.shape == (T, B, K)
    assert out.aligned_rates[1].shape == (B, 8, 8, 8) and out.aligned_rates[2].shape == (B, 16, 4, 4)
    loss.backward()
    first_conv = d.student_blocks[0][0].module[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    for k in (1, 2):
        conv = d.align[k - 1][0].weight
        assert conv.grad is not None and conv.grad.abs().sum() > 0, k
    assert all(p.grad is None and not p.requires_grad for p in teacher_params(d))


@pytest.mark.parametrize("k", [1, 2])
def test_each_hybrid_reaches_exactly_its_student_prefix(k):
    weights = [0.0, 0.0]
    weights[k - 1] = 1.0
    d = make_distiller(hybrid_weights=tuple(weights), ce_weight=0.0, student_kd_weight=0.0)
    x, y = batch()
    d.loss(x, y).backward()
    for i, block in enumerate(d.student_blocks, start=1):
        w = block[0].module[0].weight
        if i <= k:
            assert w.grad is not None and w.grad.abs().sum() > 0, f"student block {i} should learn from M_{k}"
        else:
            assert w.grad is None or w.grad.abs().sum() == 0, f"student block {i} is not in M_{k}"
    for j, align in enumerate(d.align, start=1):
        g = align[0].weight.grad
        assert (g is not None and g.abs().sum() > 0) == (j == k)
    assert all(p.grad is None for p in teacher_params(d))


def test_loss_composition():
    d = make_distiller(hybrid_weights=(0.5, 2.0), student_kd_weight=0.3, ce_weight=0.7, feature_weight=0.1,
                       temperature=3.0)
    x, y = batch()
    loss, terms, out = d.loss(x, y, return_terms=True)
    zs = out.student_logits
    expected = 0.7 * F.cross_entropy(zs.mean(0), y) + 0.3 * kd_kl_reference(zs, out.teacher_logits, temperature=3.0)
    for k, w in ((1, 0.5), (2, 2.0)):
        expected = expected + w * kd_kl_reference(out.hybrid_logits[k], out.teacher_logits, temperature=3.0)
        expected = expected + 0.1 * F.mse_loss(out.aligned_rates[k], out.teacher_features[k - 1])
    assert_value_close(loss, expected, torch.float32, "CE + sum_k w_k tau^2 KL + w_S tau^2 KL + features")
    assert set(terms["hybrid_kd"]) == {1, 2} and set(terms["feature"]) == {1, 2}
    # The teacher's logits are the teacher's own forward (eval mode), and the hybrid's tail is the teacher's.
    t_blocks, t_head = d.teacher_blocks, d.teacher_head
    with torch.no_grad():
        h = x
        for blk in t_blocks:
            h = blk(h)
        assert_value_close(out.teacher_logits, t_head(h), torch.float32, "y_A")
        h = out.aligned_rates[1]
        for blk in t_blocks[1:]:
            h = blk(h)
        assert_value_close(out.hybrid_logits[1], t_head(h), torch.float32, "M_1 tail")


def test_rates_are_time_means_of_the_student_blocks():
    d = make_distiller()
    x, _ = batch()
    out = d(x)
    from snnkd_fast.methods import reset_neurons
    reset_neurons(d)
    h = x.unsqueeze(0).expand(T, *x.shape)  # direct encoding
    h = d.student_blocks[0](h)
    assert set(h.unique().tolist()) <= {0.0, 1.0}
    assert_value_close(out.aligned_rates[1], d.align[0](h.mean(0)), torch.float32, "align(mean_t S_1)")


def test_teacher_stays_frozen_in_eval():
    d = make_distiller()
    d.train()
    assert not any(m.training for m in d.teacher_blocks.modules()) and not d.teacher_head.training
    bn = d.teacher_blocks[0][1]
    running = bn.running_mean.clone()
    x, y = batch()
    opt = torch.optim.SGD(d.student_parameters(), lr=0.1)
    d.loss(x, y).backward()
    opt.step()
    assert torch.equal(bn.running_mean, running)
    assert not any(p is q for p in d.student_parameters() for q in teacher_params(d))


@pytest.mark.parametrize("order,expected", [
    ("shallow_first", {0: [1], 1.9: [1], 2: [1, 2], 7: [1, 2, 3]}),
    ("deep_first", {0: [3], 2.5: [2, 3], 4: [1, 2, 3], 100: [1, 2, 3]}),
])
def test_progressive_schedule(order, expected):
    t_blocks = [nn.Linear(4, 4) for _ in range(4)]
    s_blocks = [nn.Sequential(TimeDistributed(nn.Linear(4, 4)), LIFNode(step_mode="m")) for _ in range(4)]
    d = HybridDistiller(s_blocks, t_blocks, nn.Linear(4, K), student_head=TimeDistributed(nn.Linear(4, K)),
                        schedule="progressive", epochs_per_stage=2, schedule_order=order,
                        align_shapes=[((4,), (4,))] * 3)
    for epoch, active in expected.items():
        d.set_epoch(epoch)
        assert d.active_hybrids() == active, epoch
    d.set_epoch(0)
    out = d(torch.randn(3, 4))
    assert sorted(out.hybrid_logits) == expected[0]
    all_d = HybridDistiller(s_blocks, t_blocks, nn.Linear(4, K), student_head=TimeDistributed(nn.Linear(4, K)),
                            align_shapes=[((4,), (4,))] * 3)
    assert all_d.active_hybrids() == [1, 2, 3]  # default: every hybrid every step


def test_vector_blocks_get_linear_align_and_lazy_init_warns():
    t_blocks = [nn.Sequential(nn.Linear(6, 10), nn.ReLU()), nn.Sequential(nn.Linear(10, 10), nn.ReLU())]
    s_blocks = [nn.Sequential(TimeDistributed(nn.Linear(6, 7)), LIFNode(step_mode="m")),
                nn.Sequential(TimeDistributed(nn.Linear(7, 7)), LIFNode(step_mode="m"))]
    d = HybridDistiller(s_blocks, t_blocks, nn.Linear(10, K), student_head=TimeDistributed(nn.Linear(7, K)), T=3)
    x = 3 * torch.randn(5, 6)
    with pytest.warns(UserWarning, match="lazily"):
        loss = d.loss(x, torch.randint(0, K, (5,)))
    assert isinstance(d.align[0], nn.Linear) and d.align[0].weight.shape == (10, 7)
    loss.backward()
    assert d.align[0].weight.grad.abs().sum() > 0


def test_validation():
    t_blocks, t_head = teacher_cnn()
    s_blocks, s_head = student_cnn()
    with pytest.raises(ValueError, match="same length"):
        HybridDistiller(s_blocks[:2], t_blocks, t_head)
    with pytest.raises(ValueError, match="hybrid_weights"):
        HybridDistiller(s_blocks, t_blocks, t_head, hybrid_weights=[1.0])
    with pytest.raises(ValueError, match="neuron_backward"):
        HybridDistiller(s_blocks, t_blocks, t_head, neuron_backward="bptt2")
    with pytest.raises(ValueError, match="spatial"):
        HybridDistiller(s_blocks, t_blocks, t_head, align_shapes=[((6, 8, 8), (8, 4, 4)), ((12, 4, 4), (16, 4, 4))])


def test_neuron_backward_bptt_default():
    d = make_distiller()
    assert d.neuron_backward == "bptt"
    assert all(m.backward == "bptt" for m in d.student_blocks.modules() if isinstance(m, LIFNode))


def test_neuron_backward_rate_trains():
    d = make_distiller()
    assert d.set_neuron_backward("rate") == 3
    assert all(m.backward == "rate" for m in d.student_blocks.modules() if isinstance(m, LIFNode))
    x, y = batch()
    d.loss(x, y).backward()
    g = d.student_blocks[0][0].module[0].weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in teacher_params(d))


def test_set_neuron_backward_reaches_every_student_neuron():
    s_blocks = [nn.Sequential(TimeDistributed(nn.Linear(4, 4)), LIFNode(step_mode="m")) for _ in range(2)]
    head = nn.Sequential(TimeDistributed(nn.Linear(4, K)), LIFNode(step_mode="m"))
    d = HybridDistiller(s_blocks, [nn.Linear(4, 4), nn.Linear(4, 4)], nn.Linear(4, K), student_head=head,
                        align_shapes=[((4,), (4,))], neuron_backward="rate")
    neurons = [m for m in d.modules() if isinstance(m, LIFNode)]
    assert len(neurons) == 3 and all(m.backward == "rate" for m in neurons)
    assert d.set_neuron_backward("bptt") == 3 and all(m.backward == "bptt" for m in neurons)
