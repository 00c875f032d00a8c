"""Fused KD-loss ops: torch.library registration, autograd, and the per-row engine every loss uses.

Each fused loss is computed as per-row losses ``rows [T, B]`` (one row = one timestep of one sample)
by a kernel that never materialises a ``[T, B, C]`` temporary; the batch/time reduction is then an
ordinary PyTorch op on ``rows`` (O(T*B)), so autograd hands the kernel's backward ``grad_rows``. In
eager mode the cpp and cuda backends fold that reduction into one C++ autograd node instead
(snnkd_fast::kd_loss / nld_loss, csrc/kd/kd_autograd.cpp: :func:`kd_loss`, :func:`nld_loss` here),
with the same reduction op for op.

Backends: "torch" (the readable references of snnkd_fast.kd.reference), "triton"
(snnkd_fast/kd/triton.py), "cpp" (csrc/kd). The op saves the inputs (by reference, no copy), the
per-row statistics [T, B, 5] and, for HTA, the teacher's head description [Tt, B, 3].
"""
from __future__ import annotations

import torch

from .._backends import triton_interpret, triton_launch_guard
from .._library import call_with_autograd, cxx_autograd_applies, register_autograd
from .params import HTA_NUM, NUM_STATS
from .reference import reduce_rows, reduction_divisor

Tensor = torch.Tensor


def _rows_forward_fake(student, teacher, loss, temperature, entropy_temperature, entropy_weight, head_threshold):
    T, B, _ = student.shape
    teacher_rows = teacher.shape[0] if teacher.dim() == 3 else 1
    keys_rows = teacher_rows if loss == 2 else 0
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    return (student.new_empty((T, B), dtype=acc), student.new_empty((T, B, NUM_STATS), dtype=acc),
            student.new_empty((keys_rows, B, HTA_NUM), dtype=torch.int32))


