"""Every fused-loss kernel (cpp, triton) against the reference: loss and both gradients (student and
teacher), over class counts from 1 to a row that needs streaming, T in {1, 4}, odd B, dtypes,
teacher layouts (ANN [B, C], SNN [T, B, C], expanded, non-contiguous), extreme and masked logits,
and the HTA tie rule."""
import dataclasses
import os

import pytest
import torch

import snnkd_fast
from snnkd_fast.losses import per_timestep_kl

from conftest import skip_unless_runnable
from kd_helpers import CASE_IDS, CASES, float64_head_order, run_loss, thresholds_beside_a_cumulative_sum
from tolerances import compute_dtype

KD_TOL = {  # (rtol, atol) for loss values and gradients vs the reference
    torch.float64: (1e-9, 1e-11),
    torch.float32: (1e-5, 5e-6),
    torch.float16: (2e-3, 2e-4),
    torch.bfloat16: (1.6e-2, 2e-3),
}
KD_TARGETS = [("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


@pytest.fixture(params=KD_TARGETS, ids=[f"{b}-{d}" for b, d in KD_TARGETS])
def kd_target(request):
    backend, device = request.param
    skip_unless_runnable(backend, device, family="kd")
    return backend, device


def logits(shape, scale=3.0, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def assert_matches(kernel, reference, dtype, what="", tol=None):
    rtol, atol = tol or KD_TOL[dtype]
    # the loss is computed and returned in float32 for half inputs: float32's tolerance (unless a
    # test widens it), the gradients their input dtype's
    loss_rtol, loss_atol = tol or KD_TOL[compute_dtype(dtype)]
    scale = max(1.0, reference.loss.abs().max().item())
    torch.testing.assert_close(kernel.loss.double(), reference.loss.double(), rtol=loss_rtol, atol=loss_atol * scale,
                               msg=lambda m: f"{what} loss: {m}")
    for name in ("grad_student", "grad_teacher"):
        a, b = getattr(kernel, name), getattr(reference, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"{what} {name}: {m}")


def compare(case, student, teacher, backend, dtype, exact_reference=True, tol=None, **kwargs):
    """The kernel at the inputs' dtype vs the reference in float64 on the same values: the kernels
    accumulate in float32 (float64 for float64), so the float64 reference is the exact answer.
    ``exact_reference=False`` runs the reference at the inputs' dtype instead (for inputs whose
    float32 time-average itself rounds, e.g. logits of 1e4)."""
    kernel = run_loss(case, student, teacher, backend, seed_backend=backend, **kwargs)
    if exact_reference:
        student, teacher = student.double(), teacher.double()
    reference = run_loss(case, student, teacher, "torch", seed_backend=backend, **kwargs)
    assert_matches(kernel, reference, dtype, case.name, tol)
    return kernel


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("C", [1, 2, 10, 100, 1000, 5000])
@pytest.mark.parametrize("T", [1, 4])
def test_class_counts(kd_target, case, C, T):
    backend, device = kd_target
    student, teacher = logits((T, 3, C), device=device), logits((3, C), seed=1, device=device)
    compare(case, student, teacher, backend, torch.float32)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("C", [15, 16, 17, 48])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "bf16"])
def test_cpu_rows_around_the_vector_width(case, C, layout):
    """The cpp kernels pad a row to whole 16-float vectors with neutral logits (-inf) and read a row
    of a multiple of 16 contiguous floats in place: both sides of that edge, and the copied rows
    (strided, converted from bf16) of either length."""
    skip_unless_runnable("cpp", "cpu", family="kd")
    dtype = torch.bfloat16 if layout == "bf16" else torch.float32
    student = logits((2, 3, 2 * C if layout == "strided" else C), dtype=dtype)
    teacher = logits((3, 2 * C if layout == "strided" else C), seed=1, dtype=dtype)
    if layout == "strided":
        student, teacher = student[..., ::2], teacher[..., ::2]
    compare(case, student, teacher, "cpp", dtype)


LANE_CASES = [c for c in CASES if c.name in ("per_timestep_kl", "tser", "tser_shared_softmax", "hta")]


@pytest.mark.parametrize("case", LANE_CASES, ids=[c.name for c in LANE_CASES])
@pytest.mark.parametrize("C", [1, 10, 16, 31, 32, 47, 48])
@pytest.mark.parametrize("B", [1, 15, 17, 33])
@pytest.mark.parametrize("teacher_layout", ["ann", "snn_strided"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student_grad", "teacher_grad"])
def test_cpu_lane_rows_block_edges(case, C, B, teacher_layout, teacher_grad):
    """At few classes the cpp kernels take 16 samples' rows side by side, one per vector lane
    (kd_cpu.cpp: the KL/TSER forward where lane_rows_pay, C <= 16 or C < 48 and not a multiple of 16;
    every loss's backward where lane_rows_pay_backward, C < 32, unless the teacher needs a gradient),
    and the row kernels otherwise: batches that leave a partial block of lanes, a per-timestep teacher
    read through strides, on both sides of each switch; float64, so the match with the reference is
    tight."""
    skip_unless_runnable("cpp", "cpu", family="kd")
    student = logits((3, B, C), dtype=torch.float64)
    if teacher_layout == "ann":
        teacher = logits((B, C), seed=1, dtype=torch.float64)
    else:
        teacher = logits((B, 3, 2 * C), seed=1, dtype=torch.float64).transpose(0, 1)[..., ::2]
    compare(case, student, teacher, "cpp", torch.float64, teacher_grad=teacher_grad)


NLD_CASES = [c for c in CASES if c.nld]


@pytest.mark.parametrize("case", NLD_CASES, ids=[c.name for c in NLD_CASES])
@pytest.mark.parametrize("C", [1, 10, 12, 13, 60, 61])
@pytest.mark.parametrize("T, B", [(1, 1), (3, 33), (2, 70)])
@pytest.mark.parametrize("teacher_layout", ["ann", "snn"])
def test_cpu_nld_noise_blocks(case, C, T, B, teacher_layout):
    """At few classes (4 ceil(C/4) < 64) the cpp NLD kernels draw the noise of up to 32 samples' rows
    of a timestep in one call, whose draws are consecutive (nld_cpu.cpp, RowNoise), where larger rows
    draw their own: the eps must be those of the reference's per-row nld_noise across whole and
    partial blocks (two threads split B = 33 and 70), several timesteps, both sides of the switch
    (C = 60 in blocks, 61 per row) and both passes (the backward draws it again)."""
    skip_unless_runnable("cpp", "cpu", family="kd")
    student = logits((T, B, C), dtype=torch.float64)
    shape = (B, C) if teacher_layout == "ann" else (T, B, C)
    compare(case, student, logits(shape, seed=1, dtype=torch.float64), "cpp", torch.float64)


@pytest.mark.parametrize("loss, entropy_temperature", [(0, 4.0), (1, 4.0), (1, 2.5)], ids=["kl", "tser", "tser_h"])
@pytest.mark.parametrize("C", [48, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpu_row_groups_are_the_single_rows(loss, entropy_temperature, C, dtype):
    """With a [B, C] teacher the cpp KL/TSER forward takes a sample's student rows four at a time,
    interleaved (kd_cpu.cpp, row_group_sums), and the last T mod 4 one by one; a per-timestep teacher
    takes every row alone. The same teacher given both ways gives the same bits: rows and statistics,
    for T with and without a remainder."""
    skip_unless_runnable("cpp", "cpu", family="kd")
    for T in (1, 3, 4, 5, 9):
        student = logits((T, 6, C), dtype=dtype)
        teacher = logits((6, C), seed=1, dtype=dtype)
        args = (loss, 4.0, entropy_temperature, 0.1, 0.5)
        grouped = torch.ops.snnkd_fast.kd_rows_forward(student, teacher, *args)
        single = torch.ops.snnkd_fast.kd_rows_forward(student, teacher.expand(T, 6, C).contiguous(), *args)
        for name, a, b in zip(("rows", "stats"), grouped[:2], single[:2]):
            assert torch.equal(a, b), f"{name} T={T}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_saves_only_the_inputs_at_sequence_size(kd_target, case):
    """What autograd keeps for the backward: the student and teacher themselves (no copies) and
    O(T*B) statistics; no [T, B, C] tensor of the kernel's own (softmax, mask, noise)."""
    backend, device = kd_target
    T, B, C = 3, 4, 50
    student = logits((T, B, C), device=device).requires_grad_(True)
    teacher = logits((B, C), seed=1, device=device).requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        case.fn(student, teacher, backend=backend, **case.kwargs)
    inputs = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    own = [tuple(t.shape) for t in saved if t.numel() >= T * B * C and t.untyped_storage().data_ptr() not in inputs]
    assert not own, f"sequence-sized tensors saved for the backward: {own}"
    assert saved, "nothing saved: the hook did not see the kernel's autograd function"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_large_row_streams(kd_target, case):
    """A row far wider than one tile: the online log-sum-exp and HTA's threshold search stream it."""
    backend, device = kd_target
    student, teacher = logits((2, 1, 40_000), device=device), logits((1, 40_000), seed=1, device=device)
    compare(case, student, teacher, backend, torch.float32)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_and_snn_teacher(kd_target, case, reduction):
    backend, device = kd_target
    student, teacher = logits((3, 5, 33), device=device), logits((3, 5, 33), seed=1, device=device)
    compare(case, student, teacher, backend, torch.float32, reduction=reduction)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(kd_target, case, dtype):
    backend, device = kd_target
    student, teacher = logits((4, 3, 50), dtype=dtype, device=device), logits((3, 50), seed=1, dtype=dtype,
                                                                              device=device)
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(TypeError, match="float64"):
            case.fn(student, teacher, backend="triton", **case.kwargs)
        return
    compare(case, student, teacher, backend, dtype)


TIME_AVERAGED = [c for c in CASES if c.name in ("kd_kl", "hta_mean_logits", "nld")]


@pytest.mark.parametrize("case", TIME_AVERAGED, ids=[c.name for c in TIME_AVERAGED])
@pytest.mark.parametrize("float64_side", ["student", "teacher"])
def test_time_average_of_a_mixed_pair_in_float64(kd_target, case, float64_side):
    """A float64 student with a float32 [T, B, C] teacher (or the reverse) computes in float64, the
    time-average of the float32 side included, as the reference does (averaged in float32, the
    losses were ~1e-8 relative off)."""
    backend, device = kd_target
    if backend == "triton":
        pytest.skip("triton takes no float64 (test_dtypes)")
    student_dtype, teacher_dtype = ((torch.float64, torch.float32) if float64_side == "student"
                                    else (torch.float32, torch.float64))
    student = logits((4, 3, 50), dtype=student_dtype, device=device)
    teacher = logits((4, 3, 50), seed=1, dtype=teacher_dtype, device=device)
    kernel = run_loss(case, student, teacher, backend, seed_backend=backend)
    reference = run_loss(case, student.double(), teacher.double(), "torch", seed_backend=backend)
    # the loss in float64; each gradient in its input's dtype, so the float32 side's to float32 rounding
    for name, dtype in (("loss", torch.float64), ("grad_student", student_dtype), ("grad_teacher", teacher_dtype)):
        got, expected = getattr(kernel, name).double(), getattr(reference, name)
        rtol, atol = KD_TOL[dtype]
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol * max(1.0, expected.abs().max().item()),
                                   msg=lambda m, name=name: f"{case.name} {name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["student_transposed", "teacher_expanded_over_t", "teacher_column_slice",
                                    "teacher_broadcast_rows"])
def test_layouts_read_in_place(kd_target, case, layout):
    backend, device = kd_target
    T, B, C = 3, 4, 21
    if layout == "student_transposed":  # [B, T, C] storage viewed as [T, B, C]
        student, teacher = logits((B, T, C), device=device), logits((B, C), seed=1, device=device)
        transform = lambda s, t: (s.transpose(0, 1), t)  # noqa: E731
    elif layout == "teacher_expanded_over_t":  # an SNN-shaped teacher that is one ANN row per sample
        student, teacher = logits((T, B, C), device=device), logits((B, C), seed=1, device=device)
        transform = lambda s, t: (s, t.unsqueeze(0).expand(T, B, C))  # noqa: E731
    elif layout == "teacher_column_slice":
        student, teacher = logits((T, B, C), device=device), logits((B, 2 * C), seed=1, device=device)
        transform = lambda s, t: (s, t[:, ::2])  # noqa: E731
    else:  # one teacher row for the whole batch (stride 0 over B)
        student, teacher = logits((T, B, C), device=device), logits((1, C), seed=1, device=device)
        transform = lambda s, t: (s, t.expand(B, C))  # noqa: E731
    compare(case, student, teacher, backend, torch.float32, transform=transform)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_teacher_without_grad(kd_target, case):
    backend, device = kd_target
    student, teacher = logits((2, 3, 17), device=device), logits((3, 17), seed=1, device=device)
    run = compare(case, student, teacher, backend, torch.float32, teacher_grad=False)
    assert run.grad_teacher is None


@pytest.mark.parametrize("case", [c for c in CASES if not c.nld], ids=[c.name for c in CASES if not c.nld])
def test_extreme_and_masked_logits(kd_target, case):
    """Logits of +-1e4 stay finite and exact; a -inf class (masked in both) is exactly absent."""
    backend, device = kd_target
    student = logits((2, 3, 12), scale=1e4, device=device)
    teacher = logits((3, 12), scale=1e4, seed=1, device=device)
    # z / tau of |z| ~ 1e4 is known to one float32 ulp (~2e-4), and q moves with it: the tolerance
    # is the conditioning of the problem, not the kernel's error.
    run = compare(case, student, teacher, backend, torch.float32, tol=(1e-3, 1e-3))
    assert torch.isfinite(run.loss).all() and torch.isfinite(run.grad_student).all()
    student, teacher = logits((2, 3, 12), device=device), logits((3, 12), seed=1, device=device)
    student[..., 5] = float("-inf")
    teacher[:, 5] = float("-inf")
    run = compare(case, student, teacher, backend, torch.float32)
    assert torch.isfinite(run.loss).all() and (run.grad_student[..., 5] == 0).all()


@pytest.mark.parametrize("case", [c for c in CASES if c.nld], ids=[c.name for c in CASES if c.nld])
@pytest.mark.parametrize("scale", [30.0, 1e3])
def test_nld_extreme_logits_match_reference(kd_target, case, scale):
    """Student logits hundreds of units apart: the mixture p_s = w q + (1 - w) r underflows on classes
    the teacher still gives mass to, where the kernels fall back to the log domain for that row (the
    CPU kernel forms p_s linearly otherwise). scale=30 mixes rows of both kinds."""
    backend, device = kd_target
    student = logits((2, 3, 24), scale=scale, device=device)
    student[:, 0] = logits((2, 24), seed=4, device=device)  # sample 0: ordinary logits
    teacher = logits((3, 24), scale=1.0, seed=1, device=device)
    run = compare(case, student, teacher, backend, torch.float32, tol=(2e-4, 1e-4))
    assert torch.isfinite(run.loss).all() and torch.isfinite(run.grad_student).all()


def _hta_teacher_keys(backend, teacher, head_threshold, temperature=4.0):
    """The (key_cross, idx_cross, idx_top) rows a backend's HTA teacher selection stores."""
    from snnkd_fast.kd.params import LOSS_HTA

    student = torch.zeros((1, *teacher.shape), dtype=teacher.dtype, device=teacher.device)
    name = "kd_rows_forward_triton" if backend == "triton" else "kd_rows_forward"
    _, _, keys = getattr(torch.ops.snnkd_fast, name)(student, teacher, LOSS_HTA, temperature, temperature, 0.0,
                                                      head_threshold)
    return keys.cpu()


@pytest.mark.parametrize("head_threshold", [0.05, 0.5, 0.9, 0.999])
def test_hta_head_selection_matches_cpp(kd_target, head_threshold):
    """The head (crossing key and index, top-1) each GPU/Triton teacher kernel selects equals the cpp
    kernel's (each a sort-free search over the same keys) on teachers of every kind: spread,
    confident, flat, with tied values, long rows, and rows whose keys span the whole range (every
    read of the search)."""
    backend, device = kd_target
    if backend == "cpp":
        pytest.skip("the cpp selection is the baseline")
    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip("needs the cpp backend as the baseline")
    g = torch.Generator().manual_seed(7)
    teachers = [torch.randn(8, 37, generator=g) * 3, torch.randn(4, 1000, generator=g) * 0.01,
                torch.randn(4, 1000, generator=g) * 30, torch.randint(-3, 4, (6, 50), generator=g).float(),
                torch.randn(2, 20000, generator=g) * 4, torch.full((2, 9), 1.5)]
    extremes = torch.randn(2, 500, generator=g) * 3  # keys spanning the whole range: every read of the search
    extremes[0, 5], extremes[0, 17], extremes[1, 3], extremes[1, 499] = 3e38, -3e38, -3e38, 1e-30
    teachers.append(extremes)
    if device == "cuda":  # few long rows: the split CUDA head (kd_cuda.cu), its tied-class walk included;
        # the Triton head's float64 sums (not under the interpreter: ~10 s per call there)
        teachers += [torch.randn(3, 64000, generator=g) * 3, torch.randint(-3, 4, (3, 64000), generator=g).float()]
    for teacher in teachers:
        expected = _hta_teacher_keys("cpp", teacher, head_threshold)
        got = _hta_teacher_keys(backend, teacher.to(device), head_threshold)
        assert torch.equal(got, expected), (tuple(teacher.shape), head_threshold, got, expected)


@pytest.mark.parametrize("head_threshold", [0.1, 0.5, 0.9])
def test_cpp_hta_crossing_class_on_long_rows(head_threshold):
    """The cpp teacher selection (radix selection on the key, 8 bits a pass, down to <= 64 candidates,
    then a sort) against the reference's order (logit descending, ties to the lower index, inclusive
    cumulative probability) on rows long enough to take the radix passes: spread, near-flat,
    confident, tied in groups larger than 64, all tied, and logits one ulp apart (shuffled), whose
    keys share their top two bytes: every pass narrows on its own byte."""
    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(11)
    teachers = [torch.randn(3, 1000, generator=g) * 4, torch.randn(3, 1000, generator=g) * 0.01,
                torch.randn(2, 3000, generator=g) * 40, torch.randint(-3, 4, (4, 1000), generator=g).float(),
                torch.full((2, 301), 0.25), torch.randn(2, 70, generator=g),  # 301: no cumulative sum lands on a threshold
                1 + torch.randperm(1000, generator=g).float().reshape(1, 1000) * 2**-23]
    for teacher in teachers:
        keys = _hta_teacher_keys("cpp", teacher, head_threshold)[0]  # [B, 3] of the one timestep
        order, cumulative = float64_head_order(teacher)
        for row in range(teacher.shape[0]):
            crossing = int((cumulative[row] >= head_threshold).nonzero()[0])
            expected_top, expected_cross = int(order[row, 0]), int(order[row, crossing])
            # keys: (key_cross, idx_cross, idx_top)
            assert int(keys[row, 2]) == expected_top, (tuple(teacher.shape), row, keys[row])
            assert int(keys[row, 1]) == expected_cross, (tuple(teacher.shape), row, keys[row], expected_cross)


@pytest.mark.parametrize("head_threshold", [0.5, 0.9, 0.999])
def test_cpp_hta_crossing_class_on_rows_of_64000_classes(head_threshold):
    """The cpp head on rows of 64,000 classes against the float64 order, spread and tied (integer
    logits: 7 values, ~9,000 classes each). The teacher row's normalizer is summed in double: summed in
    float lanes, each adding 4,000 equal terms rounding the same way, it was ~5e-5 relative off and
    the crossing class missed the exact one by 3-20 classes (the GPU kernels, a double log-sum-exp,
    had it: test_hta_head_selection_matches_cpp compares them with cpp on these rows)."""
    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(7)
    for teacher in (torch.randn(3, 64000, generator=g) * 3, torch.randint(-3, 4, (3, 64000), generator=g).float()):
        keys = _hta_teacher_keys("cpp", teacher, head_threshold)[0]
        order, cumulative = float64_head_order(teacher)
        for row in range(teacher.shape[0]):
            crossing = int((cumulative[row] >= head_threshold).nonzero()[0])
            assert int(keys[row, 1]) == int(order[row, crossing]), (head_threshold, tuple(teacher.shape), row, keys[row],
                                                                    int(order[row, crossing]))


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_hta_head_resolves_a_threshold_1e7_from_a_cumulative_sum(kd_target, fraction):
    """Thresholds 1e-7 below and above the float64 cumulative probability of a class inside a tied
    group (integer logits, C = 4,000): the crossing class is that class, resp. the next. Every
    kernel's head sums its masses and its row's normalizer in float64 (the Triton head once compared
    float32 sums with a float32 log-sum-exp: 13 of 32 such thresholds missed). On a GPU 1e-6: its
    float exp (up to 2 ulp; Triton's an ex2.approx of x * log2(e)) errs by a few 1e-7 relative per
    logit value, alike over a tied group of ~570 classes."""
    backend, device = kd_target
    margin = 1e-7 if device == "cpu" else 1e-6
    g = torch.Generator().manual_seed(3)
    teacher = torch.randint(-3, 4, (2, 4000), generator=g).float() * 1.7 + 0.3
    for row, threshold, expected in thresholds_beside_a_cumulative_sum(teacher, (fraction,), margin):
        keys = _hta_teacher_keys(backend, teacher[row:row + 1].to(device), threshold)[0]
        assert int(keys[0, 1]) == expected, (row, fraction, threshold, keys[0], expected)


def test_hta_tie_rule_matches_reference(kd_target):
    """Equal teacher logits: the head takes the lower class index first, as the reference does."""
    backend, device = kd_target
    hta = next(c for c in CASES if c.name == "hta")
    teacher = torch.tensor([[2.0, 0.0, 2.0, 2.0, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                            [5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]], device=device)
    student = logits((2, 3, 7), device=device)
    for threshold in (0.2, 0.5, 0.6, 0.9):
        case = dataclasses.replace(hta, kwargs=dict(hta.kwargs, head_threshold=threshold))
        compare(case, student, teacher, backend, torch.float32)


@pytest.mark.parametrize("C, head_threshold", [(10, 0.5), (4, 0.5), (20, 0.1), (100, 0.9), (100, 0.5),
                                               (1000, 0.25), (3000, 0.3)])
def test_hta_flat_teacher_rows_head_as_exact_arithmetic(kd_target, C, head_threshold):
    """Flat teacher rows (all logits equal): the cumulative probability reaches head_threshold exactly
    at the k-th class, k = C * head_threshold, which is therefore tail -- k - 1 head classes -- in the
    reference (float32 and float64) and in every kernel: the threshold margin
    (kd.params.HTA_THRESHOLD_MARGIN). Without it, at C = 10 and 0.5 the float64 reference's sum of
    exp(log_softmax) fell just below 0.5 (five head classes) where the cpp kernel's was exactly 0.5
    (four), and the losses differed by ~5%."""
    from snnkd_fast.kd.params import HTA_THRESHOLD_MARGIN
    from snnkd_fast.kd.reference import hta_head_mask_reference

    backend, device = kd_target
    head_classes = round(C * head_threshold) - 1
    teacher = torch.stack([torch.zeros(C), torch.full((C,), 1.5), torch.full((C,), -40.0)])
    for dtype in (torch.float32, torch.float64):
        p = torch.log_softmax(teacher.to(dtype) / 2.0, dim=-1).exp()  # as hta_kl_reference forms p
        assert hta_head_mask_reference(p, head_threshold).sum(-1).tolist() == [head_classes] * 3, dtype
    keys = _hta_teacher_keys(backend, teacher.to(device), head_threshold - HTA_THRESHOLD_MARGIN)[0]
    assert keys[:, 1].tolist() == [head_classes] * 3, keys  # the crossing class: index k - 1
    hta = next(c for c in CASES if c.name == "hta")
    hta = dataclasses.replace(hta, kwargs=dict(hta.kwargs, head_threshold=head_threshold))
    student = logits((2, 3, C), device=device)
    compare(hta, student, teacher.to(device), backend, torch.float32)
    if backend != "triton":
        compare(hta, student.double(), teacher.double().to(device), backend, torch.float64)


@pytest.mark.parametrize("noise_weight, dtype", [(1e-12, torch.float64), (1e-9, torch.float32), (1e-3, torch.float32)])
def test_nld_small_noise_weight_is_kept(kd_target, noise_weight, dtype):
    """A small noise weight where the student's q of a class is smaller still, so that the noise term
    decides p_s there: the cpp kernel's linear-domain mixture took (1 - noise_weight)'s complement,
    1 - (1 - noise_weight), which loses the weight's low bits (all of them below 2^-53, 2^-24 in
    float32): rows off by ~1e-6 relative in float64, the noise dropped in float32."""
    backend, device = kd_target
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton takes no float64")
    nld = next(c for c in CASES if c.name == "nld")
    nld = dataclasses.replace(nld, kwargs=dict(nld.kwargs, noise_weight=noise_weight, temperature=1.0, seed=0))
    student = torch.tensor([[[16.951, -3.2277], [-23.9667, 6.2527]]], dtype=dtype, device=device)
    teacher = torch.tensor([[-1.0845, -1.3986], [0.4033, 0.8380]], dtype=dtype, device=device)
    compare(nld, student, teacher, backend, dtype, reduction="none")


def test_nld_noise_is_reproducible_and_fresh(kd_target):
    backend, device = kd_target
    student, teacher = logits((4, 3, 20), device=device), logits((3, 20), seed=1, device=device)
    a = snnkd_fast.losses.nld_loss(student, teacher, seed=5, backend=backend)
    b = snnkd_fast.losses.nld_loss(student, teacher, seed=5, backend=backend)
    c = snnkd_fast.losses.nld_loss(student, teacher, seed=6, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1 = torch.Generator(device=device).manual_seed(3)
    g2 = torch.Generator(device=device).manual_seed(3)
    assert torch.equal(snnkd_fast.losses.nld_loss(student, teacher, generator=g1, backend=backend),
                       snnkd_fast.losses.nld_loss(student, teacher, generator=g2, backend=backend))
    first = snnkd_fast.losses.nld_loss(student, teacher, generator=g1, backend=backend)
    assert not torch.equal(first, snnkd_fast.losses.nld_loss(student, teacher, generator=g1, backend=backend))


def test_kernel_noise_is_the_reference_philox(kd_target):
    """Every kernel backend draws the NLD noise that kd.reference.philox_noise_reference computes in
    plain tensor ops (within 1e-6: the kernels' log/cos/sin differ from torch's in their last bits;
    measured 2.4e-7 on cpp), so the "torch" backend's nld_loss given a seed, which uses that noise,
    gives every backend's loss for that seed."""
    from snnkd_fast.kd.op import nld_noise
    from snnkd_fast.kd.reference import philox_noise_reference

    backend, device = kd_target
    seed = torch.tensor(2 ** 62 + 12345, device=device)
    for rows, C in [(5, 77), (3, 1), (2, 4)]:
        torch.testing.assert_close(nld_noise(seed, (rows, C), backend), philox_noise_reference(seed, rows, C),
                                   rtol=1e-6, atol=1e-6)
    rtol, atol = KD_TOL[torch.float32]
    for per_timestep in (False, True):
        results = []
        for which in (backend, "torch"):
            student = logits((4, 3, 20), device=device).requires_grad_(True)
            loss = snnkd_fast.losses.nld_loss(student, logits((3, 20), seed=1, device=device), seed=5,
                                              per_timestep=per_timestep, backend=which)
            loss.backward()
            results.append((loss.detach(), student.grad))
        (loss, grad), (loss_torch, grad_torch) = results
        torch.testing.assert_close(loss, loss_torch, rtol=rtol, atol=atol)
        torch.testing.assert_close(grad, grad_torch, rtol=rtol, atol=atol * grad_torch.abs().max().item())


def test_cpp_and_triton_draw_the_same_noise():
    if not (snnkd_fast.backends("kd")["cpp"] and snnkd_fast.backends("kd")["triton"]):
        pytest.skip("needs both the cpp and the triton backends")
    from snnkd_fast.kd.op import nld_noise

    seed = torch.tensor(2 ** 40 + 17)
    cpu, tri = nld_noise(seed, (5, 77), "cpp"), nld_noise(seed, (5, 77), "triton")
    torch.testing.assert_close(cpu, tri, rtol=1e-5, atol=1e-6)
    assert abs(cpu.mean().item()) < 0.2 and abs(cpu.std().item() - 1) < 0.2


def test_default_backend_is_a_kernel():
    x = logits((2, 3, 5))
    from snnkd_fast._backends import resolve_backend

    expected = "cpp" if snnkd_fast.backends("kd")["cpp"] else "torch"
    assert resolve_backend("auto", x.device, "test", family="kd") == expected
    per_timestep_kl(x, x[0])  # runs


def test_triton_forward_tile_height_keeps_the_sms_busy():
    """The Triton forward's tile height halves until B * cdiv(T, height) reaches
    KD_MIN_PROGRAMS_PER_SM programs per SM (132 SMs: an H100), never below one timestep; without an
    SM count (the interpreter) it is min(next power of two of T, KD_BLOCK_T)."""
    kernels = pytest.importorskip("snnkd_fast.kd.triton")
    assert kernels.KD_MIN_PROGRAMS_PER_SM == 4 and kernels.KD_BLOCK_T == 16
    assert kernels.forward_block_t(16, 64, 132) == 1  # 64 samples: even T programs per sample are too few
    assert kernels.forward_block_t(16, 256, 132) == 4  # 1,024 programs; 8 would give 512 < 528
    assert kernels.forward_block_t(4, 512, 132) == 2
    assert kernels.forward_block_t(4, 4096, 132) == 4  # enough samples already
    assert kernels.forward_block_t(1, 8, 132) == 1
    assert kernels.forward_block_t(16, 64, 0) == 16
    assert kernels.forward_block_t(5, 3, 0) == 8


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("per_timestep_kl", "tser", "hta")],
                         ids=lambda c: c.name)
def test_triton_launch_shapes_change_no_result(kd_target, case, monkeypatch):
    """The Triton grid variants benchmarks/tune_triton.py sweeps compute the same numbers: forward
    programs over timestep tiles (KD_BLOCK_T 1, 2: up to T programs per sample) and the backward with
    and without one program per class chunk. Interpreted, bit for bit (numpy reduces a tile row in the
    same order whatever the tile height) except the broadcast teacher's gradient, a sum over t whose
    order follows the tile height. Compiled, a row's sum over classes is reduced across the lanes and
    warps of the tile's layout, which changes with its height: equal within float32 rounding (the
    first H100 run of this test saw TSER's loss differ in its last bit)."""
    backend, device = kd_target
    if backend != "triton":
        pytest.skip("Triton launch shapes")
    import snnkd_fast.kd.triton as kernels

    student, teacher = logits((5, 3, 300), device=device), logits((3, 300), seed=1, device=device)
    baseline = run_loss(case, student, teacher, backend)
    bitwise = torch.device(device).type == "cpu"  # the interpreter

    def same(a, b, what):
        if bitwise:
            assert torch.equal(a, b), what
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda text: f"{what}: {text}")

    for block_t, split_c in ((1, True), (2, False), (16, False)):
        monkeypatch.setattr(kernels, "KD_BLOCK_T", block_t)
        monkeypatch.setattr(kernels, "KD_BWD_SPLIT_C", split_c)
        variant = run_loss(case, student, teacher, backend)
        same(variant.loss, baseline.loss, (block_t, split_c, "loss"))
        same(variant.grad_student, baseline.grad_student, (block_t, split_c, "grad_student"))
        if block_t >= student.shape[0]:
            same(variant.grad_teacher, baseline.grad_teacher, (block_t, split_c, "grad_teacher"))
        else:
            torch.testing.assert_close(variant.grad_teacher, baseline.grad_teacher, rtol=1e-6, atol=1e-7)


_UNPACKED_SCRIPT = """
import sys, torch
import snnkd_fast.losses as L
out = {}
for name in ("per_timestep_kl", "tser_loss", "hta_kl"):
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((4, 8, 1000), (3, 4, 64000)):  # the second: HTA's split head (4 rows)
            g = torch.Generator(device="cuda").manual_seed(0)
            teacher = 3 * torch.randn(shape[1:], device="cuda", generator=g)
            student = (teacher + 2 * torch.randn(shape, device="cuda", generator=g)).to(dtype).requires_grad_()
            loss = getattr(L, name)(student, teacher.to(dtype), backend="cuda")
            loss.backward()
            out[f"{name} {dtype} {shape}"] = (loss.detach().float().cpu(), student.grad.float().cpu())
torch.save(out, sys.argv[1])
"""


@pytest.mark.cuda_tensors
def test_cuda_unpacked_switch_changes_no_result(tmp_path):
    """SNNKD_CUDA_KD_UNPACKED=1 (read once per process; run_gpu.sh --breakdown's A/B) runs the CUDA
    loss row kernels one class per access and the HTA head in one 256-thread block per row: the
    losses and gradients of the packed default, its head split over several blocks per row at
    (3, 4, 64000), to rounding (two processes, one with the switch)."""
    import subprocess
    import sys

    if not torch.cuda.is_available() or not snnkd_fast.backends("kd")["cuda"]:
        pytest.skip("needs a CUDA device and the cuda backend")
    results = {}
    for label, switch in (("default", None), ("unpacked", "1")):
        env = {key: value for key, value in os.environ.items() if key != "SNNKD_CUDA_KD_UNPACKED"}
        if switch:
            env["SNNKD_CUDA_KD_UNPACKED"] = switch
        path = tmp_path / f"{label}.pt"
        run = subprocess.run([sys.executable, "-c", _UNPACKED_SCRIPT, str(path)], env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        results[label] = torch.load(path)
    for key, (loss, grad) in results["default"].items():
        other_loss, other_grad = results["unpacked"][key]
        tol = dict(rtol=1e-5, atol=1e-6) if "float32" in key else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(loss, other_loss, **tol, msg=key)
        torch.testing.assert_close(grad, other_grad, **tol, msg=key)
