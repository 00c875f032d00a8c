"""One tolerance table for the whole suite: values tight, gradients looser, half types loosest.

Spikes are compared exactly (``torch.equal``) in every dtype: the kernels compute the membrane in
float32 (float64 for float64 input) with the reference's operation order, so a spike can only
differ if a kernel is wrong.
"""
import torch

# (rtol, atol) for gradients of kernels vs the reference (or a peer), by input dtype. They differ only
# by the order of the backward's float operations, but the reset term (v_reset - H) * sg cancels, so
# the absolute error of an O(1) gradient reaches ~T * eps; the half types are rounded once on output.
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}

# (rtol, atol) for values (membrane, losses) of kernels vs the reference.
VALUE_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (1e-2, 1e-3),
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for inputs of ``dtype`` (float32 for the half types): the
    tolerance of their float outputs -- a neuron's v_final, the v_init and w gradients, a loss value --
    whatever the input's dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_value_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    rtol, atol = VALUE_TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
