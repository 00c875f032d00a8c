"""CUDA kernels run on the CPU under a host emulation of their launch (csrc/tests/cuda_emulation/:
threads in turn, or as fibers that meet at barriers; compiled here with the host compiler and
loaded with ctypes), against the CPU ops.

* The neuron kernels (csrc/lif/lif_cuda_kernels.cuh, via csrc/tests/lif_cuda_emulated.cpp): every
  forward mode (saved H, rate, lean, recharge), both vector widths, one-value and per-neuron v_init,
  the saved-H backward, and the lean pair's backward with H staged in shared memory (a partial last
  chunk of 8 steps, the longest sequence it stages: 64 steps in float32, 32 in float64; unwritten
  shared memory reads as NaN) and its longer-sequence path (recharge into a temporary H, then the
  saved-H backward, as lif_cuda.cu's launcher does) -- bit for bit (the same per-element math,
  lif_math.h).
* The KD-loss row kernels (csrc/kd/kd_cuda_kernels.cuh, via csrc/tests/kd_cuda_emulated.cpp): HTA's
  teacher head (block reductions and scans across barriers), the KL / TSER / HTA-KL forward and
  backward -- HTA's head keys exactly, losses and gradients to rounding (other summation orders).

What this covers on a machine without a GPU: the kernels' indexing, guards, modes, buckets and
block-level cooperation. What it does not: the device's exp and cub's reduction order (results
match a device run to rounding), the launchers' tensor glue -- the GPU tests run those.
"""
import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

import snnkd_fast
from snnkd_fast.lif.surrogates import SURROGATES

from kd_helpers import thresholds_beside_a_cumulative_sum
from tolerances import compute_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
FORWARD_MODES = {"save_h": 0, "rate": 1, "lean": 2, "recharge": 3}  # ForwardMode in the .cuh
# (T, N): T = 1; a vector-width-1 N; the lean backward's 8-step chunks at their edges; the longest
# sequence it stages in float64 (32) and float32 (64) and one step more; several 256-thread blocks
# with a partial last one.
SHAPES = [(1, 7), (5, 785), (8, 1024), (9, 300), (16, 260), (17, 64), (32, 40), (33, 20), (64, 9), (65, 5)]
DTYPES = {torch.float32: 0, torch.float64: 1}