def _rows_backward_fake(grad_rows, student, teacher, stats, keys, loss, temperature, entropy_temperature,
                        entropy_weight, teacher_grad):
    return (torch.empty_like(student, memory_format=torch.contiguous_format),
            torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad
            else teacher.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    student, teacher, loss, temperature, entropy_temperature, entropy_weight, _ = inputs
    _, stats, keys = output
    ctx.save_for_backward(student, teacher, stats, keys)
    ctx.params = (loss, temperature, entropy_temperature, entropy_weight)
    ctx.mark_non_differentiable(stats, keys)


def _make_backward(backward_op):
    def backward(ctx, grad_rows, _grad_stats, _grad_keys):
        student, teacher, stats, keys = ctx.saved_tensors
        teacher_grad = ctx.needs_input_grad[1]
        grad_student, grad_teacher = backward_op(grad_rows.contiguous(), student, teacher, stats, keys, *ctx.params,
                                                 teacher_grad)
        return (grad_student if ctx.needs_input_grad[0] else None, grad_teacher if teacher_grad else None,
                None, None, None, None, None)

    return backward


def _register(forward_name: str, backward_name: str, backward_op) -> None:
    torch.library.register_fake(forward_name)(_rows_forward_fake)
    torch.library.register_fake(backward_name)(_rows_backward_fake)
    register_autograd(forward_name, _make_backward(backward_op), _setup_context)


@torch.library.custom_op("snnkd_fast::kd_rows_forward_triton", mutates_args=())
def _kd_rows_forward_triton(student: Tensor, teacher: Tensor, loss: int, temperature: float,
                            entropy_temperature: float, entropy_weight: float,
                            head_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton as kernels

    with triton_launch_guard():
        return kernels.kd_rows_forward(student, teacher, loss, temperature, entropy_temperature, entropy_weight,
                                       head_threshold)


@torch.library.custom_op("snnkd_fast::kd_rows_backward_triton", mutates_args=())
def _kd_rows_backward_triton(grad_rows: Tensor, student: Tensor, teacher: Tensor, stats: Tensor, keys: Tensor,
                             loss: int, temperature: float, entropy_temperature: float, entropy_weight: float,
                             teacher_grad: bool) -> tuple[Tensor, Tensor]:
    from . import triton as kernels

    with triton_launch_guard():
        grad_student, grad_teacher = kernels.kd_rows_backward(grad_rows, student, teacher, stats, keys, loss,
                                                              temperature, entropy_temperature, entropy_weight,
                                                              teacher_grad)
    return grad_student, grad_teacher if grad_teacher is not None else teacher.new_empty((0,))


_register("snnkd_fast::kd_rows_forward_triton", "snnkd_fast::kd_rows_backward_triton",
          torch.ops.snnkd_fast.kd_rows_backward_triton)

if hasattr(torch.ops.snnkd_fast, "kd_rows_forward"):  # the C++ extension is built
    _register("snnkd_fast::kd_rows_forward", "snnkd_fast::kd_rows_backward", torch.ops.snnkd_fast.kd_rows_backward)


def kd_rows(student_seq: Tensor, teacher: Tensor, loss: int, backend: str, temperature: float,
            entropy_temperature: float, entropy_weight: float, head_threshold: float) -> Tensor:
    """Per-row losses [T, B] (float32) of a validated call on a kernel backend."""
    name = "snnkd_fast::kd_rows_forward_triton" if backend == "triton" else "snnkd_fast::kd_rows_forward"
    rows, _, _ = call_with_autograd(name, student_seq, teacher, loss, float(temperature), float(entropy_temperature),
                                    float(entropy_weight), float(head_threshold))
    return rows


def _reduced_fake(student, teacher, divisor):
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    return student.new_empty(student.shape[:2] if divisor == 0 else (), dtype=acc)


if hasattr(torch.ops.snnkd_fast, "kd_loss"):  # the C++ eager ops: fake kernels, so that opcheck and tracing work
    @torch.library.register_fake("snnkd_fast::kd_loss")
    def _kd_loss_fake(student, teacher, loss, temperature, entropy_temperature, entropy_weight, head_threshold,
                      divisor):
        return _reduced_fake(student, teacher, divisor)

    @torch.library.register_fake("snnkd_fast::nld_loss")
    def _nld_loss_fake(student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive, divisor):
        return _reduced_fake(student, teacher, divisor)


def _cxx_eager(backend: str) -> bool:
    # the cpp and cuda kernels have C++ autograd ops (csrc/kd/kd_autograd.cpp); Triton's are Python
    return backend != "triton" and cxx_autograd_applies()


def kd_loss(student_seq: Tensor, teacher: Tensor, loss: int, backend: str, temperature: float,
            entropy_temperature: float, entropy_weight: float, head_threshold: float, reduction: str,
            num_classes: int, time_averaged: bool = False) -> Tensor:
    """The reduced loss of a validated call on a kernel backend: the rows [T, B] through
    :func:`reduce_rows` (``time_averaged``: a [1, B, C] student standing for the time-averaged
    logits, whose "none" is [B]). Eager cpp/cuda calls take snnkd_fast::kd_loss (rows and reduction
    in one C++ autograd node); torch.compile, torch.func and Triton the row op and reduce_rows."""
    if _cxx_eager(backend):
        divisor = reduction_divisor(reduction, student_seq.shape[0], student_seq.shape[1], num_classes)
        out = torch.ops.snnkd_fast.kd_loss(student_seq, teacher, loss, float(temperature), float(entropy_temperature),
                                           float(entropy_weight), float(head_threshold), divisor)
        return out[0] if time_averaged and divisor == 0 else out
    rows = kd_rows(student_seq, teacher, loss, backend, temperature, entropy_temperature, entropy_weight,
                   head_threshold)
    return reduce_rows(rows[0] if time_averaged else rows, reduction, num_classes)


# ------------------------------------------------------------------------------------------------
# NLD (noise-smoothed logits): its own row kernels, the noise regenerated from a seed tensor
# ------------------------------------------------------------------------------------------------

NLD_NUM_STATS = 6


def _nld_forward_fake(student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive):
    T, B, _ = student.shape
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    return student.new_empty((T, B), dtype=acc), student.new_empty((T, B, NLD_NUM_STATS), dtype=acc)


def _nld_backward_fake(grad_rows, student, teacher, seed, stats, temperature, noise_weight, noise_std, adaptive,
                       additive, teacher_grad):
    return (torch.empty_like(student, memory_format=torch.contiguous_format),
            torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad
            else teacher.new_empty((0,)))


def _nld_setup_context(ctx, inputs, output):
    student, teacher, seed, *params = inputs
    ctx.save_for_backward(student, teacher, seed, output[1])
    ctx.params = tuple(params)
    ctx.mark_non_differentiable(output[1])


def _make_nld_backward(backward_op):
    def backward(ctx, grad_rows, _grad_stats):
        student, teacher, seed, stats = ctx.saved_tensors
        teacher_grad = ctx.needs_input_grad[1]
        grad_student, grad_teacher = backward_op(grad_rows.contiguous(), student, teacher, seed, stats, *ctx.params,
                                                 teacher_grad)
        return (grad_student if ctx.needs_input_grad[0] else None, grad_teacher if teacher_grad else None,
                None, None, None, None, None, None)

    return backward


def _register_nld(forward_name: str, backward_name: str, backward_op) -> None:
    torch.library.register_fake(forward_name)(_nld_forward_fake)
    torch.library.register_fake(backward_name)(_nld_backward_fake)
    register_autograd(forward_name, _make_nld_backward(backward_op), _nld_setup_context)


@torch.library.custom_op("snnkd_fast::nld_rows_forward_triton", mutates_args=())
def _nld_rows_forward_triton(student: Tensor, teacher: Tensor, seed: Tensor, temperature: float, noise_weight: float,
                             noise_std: float, adaptive: bool, additive: bool) -> tuple[Tensor, Tensor]:
    from . import nld_triton as kernels

    with triton_launch_guard():
        return kernels.nld_rows_forward(student, teacher, seed, temperature, noise_weight, noise_std, adaptive,
                                        additive)


@torch.library.custom_op("snnkd_fast::nld_rows_backward_triton", mutates_args=())
def _nld_rows_backward_triton(grad_rows: Tensor, student: Tensor, teacher: Tensor, seed: Tensor, stats: Tensor,
                              temperature: float, noise_weight: float, noise_std: float, adaptive: bool,
                              additive: bool, teacher_grad: bool) -> tuple[Tensor, Tensor]:
    from . import nld_triton as kernels

    with triton_launch_guard():
        grad_student, grad_teacher = kernels.nld_rows_backward(grad_rows, student, teacher, seed, stats, temperature,
                                                               noise_weight, noise_std, adaptive, additive,
                                                               teacher_grad)
    return grad_student, grad_teacher if grad_teacher is not None else teacher.new_empty((0,))


_register_nld("snnkd_fast::nld_rows_forward_triton", "snnkd_fast::nld_rows_backward_triton",
              torch.ops.snnkd_fast.nld_rows_backward_triton)

if hasattr(torch.ops.snnkd_fast, "nld_rows_forward"):
    _register_nld("snnkd_fast::nld_rows_forward", "snnkd_fast::nld_rows_backward",
                  torch.ops.snnkd_fast.nld_rows_backward)


def nld_rows(student_seq: Tensor, teacher: Tensor, seed: Tensor, backend: str, temperature: float,
             noise_weight: float, noise_std, additive: bool) -> Tensor:
    """Per-row NLD losses [T, B] on a kernel backend. ``noise_std=None``: the adaptive scale."""
    name = "snnkd_fast::nld_rows_forward_triton" if backend == "triton" else "snnkd_fast::nld_rows_forward"
    rows, _ = call_with_autograd(name, student_seq, teacher, seed, float(temperature), float(noise_weight),
                                 0.0 if noise_std is None else float(noise_std), noise_std is None, additive)
    return rows


def nld_loss(student_seq: Tensor, teacher: Tensor, seed: Tensor, backend: str, temperature: float,
             noise_weight: float, noise_std, additive: bool, reduction: str, num_classes: int,
             time_averaged: bool = False) -> Tensor:
    """:func:`kd_loss` for NLD: snnkd_fast::nld_loss on the eager cpp/cuda path, else the row op and
    reduce_rows."""
    if _cxx_eager(backend):
        divisor = reduction_divisor(reduction, student_seq.shape[0], student_seq.shape[1], num_classes)
        out = torch.ops.snnkd_fast.nld_loss(student_seq, teacher, seed, float(temperature), float(noise_weight),
                                            0.0 if noise_std is None else float(noise_std), noise_std is None,
                                            additive, divisor)
        return out[0] if time_averaged and divisor == 0 else out
    rows = nld_rows(student_seq, teacher, seed, backend, temperature, noise_weight, noise_std, additive)
    return reduce_rows(rows[0] if time_averaged else rows, reduction, num_classes)


def nld_noise(seed: Tensor, shape, backend: str) -> Tensor:
    """The standard-normal eps a kernel backend draws for ``seed`` (a test helper: the reference can
    consume the same noise). Element i of the flattened ``shape`` is the noise of element i of the
    flattened [rows, C] student."""
    if backend == "triton":
        from . import nld_triton as kernels

        if seed.device.type == "cpu" and not triton_interpret():  # compiled Triton draws on the GPU
            return nld_noise(seed.cuda(), shape, backend).cpu()
        with triton_launch_guard():
            return kernels.draw_noise(seed, shape)
    return torch.ops.snnkd_fast.nld_noise(seed, list(shape))
