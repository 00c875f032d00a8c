"""SAMD (CKDSNN's saliency-scaled activation-map distillation), snnkd_fast/methods/samd.py.

* a transcription of the released code's functions (``getForwardCAM``, ``compute_cam``,
  ``compute_kl_divergence``) gives the same value: batch-global min-max with +1e-3, softmax + 1e-10,
  ``F.kl_div(..., "batchmean")`` without tau^2;
* the lean :func:`samd_loss` equals the reference in value and gradients, over targets, student maps,
  resize directions and dtypes;
* gradcheck in float64 w.r.t. student and teacher features; classifier weights get no gradient;
* the batch-global normalisation couples samples (a per-sample one would not);
* the lean version allocates O(B*H*W), the reference the full channel product.
"""
import pytest
import torch
import torch.nn.functional as F

from snnkd_fast.methods import SAMDLoss, samd_loss, samd_loss_reference

from tolerances import assert_grad_close, assert_value_close, compute_dtype


def make_inputs(T=3, B=4, ch=6, hw=(5, 5), ch_t=7, hw_t=None, K=10, dtype=torch.float32, spikes=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hw_t = hw if hw_t is None else hw_t
    if spikes:
        fs = (torch.rand(T, B, ch, *hw, generator=g) < 0.3).to(dtype)
    else:
        fs = torch.randn(T, B, ch, *hw, generator=g, dtype=dtype)
    ft = torch.randn(B, ch_t, *hw_t, generator=g, dtype=dtype)
    w = torch.randn(K, ch_t, generator=g, dtype=dtype)
    ws = torch.randn(K, ch, generator=g, dtype=dtype)
    labels = torch.randint(0, K, (B,), generator=g)
    return fs.requires_grad_(), ft.requires_grad_(), w, ws, labels


def released_code_samd(student_spikes, teacher_map, class_weights, predicted, tau=2.0):
    """A transcription of SinoLeu/CKDSNN's training_step SAMD path (plt_train_kd_ckd_snn.py, utils.py)."""
    cam = student_spikes.sum(dim=0).sum(axis=1)                      # getForwardCAM on [T, B, C, H, W]
    cam = cam - cam.min()
    s_map = cam / (cam.max() + 1e-3)
    B, D = teacher_map.shape[:2]
    cams = (teacher_map * class_weights[predicted].view(B, D, 1, 1)).sum(dim=1)   # compute_cam
    cam = torch.relu(cams)
    cam = cam - cam.min()
    t_map = cam / (cam.max() + 1e-3)
    prob_s = F.softmax((s_map / tau).view(B, -1), dim=1).view_as(s_map) + 1e-10   # compute_kl_divergence
    prob_t = F.softmax((t_map / tau).view(B, -1), dim=1).view_as(t_map) + 1e-10
    return F.kl_div(prob_s.log(), prob_t, reduction="batchmean")


@pytest.mark.parametrize("fn", [samd_loss, samd_loss_reference], ids=["lean", "reference"])
@pytest.mark.parametrize("tau", [2.0, 0.7])
def test_matches_released_code(fn, tau):
    fs, ft, w, _, _ = make_inputs(hw=(8, 8), hw_t=(8, 8))
    teacher_logits = torch.randn(4, 10)
    expected = released_code_samd(fs, ft, w, teacher_logits.argmax(1), tau)
    got = fn(fs, ft, w, teacher_logits=teacher_logits, temperature=tau)
    assert_value_close(got, expected, torch.float32, "SAMD vs released code")


CASES = [
    dict(target="pred", student_map="spike_sum"),
    dict(target="label", student_map="spike_sum"),
    dict(target="pred", student_map="class_weighted"),
    dict(target="label", student_map="class_weighted", use_student_logits=True),
    dict(target="pred", student_map="spike_sum", hw=(6, 6), hw_t=(4, 4)),                       # resize student
    dict(target="pred", student_map="spike_sum", hw=(3, 5), hw_t=(6, 4), resize_to="student"),  # resize teacher
    dict(target="pred", student_map="class_weighted", hw=(7, 7), hw_t=(4, 4), use_teacher_logits=False),
]


def _run(fn, case, dtype):
    case = dict(case)
    hw, hw_t = case.pop("hw", (5, 5)), case.pop("hw_t", None)
    use_teacher_logits = case.pop("use_teacher_logits", True)
    use_student_logits = case.pop("use_student_logits", False)
    fs, ft, w, ws, labels = make_inputs(hw=hw, hw_t=hw_t, dtype=dtype, seed=3)
    extra = {}
    if use_teacher_logits:
        extra["teacher_logits"] = torch.randn(4, 10, generator=torch.Generator().manual_seed(5), dtype=dtype)
    if use_student_logits:
        extra["student_logits"] = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(6), dtype=dtype)
    loss = fn(fs, ft, w, labels=labels, student_classifier_weight=ws, **extra, **case)
    grads = torch.autograd.grad(loss, [fs, ft])
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_lean_matches_reference(case, dtype):
    loss, grads = _run(samd_loss, case, dtype)
    ref_loss, ref_grads = _run(samd_loss_reference, case, dtype)
    assert loss.dtype == compute_dtype(dtype)
    assert torch.isfinite(loss) and loss > 0
    assert_value_close(loss, ref_loss, dtype, "loss")
    for g, rg, name in zip(grads, ref_grads, ("student", "teacher")):
        assert g.abs().sum() > 0, name
        assert_grad_close(g, rg, dtype, f"grad {name}")