def _build(tmp_path_factory, source: str, family: str, extra_includes=()):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    if not snnkd_fast.backends(family)["cpp"]:
        pytest.skip(snnkd_fast.backends(family)["cpp"].reason)
    library = tmp_path_factory.mktemp("cuda_emulation") / f"lib{source}.so"
    # the extension's floating-point flags (setup.py), so that fmadd rounds as in the CPU ops
    flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("SNNKD_PORTABLE_BUILD", "0") != "1":
        flags.append("-march=native")
    result = subprocess.run(
        [CXX, *flags, "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-Werror", "-shared",
         "-fPIC", "-I", os.path.join(ROOT, "csrc", "tests", "cuda_emulation"), "-I", os.path.join(ROOT, "csrc"),
         *[arg for path in extra_includes for arg in ("-isystem", path)],
         os.path.join(ROOT, "csrc", "tests", f"{source}.cpp"), "-o", str(library)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build(tmp_path_factory, "lif_cuda_emulated", "lif")


@pytest.fixture(scope="module")
def kd_emu(tmp_path_factory):
    from torch.utils.cpp_extension import include_paths

    # torch's headers for c10::BFloat16 / c10::Half, the 16-bit types of the extension's kernels
    return _build(tmp_path_factory, "kd_cuda_emulated", "kd", include_paths()[:1])


def _ptr(tensor):
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def _scalars(values):
    return (ctypes.c_double * 9)(*[float(v) for v in values])


def _forward(emu, mode, vec, x, v_init, one_v_init, decay, scalars):
    T, N = x.shape[0], x[0].numel()
    acc = dict(dtype=x.dtype)
    spikes = None if mode == "recharge" else torch.full_like(x, -7.0)
    v_final = None if mode == "recharge" else torch.full((N,), -7.0, **acc)
    out = {"save_h": torch.full_like(x, -7.0), "recharge": torch.full_like(x, -7.0),
           "rate": torch.full((N,), -7.0, **acc), "lean": None}[mode]
    status = emu.emu_lif_forward(DTYPES[x.dtype], FORWARD_MODES[mode], vec, _ptr(x), _ptr(v_init), int(one_v_init),
                                 _ptr(decay), _ptr(spikes), _ptr(v_final), _ptr(out), ctypes.c_int64(T),
                                 ctypes.c_int64(N), _scalars(scalars))
    assert status == 0
    return spikes, v_final, out


def _backward(emu, vec, decay_grad, grad_spikes, grad_v, h_seq, v_init, one_v_init, decay, scalars):
    """backward_kernel; grad_v_init None for a one-value v_init (none written)."""
    T, N = h_seq.shape[0], h_seq[0].numel()
    grad_x, grad_decay = torch.full_like(h_seq, -7.0), ctypes.c_double(0.0)
    grad_v_init = None if one_v_init else torch.full((N,), -7.0, dtype=h_seq.dtype)
    status = emu.emu_lif_backward(DTYPES[h_seq.dtype], vec, int(decay_grad), _ptr(grad_spikes), _ptr(grad_v),
                                  _ptr(h_seq), _ptr(v_init), int(one_v_init), _ptr(decay), _ptr(grad_x),
                                  _ptr(grad_v_init), ctypes.byref(grad_decay), ctypes.c_int64(T), ctypes.c_int64(N),
                                  _scalars(scalars))
    assert status == 0
    return grad_x, grad_v_init, grad_decay.value


def _backward_from_x(emu, decay_grad, grad_spikes, grad_v, x, v_init, one_v_init, decay, scalars):
    """What launch_backward_from_x_cuda runs: the staged kernel up to its longest sequence, else the
    recharge into a temporary H and the saved-H backward (one neuron per access, as for any N there)."""
    T, N = x.shape[0], x[0].numel()
    if T > emu.emu_staged_steps_max(DTYPES[x.dtype]):
        _, _, h_seq = _forward(emu, "recharge", 1, x, v_init, one_v_init, decay, scalars)
        return _backward(emu, 1, decay_grad, grad_spikes, grad_v, h_seq, v_init, one_v_init, decay, scalars)
    grad_x = torch.full_like(x, -7.0)
    grad_v_init = None if one_v_init else torch.full((N,), -7.0, dtype=x.dtype)
    grad_decay = ctypes.c_double(0.0)
    status = emu.emu_lif_backward_from_x(DTYPES[x.dtype], int(decay_grad), _ptr(grad_spikes), _ptr(grad_v), _ptr(x),
                                         _ptr(v_init), int(one_v_init), _ptr(decay), _ptr(grad_x), _ptr(grad_v_init),
                                         ctypes.byref(grad_decay), ctypes.c_int64(T), ctypes.c_int64(N),
                                         _scalars(scalars))
    assert status == 0
    return grad_x, grad_v_init, grad_decay.value


def _cases(all_surrogates: bool):
    surrogates = range(len(SURROGATES)) if all_surrogates else (0, 1)
    for neuron, decay_inputs in ((0, (True,)), (1, (True, False)), (2, (True, False))):
        for decay_input in decay_inputs:
            for v_reset, soft in ((0.0, False), (-0.3, False), (0.0, True)):
                for detach in (False, True):
                    for tau in ((2.0, 3.0) if neuron == 1 else (2.0,)):
                        for surrogate in surrogates:
                            yield (neuron, tau, decay_input, 1.0, v_reset, soft, detach, surrogate, 2.5)


def _assert_decay_close(got, expected, dtype, where):
    # the block sums add in another order: float32 sums of a few thousand terms of either sign
    tol = 1e-10 if dtype == torch.float64 else 3e-4
    assert abs(got - expected) <= tol * max(1.0, abs(expected)), f"grad_decay {got} != {expected}: {where}"


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}xN{n}" for t, n in SHAPES])
def test_emulated_cuda_neuron_kernels_match_the_cpu_ops(emu, shape, dtype):
    ops = torch.ops.snnkd_fast
    g = torch.Generator().manual_seed(1)
    T, N = shape
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.4).to(dtype)
    grad_spikes = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    grad_v = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
    v_inits = {"step": (torch.randn(N, generator=g, dtype=torch.float64) * 0.5).to(dtype),
               "one": torch.full((1,), 0.2, dtype=dtype)}
    vecs = (1, 4) if N % 4 == 0 else (1,)
    for scalars in _cases(all_surrogates=shape == (9, 300)):
        neuron = scalars[0]
        decay = torch.tensor([0.35], dtype=dtype) if neuron == 2 else None
        for v_name, v_init in v_inits.items():
            one_v_init = v_name == "one"
            v_step = v_init.expand(N).contiguous()
            where = f"{scalars} v_init={v_name}"
            spikes, v_final, h_seq = ops.lif_forward(x, v_init, decay, *scalars)
            rate_spikes, rate_v_final, eligibility = ops.lif_rate_forward(x, v_init, decay, *scalars)
            for vec in vecs:  # the launchers pass a one-element v_init as it is (one value, read once)
                e_spikes, e_v_final, e_h = _forward(emu, "save_h", vec, x, v_init, one_v_init, decay, scalars)
                assert torch.equal(e_spikes, spikes) and torch.equal(e_v_final, v_final), where
                assert torch.equal(e_h, h_seq), where
                e_spikes, e_v_final, e_eligibility = _forward(emu, "rate", vec, x, v_init, one_v_init, decay,
                                                              scalars)
                assert torch.equal(e_spikes, rate_spikes) and torch.equal(e_v_final, rate_v_final), where
                assert torch.equal(e_eligibility, eligibility), where
                e_spikes, e_v_final, _ = _forward(emu, "lean", vec, x, v_init, one_v_init, decay, scalars)
                assert torch.equal(e_spikes, spikes) and torch.equal(e_v_final, v_final), where
                _, _, e_h = _forward(emu, "recharge", vec, x, v_init, one_v_init, decay, scalars)
                assert torch.equal(e_h, h_seq), where
            for gs, gv in ((grad_spikes, grad_v), (grad_spikes, None), (None, grad_v)):
                grads = f"{where} grad_spikes={gs is not None} grad_v={gv is not None}"
                grad_x, grad_v_init, grad_decay = ops.lif_backward(gs, gv, h_seq, v_step, decay, dtype, *scalars,
                                                                   neuron == 2)
                for vec in vecs:
                    e_grad_x, e_grad_v_init, e_decay = _backward(emu, vec, neuron == 2, gs, gv, h_seq, v_init,
                                                                 one_v_init, decay, scalars)
                    assert torch.equal(e_grad_x, grad_x), grads
                    assert e_grad_v_init is None if one_v_init else torch.equal(e_grad_v_init, grad_v_init), grads
                    if neuron == 2:
                        _assert_decay_close(e_decay, float(grad_decay), dtype, grads)
                e_grad_x, e_grad_v_init, e_decay = _backward_from_x(emu, neuron == 2, gs, gv, x, v_init, one_v_init,
                                                                    decay, scalars)
                assert torch.equal(e_grad_x, grad_x), grads
                assert e_grad_v_init is None if one_v_init else torch.equal(e_grad_v_init, grad_v_init), grads
                if neuron == 2:
                    _assert_decay_close(e_decay, float(grad_decay), dtype, grads)


# ------------------------------------------------------------------------------------------------
# KD-loss row kernels
# ------------------------------------------------------------------------------------------------

KD_LOSSES = {"kl": 0, "tser": 1, "hta": 2}
# (student dtype, teacher dtype) -> kd_cuda_emulated.cpp's with_dtype_pair index
KD_DTYPE_PAIRS = {(torch.float32, torch.float32): 0, (torch.float64, torch.float64): 1,
                  (torch.bfloat16, torch.float32): 2, (torch.bfloat16, torch.bfloat16): 3,
                  (torch.float16, torch.float16): 4}
KD_PAIR_IDS = ["fp32", "fp64", "bf16-fp32", "bf16", "fp16"]
# (T, B, C): C below, at and above one block's 256 threads (a thread's stride over the classes); the
# backward's classes per thread: C = 10 one (no pack divides it), C = 12 four (fp32, bf16-fp32) or
# one (8-wide 16-bit packs), C = 256 and 1000 a full 16-byte pack for every pair
KD_SHAPES = [(3, 4, 10), (2, 3, 12), (2, 3, 256), (2, 2, 1000)]
# the forwards that form the gradient: a row no pack divides (16-bit), packed rows, a row past one
# block's stride (C = 10's case adds nothing C = 12 does not and took a third of the time)
FORMS_GRAD_SHAPES = KD_SHAPES[1:]


def _kd_inputs(shape, dtypes, per_t, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, B, C = shape
    student = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtypes[0])
    teacher = torch.randn((T if per_t else 1, B, C), generator=g, dtype=torch.float64) * 3
    if ties:  # many equal logits: HTA's walk over the classes tied at the crossing key
        teacher = (teacher * 2).round() / 2
    teacher = teacher.to(dtypes[1])
    return student, teacher if per_t else teacher[0]


def _kd_close(got, expected, where):
    """Rows and statistics in the accumulation dtype to its rounding; 16-bit gradients to a unit in
    their last place (the float value rounds to the nearer 16-bit neighbour, which rounding-level
    differences can change)."""
    if got.dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-12)
    elif got.dtype == torch.float32:
        tol = dict(rtol=2e-5, atol=2e-6)
    else:  # one ulp: eps relative, and in absolute terms one subnormal step (fp16's is 6e-8) plus,
        # near 0, float-level differences (~1e-6 of the row's scale)
        info = torch.finfo(got.dtype)
        scale = expected.double().abs().max().item() if expected.numel() else 0.0
        tol = dict(rtol=info.eps, atol=info.smallest_normal * info.eps + 1e-6 * scale)
    torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("dtypes", list(KD_DTYPE_PAIRS), ids=KD_PAIR_IDS)
@pytest.mark.parametrize("shape", KD_SHAPES, ids=[f"T{t}xB{b}xC{c}" for t, b, c in KD_SHAPES])
def test_emulated_cuda_kd_row_kernels_match_the_cpu_ops(kd_emu, shape, dtypes):
    ops = torch.ops.snnkd_fast
    T, B, C = shape
    for loss_name, loss in KD_LOSSES.items():
        for per_t in (False, True):
            for ties in ((False, True) if loss_name == "hta" else (False,)):
                student, teacher = _kd_inputs(shape, dtypes, per_t, ties)
                for tau, tau_h, weight, threshold in ((4.0, 4.0, 0.1, 0.5), (1.0, 2.0, -0.3, 0.9)):
                    where = f"{loss_name} per_t={per_t} ties={ties} tau={tau} threshold={threshold}"
                    rows, stats, keys = ops.kd_rows_forward(student, teacher, loss, tau, tau_h, weight, threshold)
                    scalars = (tau, tau_h, weight, threshold)
                    e_rows, e_stats, e_keys, vec = _kd_emulated_forward(kd_emu, dtypes, loss, student, teacher, per_t,
                                                                        scalars, keys, allow_packed=True)
                    assert vec == _kd_expected_pack(dtypes, C, forward=True), f"classes per access: {where}"
                    if loss_name == "hta":
                        assert torch.equal(e_keys, keys), f"HTA keys: {where}\n{e_keys}\n{keys}"
                        # the head in 512-thread blocks (few rows on a GPU): the same keys
                        _, _, wide_keys, _ = _kd_emulated_forward(kd_emu, dtypes, loss, student, teacher, per_t,
                                                                  scalars, keys, allow_packed=True, head_threads=512)
                        assert torch.equal(wide_keys, keys), f"HTA keys, 512 threads: {where}"
                    _kd_close(e_rows, rows, f"rows: {where}")
                    _kd_close(e_stats, stats, f"stats: {where}")
                    one_rows, one_stats, _, _ = _kd_emulated_forward(kd_emu, dtypes, loss, student, teacher, per_t,
                                                                     scalars, keys, allow_packed=False)
                    _kd_close(one_rows, rows, f"rows, one class per access: {where}")
                    _kd_close(one_stats, stats, f"stats, one class per access: {where}")
                    grad_rows = torch.randn(T, B, generator=torch.Generator().manual_seed(1),
                                            dtype=torch.float64).to(rows.dtype)
                    grad_s, grad_u = ops.kd_rows_backward(grad_rows, student, teacher, stats, keys, loss, tau, tau_h,
                                                          weight, True)
                    packed = _kd_emulated_backward(kd_emu, dtypes, loss, grad_rows, student, teacher, per_t, e_stats,
                                                   (tau, tau_h, weight), grad_u=True, allow_packed=True)
                    e_grad_s, e_grad_u, vec = packed
                    assert vec == _kd_expected_pack(dtypes, C), f"classes per thread: {where}"
                    _kd_close(e_grad_s, grad_s, f"grad student: {where}")
                    _kd_close(e_grad_u, grad_u, f"grad teacher: {where}")
                    # one class per thread, and no teacher gradient: the same bits (each element's
                    # formula and its teacher sum's order over t do not depend on the pack)
                    for with_grad_u, allow in ((True, False), (False, True)):
                        o_grad_s, o_grad_u, _ = _kd_emulated_backward(kd_emu, dtypes, loss, grad_rows, student,
                                                                      teacher, per_t, e_stats, (tau, tau_h, weight),
                                                                      grad_u=with_grad_u, allow_packed=allow)
                        assert torch.equal(o_grad_s, e_grad_s), f"grad student, pack {allow}: {where}"
                        assert o_grad_u is None or torch.equal(o_grad_u, e_grad_u), where