def test_half_spikes_match_float32():
    fs, ft, w, _, _ = make_inputs()
    logits = torch.randn(4, 10)
    half = samd_loss(fs.detach().bfloat16().requires_grad_(), ft, w, teacher_logits=logits)
    full = samd_loss(fs, ft, w, teacher_logits=logits)
    assert half.dtype == torch.float32
    assert_value_close(half, full, torch.float32, "bf16 spikes are exact 0/1 and summed in float32")


@pytest.mark.parametrize("student_map", ["spike_sum", "class_weighted"])
@pytest.mark.parametrize("sizes", [((3, 3), (3, 3)), ((4, 4), (3, 3))], ids=["same", "resize"])
def test_gradcheck(student_map, sizes):
    fs, ft, w, ws, _ = make_inputs(T=2, B=3, ch=2, hw=sizes[0], hw_t=sizes[1], ch_t=3, K=5, dtype=torch.float64,
                                   spikes=False, seed=11)
    logits = torch.randn(3, 5, dtype=torch.float64)

    def f(a, b):
        return samd_loss(a, b, w, teacher_logits=logits, temperature=0.5, student_map=student_map,
                         student_classifier_weight=ws, student_logits=logits)

    assert torch.autograd.gradcheck(f, (fs, ft), eps=1e-6, atol=1e-7)


def test_classifier_weights_detached():
    fs, ft, w, ws, labels = make_inputs()
    w.requires_grad_(True)
    ws.requires_grad_(True)
    loss = samd_loss(fs, ft, w, student_map="class_weighted", student_classifier_weight=ws)
    loss.backward()
    assert w.grad is None and ws.grad is None
    assert fs.grad is not None and ft.grad is not None


def test_targets():
    fs, ft, w, _, labels = make_inputs()
    pooled_logits = ft.detach().mean((2, 3)) @ w.t()
    pred = samd_loss(fs, ft, w, teacher_logits=pooled_logits)
    # Without teacher_logits, "pred" is the argmax of the GAP -> linear head.
    assert_value_close(samd_loss(fs, ft, w), pred, torch.float32, "fallback pred")
    bias = torch.zeros(10)
    bias[labels[0]] = 1e3  # pushes every sample's argmax to labels[0]
    forced = samd_loss(fs, ft, w, teacher_logits=pooled_logits + bias)
    assert_value_close(samd_loss(fs, ft, w, classifier_bias=bias), forced, torch.float32, "fallback with bias")
    # target="label" uses the labels: equal to "pred" when the labels are the teacher's argmax ...
    as_label = samd_loss(fs, ft, w, target="label", labels=pooled_logits.argmax(1))
    assert_value_close(as_label, pred, torch.float32, "label == argmax")
    # ... and different otherwise.
    other = (pooled_logits.argmax(1) + 1) % 10
    assert not torch.allclose(samd_loss(fs, ft, w, target="label", labels=other), pred)
    with pytest.raises(ValueError, match="labels"):
        samd_loss(fs, ft, w, target="label")


def test_batch_global_normalisation_couples_samples():
    fs, ft, w, _, _ = make_inputs(B=2)
    logits = torch.randn(2, 10)
    both = samd_loss(fs, ft, w, teacher_logits=logits)
    alone = [samd_loss(fs[:, b:b + 1], ft[b:b + 1], w, teacher_logits=logits[b:b + 1]) for b in range(2)]
    # With a per-sample normalisation the batchmean would be the mean of the single-sample losses.
    assert not torch.allclose(both, (alone[0] + alone[1]) / 2, rtol=1e-3)
    # A constant added to every student map (here through every feature) is removed by the batch min.
    shifted = samd_loss(fs + 0.25, ft, w, teacher_logits=logits)
    assert_value_close(shifted, both, torch.float32, "shift invariance")


def test_module_and_validation():
    fs, ft, w, ws, labels = make_inputs()
    mod = SAMDLoss(temperature=1.5, target="label")
    assert_value_close(mod(fs, ft, w, labels=labels),
                       samd_loss(fs, ft, w, labels=labels, target="label", temperature=1.5), torch.float32, "module")
    assert_value_close(SAMDLoss(reference=True)(fs, ft, w), samd_loss_reference(fs, ft, w), torch.float32, "ref module")
    with pytest.raises(ValueError, match="student_features"):
        samd_loss(fs[0], ft, w)
    with pytest.raises(ValueError, match="classifier_weight"):
        samd_loss(fs, ft, w[:, :3])
    with pytest.raises(ValueError, match="student_classifier_weight"):
        samd_loss(fs, ft, w, student_map="class_weighted")
    with pytest.raises(ValueError, match="temperature"):
        samd_loss(fs, ft, w, temperature=0.0)
    with pytest.raises(ValueError, match="target"):
        SAMDLoss(target="argmax")


def _allocated_bytes(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.key_averages())


def test_lean_allocates_only_maps():
    # Large channel counts, small batch: the reference's [B, Ch, H, W] partial sums dominate.
    T, B, ch, hw = 2, 2, 256, (8, 8)
    fs = (torch.rand(T, B, ch, *hw) < 0.3).float()
    ft = torch.randn(B, ch, *hw)
    w = torch.randn(10, ch)
    logits = torch.randn(B, 10)
    feature_bytes = B * ch * hw[0] * hw[1] * 4
    lean = _allocated_bytes(lambda: samd_loss(fs, ft, w, teacher_logits=logits))
    ref = _allocated_bytes(lambda: samd_loss_reference(fs, ft, w, teacher_logits=logits))
    assert ref >= feature_bytes            # the measurement sees the reference's channel products
    assert lean < feature_bytes / 8        # O(B*H*W) (+ the [B, Ch] classifier rows)