def _kd_expected_pack(dtypes, C, forward=False):
    """kd_rows_pack: 16 bytes of the wider dtype per access, where C (and so every row) allows;
    kd_forward_pack: one class per access in double."""
    if forward and torch.float64 in dtypes:
        return 1
    vec = 16 // max(dtype.itemsize for dtype in dtypes)
    return vec if C % vec == 0 else 1


def _kd_emulated_forward(kd_emu, dtypes, loss, student, teacher, per_t, scalars, keys, allow_packed,
                         head_threads=256, grad_weight=None):
    """The emulated CUDA KD forward (HTA's head, then the row kernel) into poisoned outputs:
    (rows, stats, keys, classes per access), and with grad_weight the forward that also forms the
    student's gradient at that row gradient (kd_forward_student_grad_kernel), its gradient last."""
    T, B, C = student.shape
    tau, tau_h, weight, threshold = scalars
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    e_rows, e_stats = torch.full((T, B), -7.0, dtype=acc), torch.full((T, B, 5), -7.0, dtype=acc)
    e_keys = torch.full_like(keys, -7)
    e_grad = None if grad_weight is None else torch.full_like(student, -7.0)
    vec = ctypes.c_int32(0)
    status = kd_emu.emu_kd_rows_forward_student_grad(
        KD_DTYPE_PAIRS[dtypes], loss, _ptr(student), _ptr(teacher), int(per_t), ctypes.c_int64(T), ctypes.c_int64(B),
        ctypes.c_int64(C), ctypes.c_double(tau), ctypes.c_double(tau_h), ctypes.c_double(weight),
        ctypes.c_double(threshold), _ptr(e_rows), _ptr(e_stats), _ptr(e_keys) if keys.numel() else None,
        int(allow_packed), ctypes.byref(vec), head_threads, _ptr(e_grad),
        ctypes.c_double(0.0 if grad_weight is None else grad_weight))
    assert status == 0
    return (e_rows, e_stats, e_keys, vec.value) + (() if grad_weight is None else (e_grad,))


def test_hta_head_takes_wider_blocks_only_where_rows_are_fewer_than_multiprocessors(kd_emu):
    """kd_cuda.cu's block size for HTA's teacher head: 512 threads while the rows leave
    multiprocessors idle (one 86-register block per multiprocessor), 256 from one row per
    multiprocessor up (two blocks per multiprocessor already fill it)."""
    for rows, sms, threads in ((1, 132, 512), (64, 132, 512), (131, 132, 512), (132, 132, 256), (256, 132, 256),
                               (1024, 132, 256), (64, 78, 512)):
        assert kd_emu.emu_hta_head_threads(ctypes.c_int64(rows), ctypes.c_int64(sms)) == threads, (rows, sms)


# (teacher dtype) -> kd_cuda_emulated.cpp's emu_hta_head index
HTA_TEACHER_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _hta_teachers(dtype):
    """Teachers of every kind for the head: spread, tied in groups, all equal (C = 257: no
    cumulative sum k / C lands on a tested threshold, where a float exp's rounding may take either
    side), per timestep [T, B, C], and rows whose keys span the whole range (the largest and
    smallest finite logits of the dtype: the search's every read)."""
    g = torch.Generator().manual_seed(5)
    big = torch.finfo(dtype).max
    extremes = torch.randn(3, 2000, generator=g, dtype=torch.float64) * 3
    extremes[0, 5], extremes[0, 17], extremes[1, 3], extremes[1, 1999] = big, -big, -big, 1e-30
    extremes[2] = torch.linspace(-1, 1, 2000, dtype=torch.float64)
    teachers = [torch.randn(3, 1000, generator=g, dtype=torch.float64) * 3,
                torch.randint(-3, 4, (2, 700), generator=g).double(), torch.full((2, 257), 1.5, dtype=torch.float64),
                torch.randn(2, 2, 900, generator=g, dtype=torch.float64), extremes]
    return [teacher.to(dtype) for teacher in teachers]


def _hta_emulated_head(kd_emu, teacher, head_threshold, splits, threads=256, temperature=4.0):
    """The emulated CUDA head's keys [Tt, B, 3] (poisoned first) and the slices it launched."""
    per_t = teacher.dim() == 3
    T = teacher.shape[0] if per_t else 1
    B, C = teacher.shape[-2:]
    keys = torch.full((T, B, 3), -7, dtype=torch.int32)
    slices = ctypes.c_int64(0)
    status = kd_emu.emu_hta_head(HTA_TEACHER_DTYPES[teacher.dtype], _ptr(teacher.contiguous()), int(per_t),
                                 ctypes.c_int64(T), ctypes.c_int64(B), ctypes.c_int64(C),
                                 ctypes.c_double(temperature), ctypes.c_double(head_threshold), threads,
                                 ctypes.c_int64(splits), _ptr(keys), ctypes.byref(slices))
    assert status == 0
    return keys, slices.value


@pytest.mark.parametrize("dtype", list(HTA_TEACHER_DTYPES), ids=["fp32", "fp64", "bf16", "fp16"])
def test_emulated_cuda_hta_head_split_or_not_gives_the_cpu_keys(kd_emu, dtype):
    """HTA's teacher head in every form kd_cuda.cu launches -- one block per row (256 or 512
    threads), or each row cut into slices of one block, one launch per read of the search -- gives
    the CPU op's (key_cross, idx_cross, idx_top) exactly, slices narrower than a block's threads and
    a last slice shorter than the others included."""
    ops = torch.ops.snnkd_fast
    teachers, fp32 = _hta_teachers(dtype), dtype == torch.float32
    for teacher in teachers:
        student = torch.zeros((teacher.shape[0] if teacher.dim() == 3 else 1, *teacher.shape[-2:]), dtype=dtype)
        C = teacher.shape[-1]
        # 1.5: above the whole mass, every class head
        for head_threshold in (0.05, 0.5, 0.999) + ((1.5,) if teacher is teachers[0] else ()):
            _, _, expected = ops.kd_rows_forward(student, teacher, 2, 4.0, 4.0, 0.0, head_threshold)
            for splits, threads in ((1, 256), (2, 256), (7, 256)) + (((1, 512), (3, 256)) if fp32 else ()):
                where = f"{tuple(teacher.shape)} threshold={head_threshold} splits={splits} threads={threads}"
                keys, slices = _hta_emulated_head(kd_emu, teacher, head_threshold, splits, threads)
                slice_ = kd_emu.emu_hta_head_slice(ctypes.c_int64(C), ctypes.c_int64(splits))
                assert slices == (1 if splits == 1 else -(-C // slice_)), where
                assert torch.equal(keys, expected), f"{where}\n{keys}\n{expected}"


@pytest.mark.parametrize("dtype", list(HTA_TEACHER_DTYPES), ids=["fp32", "fp64", "bf16", "fp16"])
def test_emulated_cuda_hta_head_of_flat_rows_is_exact_arithmetic(kd_emu, dtype):
    """Flat teacher rows whose cumulative probability reaches head_threshold exactly at class
    k = C * head_threshold: with the threshold hta_kl hands the ops (minus HTA_THRESHOLD_MARGIN) the
    CUDA head, in every launch form, crosses at class k - 1 (index), as exact arithmetic and the CPU
    op do -- not by its float sums' last bits."""
    from snnkd_fast.kd.params import HTA_THRESHOLD_MARGIN

    for C, head_threshold in ((10, 0.5), (100, 0.9), (1000, 0.25), (3000, 0.3), (20000, 0.5)):
        teacher = torch.stack([torch.zeros(C), torch.full((C,), 1.5)]).to(dtype)
        threshold = head_threshold - HTA_THRESHOLD_MARGIN
        for splits, threads in ((1, 256), (3, 256), (1, 512)):
            keys, _ = _hta_emulated_head(kd_emu, teacher, threshold, splits, threads)
            assert keys[0, :, 1].tolist() == [round(C * head_threshold) - 1] * 2, (C, head_threshold, splits, keys)


def test_emulated_cuda_hta_head_resolves_a_threshold_1e7_from_a_cumulative_sum(kd_emu):
    """As test_kd_backends' test of the same name, for the CUDA head in each launch form: thresholds
    1e-7 below and above the float64 cumulative probability of a class inside a tied group (integer
    logits, C = 4,000) cross at that class, resp. the next."""
    g = torch.Generator().manual_seed(3)
    teacher = torch.randint(-3, 4, (2, 4000), generator=g).float() * 1.7 + 0.3
    for row, threshold, expected in thresholds_beside_a_cumulative_sum(teacher, (0.5, 0.9), 1e-7):
        for splits, threads in ((1, 256), (3, 256), (1, 512)):
            keys, _ = _hta_emulated_head(kd_emu, teacher[row:row + 1], threshold, splits, threads)
            assert int(keys[0, 0, 1]) == expected, (row, threshold, splits, threads, keys)


def test_hta_head_splits_rows_only_where_they_leave_the_gpu_idle(kd_emu):
    """kd_cuda.cu's split of HTA's head: rows fewer than three blocks per multiprocessor (the split
    kernels' occupancy) are cut into as many slices as fill those slots, each at least 16,384
    classes; slices start at multiples of 64 classes."""
    splits = kd_emu.emu_hta_head_splits
    splits.restype = ctypes.c_int64
    for rows, C, sms, expected in ((64, 128000, 132, 6), (4, 64000, 132, 3), (2, 20000, 132, 1),
                                   (198, 100000, 132, 2), (199, 100000, 132, 1), (256, 32000, 132, 1),
                                   (1, 32767, 132, 1), (1, 32768, 132, 2), (64, 128000, 78, 3), (0, 1000, 132, 1)):
        assert splits(ctypes.c_int64(rows), ctypes.c_int64(C), ctypes.c_int64(sms)) == expected, (rows, C, sms)
    slice_ = kd_emu.emu_hta_head_slice
    slice_.restype = ctypes.c_int64
    for C, n, expected in ((128000, 6, 21376), (1000, 7, 192), (64, 2, 64), (8192, 2, 4096)):
        assert slice_(ctypes.c_int64(C), ctypes.c_int64(n)) == expected, (C, n)


def _widest_interval_after_a_read(span):
    """The widest interval hta_candidates / hta_narrow can leave of one `span` (hi - lo) wide:
    [lo, c0 - 1], [c_j, c_{j+1} - 1] or [c_15, hi] for the 16 candidates c_j = lo + min((j + 1) step,
    span), step = ceil(span / 17)."""
    step = -(-span // 17)
    candidates = [min((j + 1) * step, span) for j in range(16)]
    widths = [candidates[0] - 1] + [b - 1 - a for a, b in zip(candidates, candidates[1:])] + [span - candidates[-1]]
    return max(width for width in widths if width >= 0)


def test_hta_search_reads_cover_every_interval(kd_emu):
    """The split head launches a fixed number of reads (hta_search_reads: 8 for the float types'
    32-bit keys, 17 for double's 64-bit ones); the interval arithmetic of the search, taken at its
    widest every read, reaches a single key within them."""
    for is_double, span in ((0, 2**32 - 1), (1, 2**64 - 1)):
        reads = 0
        while span > 0:
            span = _widest_interval_after_a_read(span)
            reads += 1
        assert kd_emu.emu_hta_search_reads(is_double) == reads


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_emulated_cuda_kd_forward_follows_the_non_finite_policy(kd_emu, dtypes):
    """The packed forward's online update (the pack's maximum first, no per-class branch) keeps the
    policy for non-finite logits (losses.py): a -inf class in student and teacher drops out exactly,
    +inf or NaN make that row's loss NaN, the other rows are the CPU op's to rounding."""
    ops = torch.ops.snnkd_fast
    T, B, C = 2, 5, 256
    g = torch.Generator().manual_seed(7)
    student = torch.randn(T, B, C, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    student[:, 1, 3] = teacher[1, 3] = -math.inf  # masked class: finite loss
    student[0, 2, 200] = math.inf
    student[1, 3, 17] = math.nan
    teacher[4, 100] = math.inf  # every step of sample 4
    student, teacher = student.to(dtypes[0]), teacher.to(dtypes[1])
    for loss_name, loss in KD_LOSSES.items():
        rows, stats, keys = ops.kd_rows_forward(student, teacher, loss, 4.0, 4.0, 0.1, 0.5)
        e_rows, _, _, vec = _kd_emulated_forward(kd_emu, dtypes, loss, student, teacher, False, (4.0, 4.0, 0.1, 0.5),
                                                 keys, allow_packed=True)
        assert vec > 1
        nan = torch.isnan(rows)
        assert nan[0, 2] and nan[1, 3] and nan[:, 4].all() and not nan[:, :2].any(), (loss_name, rows)
        assert torch.equal(torch.isnan(e_rows), nan), (loss_name, e_rows, rows)
        _kd_close(e_rows[~nan], rows[~nan], f"{loss_name} finite rows")


def _kd_emulated_backward(kd_emu, dtypes, loss, grad_rows, student, teacher, per_t, stats, scalars, grad_u,
                          allow_packed):
    """The emulated CUDA KD backward into poisoned outputs: (grad_s, grad_u or None, classes per thread)."""
    T, B, C = student.shape
    tau, tau_h, weight = scalars
    e_grad_s = torch.full_like(student, -7.0)
    e_grad_u = torch.full_like(teacher, -7.0) if grad_u else None
    vec = ctypes.c_int32(0)
    status = kd_emu.emu_kd_rows_backward(
        KD_DTYPE_PAIRS[dtypes], loss, _ptr(grad_rows), _ptr(student), _ptr(teacher), int(per_t), ctypes.c_int64(T),
        ctypes.c_int64(B), ctypes.c_int64(C), _ptr(stats), ctypes.c_double(tau), ctypes.c_double(tau_h),
        ctypes.c_double(weight), _ptr(e_grad_s), _ptr(e_grad_u), int(allow_packed), ctypes.byref(vec))
    assert status == 0
    return e_grad_s, e_grad_u, vec.value


def test_emulated_cuda_kd_backward_takes_one_class_per_thread_off_a_pack_boundary(kd_emu):
    """A student whose data starts 4 bytes off a 16-byte boundary (a view one element into its buffer)
    gets the one-class-per-thread kernel, with the same gradient as an aligned copy's packed one."""
    ops = torch.ops.snnkd_fast
    T, B, C = 2, 3, 256
    buffer = torch.randn(T * B * C + 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    student = buffer[1:].view(T, B, C)
    teacher = torch.randn(B, C, generator=torch.Generator().manual_seed(5))
    _, stats, _ = ops.kd_rows_forward(student, teacher, 0, 4.0, 4.0, 0.0, 0.5)
    grad_rows = torch.randn(T, B, generator=torch.Generator().manual_seed(6))
    pair = (torch.float32, torch.float32)
    off, _, vec_off = _kd_emulated_backward(kd_emu, pair, 0, grad_rows, student, teacher, False, stats,
                                            (4.0, 4.0, 0.0), grad_u=False, allow_packed=True)
    aligned, _, vec_aligned = _kd_emulated_backward(kd_emu, pair, 0, grad_rows, student.clone(), teacher, False,
                                                    stats, (4.0, 4.0, 0.0), grad_u=False, allow_packed=True)
    assert (vec_off, vec_aligned) == (1, 4)
    assert torch.equal(off, aligned)


@pytest.mark.parametrize("dtypes", list(KD_DTYPE_PAIRS), ids=KD_PAIR_IDS)
@pytest.mark.parametrize("shape", FORMS_GRAD_SHAPES, ids=[f"T{t}xB{b}xC{c}" for t, b, c in FORMS_GRAD_SHAPES])
def test_emulated_cuda_forward_forms_the_row_backwards_student_gradient(kd_emu, shape, dtypes):
    """kd_forward_student_grad_kernel, the eager GPU path's precomputed gradient (kd_autograd.cpp):
    its rows, statistics and keys are the forward kernel's bit for bit, and its student gradient at a
    row gradient of w is the row backward's at grad_rows = w bit for bit (the backward's formula with
    the same statistics), packed or one class per access, for every loss and dtype pair."""
    ops = torch.ops.snnkd_fast
    T, B, C = shape
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    for loss_name, loss in KD_LOSSES.items():
        for per_t in (False, True):
            student, teacher = _kd_inputs(shape, dtypes, per_t, ties=loss_name == "hta", seed=loss)
            for scalars, w in (((4.0, 4.0, 0.1, 0.5), 1 / (T * B)), ((1.0, 2.0, -0.3, 0.9), 1.0)):
                keys = ops.kd_rows_forward(student, teacher, loss, *scalars)[2]
                where = f"{loss_name} per_t={per_t} scalars={scalars}"
                for allow in (True, False):
                    rows, stats, e_keys, vec = _kd_emulated_forward(kd_emu, dtypes, loss, student, teacher, per_t,
                                                                    scalars, keys, allow)
                    g_rows, g_stats, g_keys, g_vec, grad = _kd_emulated_forward(
                        kd_emu, dtypes, loss, student, teacher, per_t, scalars, keys, allow, grad_weight=w)
                    assert g_vec == vec and torch.equal(g_keys, e_keys), where
                    assert torch.equal(g_rows, rows) and torch.equal(g_stats, stats), where
                    grad_rows = torch.full((T, B), w, dtype=acc)
                    expected, _, _ = _kd_emulated_backward(kd_emu, dtypes, loss, grad_rows, student, teacher, per_t,
                                                           stats, scalars[:3], grad_u=False, allow_packed=allow)
                    assert torch.equal(grad, expected), f"{where} packed={allow}"


@pytest.mark.parametrize("dtypes", list(KD_DTYPE_PAIRS), ids=KD_PAIR_IDS)
@pytest.mark.parametrize("shape", FORMS_GRAD_SHAPES, ids=[f"T{t}xB{b}xC{c}" for t, b, c in FORMS_GRAD_SHAPES])
def test_emulated_cuda_nld_forward_forms_the_row_backwards_student_gradient(kd_emu, shape, dtypes):
    """nld_forward_student_grad_kernel (the eager GPU path's precomputed NLD gradient): its rows and
    statistics are the forward kernel's bit for bit, and its student gradient at a row gradient of w
    is what the row sums and backward kernels give at grad_rows = w, bit for bit (the same per-class
    terms, summed in the same order), in every mode: mixture with the adaptive scale, with a fixed
    one, additive."""
    T, B, C = shape
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    seed = torch.tensor(987654321, dtype=torch.int64)
    for per_t in (False, True):
        student, teacher = _kd_inputs(shape, dtypes, per_t, ties=False, seed=3)
        for tau, weight, noise_std, additive, w in ((4.0, 0.1, None, False, 1 / (T * B)), (2.0, 0.3, 0.5, False, 1.0),
                                                    (1.0, 0.2, 0.4, True, 0.5)):
            where = f"per_t={per_t} tau={tau} noise_std={noise_std} additive={additive}"
            common_args = (ctypes.c_int64(T), ctypes.c_int64(B), ctypes.c_int64(C), _ptr(seed), ctypes.c_double(tau),
                           ctypes.c_double(weight), ctypes.c_double(-1.0 if noise_std is None else noise_std),
                           int(additive))
            rows, stats = torch.full((T, B), -7.0, dtype=acc), torch.full((T, B, 6), -7.0, dtype=acc)
            assert kd_emu.emu_nld_rows_forward(KD_DTYPE_PAIRS[dtypes], _ptr(student), _ptr(teacher), int(per_t),
                                               *common_args, _ptr(rows), _ptr(stats)) == 0
            g_rows, g_stats, grad = torch.full_like(rows, -7.0), torch.full_like(stats, -7.0), torch.full_like(
                student, -7.0)
            assert kd_emu.emu_nld_rows_forward_student_grad(
                KD_DTYPE_PAIRS[dtypes], _ptr(student), _ptr(teacher), int(per_t), *common_args, _ptr(g_rows),
                _ptr(g_stats), _ptr(grad), ctypes.c_double(w)) == 0
            assert torch.equal(g_rows, rows) and torch.equal(g_stats, stats), where
            expected, grad_rows = torch.full_like(student, -7.0), torch.full((T, B), w, dtype=acc)
            assert kd_emu.emu_nld_rows_backward(KD_DTYPE_PAIRS[dtypes], _ptr(grad_rows), _ptr(student), _ptr(teacher),
                                                int(per_t), *common_args, _ptr(stats), _ptr(expected), None) == 0
            assert torch.equal(grad, expected), where


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64], ids=str)
def test_emulated_cuda_scale_unless_one(kd_emu, grad_dtype, scale_dtype):
    """scale_unless_one_kernel: a scale of 1 leaves the gradient untouched (every block returns at
    once), any other multiplies every element -- over a grid-stride loop of fewer blocks than it needs,
    and a block of the last, partial stride -- in float (double for a double gradient), then rounds,
    as grad.mul_(scale) does."""
    codes = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(grad_dtype)
    for value in (1.0, 0.7, -3.0):
        scale = torch.tensor(value, dtype=scale_dtype)
        for blocks in (1, 3):
            got = grad.clone()
            assert kd_emu.emu_scale_unless_one(codes[grad_dtype], _ptr(got), ctypes.c_int64(got.numel()), _ptr(scale),
                                               int(scale_dtype == torch.float64), ctypes.c_int64(blocks)) == 0
            compute = compute_dtype(grad_dtype)
            expected = grad if value == 1.0 else (grad.to(compute) * scale.to(compute)).to(grad_dtype)
            assert torch.equal(got, expected) and torch.equal(got, grad.clone().mul_(scale)), (value, blocks)


@pytest.mark.parametrize("dtypes", list(KD_DTYPE_PAIRS), ids=KD_PAIR_IDS)
@pytest.mark.parametrize("shape", KD_SHAPES, ids=[f"T{t}xB{b}xC{c}" for t, b, c in KD_SHAPES])
def test_emulated_cuda_nld_kernels_match_the_cpu_ops(kd_emu, shape, dtypes):
    """NLD's CUDA kernels (forward, the mixture's row sums, backward; the noise they regenerate from
    the seed) against the CPU ops: the same Philox noise, rows and gradients to rounding."""
    ops = torch.ops.snnkd_fast
    T, B, C = shape
    seed = torch.tensor(123456789, dtype=torch.int64)
    for per_t in (False, True):
        student, teacher = _kd_inputs(shape, dtypes, per_t, ties=False)
        for tau, weight, noise_std, additive in ((4.0, 0.1, None, False), (2.0, 0.3, 0.5, False),
                                                 (1.0, 0.2, 0.4, True)):
            where = f"per_t={per_t} tau={tau} weight={weight} noise_std={noise_std} additive={additive}"
            std = 0.0 if noise_std is None else noise_std
            rows, stats = ops.nld_rows_forward(student, teacher, seed, tau, weight, std, noise_std is None, additive)
            e_rows, e_stats = torch.full_like(rows, -7.0), torch.full_like(stats, -7.0)
            common_args = (ctypes.c_int64(T), ctypes.c_int64(B), ctypes.c_int64(C), _ptr(seed), ctypes.c_double(tau),
                           ctypes.c_double(weight), ctypes.c_double(-1.0 if noise_std is None else noise_std),
                           int(additive))
            assert kd_emu.emu_nld_rows_forward(KD_DTYPE_PAIRS[dtypes], _ptr(student), _ptr(teacher), int(per_t), *common_args,
                                               _ptr(e_rows), _ptr(e_stats)) == 0
            _kd_close(e_rows, rows, f"rows: {where}")
            _kd_close(e_stats, stats, f"stats: {where}")
            grad_rows = torch.randn(T, B, generator=torch.Generator().manual_seed(1),
                                    dtype=torch.float64).to(rows.dtype)
            grad_s, grad_u = ops.nld_rows_backward(grad_rows, student, teacher, seed, stats, tau, weight, std,
                                                   noise_std is None, additive, True)
            e_grad_s, e_grad_u = torch.full_like(grad_s, -7.0), torch.full_like(grad_u, -7.0)
            assert kd_emu.emu_nld_rows_backward(KD_DTYPE_PAIRS[dtypes], _ptr(grad_rows), _ptr(student), _ptr(teacher),
                                                int(per_t), *common_args, _ptr(e_stats), _ptr(e_grad_s),
                                                _ptr(e_grad_u)) == 0
            _kd_close(e_grad_s, grad_s, f"grad student: {where}")
            _kd_close(e_grad_u, grad_u, f"grad teacher: {where}")
    noise = ops.nld_noise(seed, [T * B, C])
    for blocks in (1, 3):  # the kernel's grid-stride loop, as for grids capped at 8192 blocks
        e_noise = torch.full_like(noise, -7.0)
        assert kd_emu.emu_nld_noise(_ptr(seed), _ptr(e_noise), ctypes.c_int64(noise.numel()), ctypes.c_int64(C),
                                    ctypes.c_int64(blocks)) == 0
        torch.testing.assert_close(e_noise, noise, rtol=1e-6, atol=1e-6)
