"""Calling the registered kernel ops with autograd: through ``torch.library`` under ``torch.compile``,
through a plain ``torch.autograd.Function`` in eager mode.

Every kernel op is a ``torch.library`` op with a fake implementation and ``register_autograd``: that is
what ``torch.compile(fullgraph=True)`` traces and what ``torch.library.opcheck`` checks. In eager mode,
though, each call of such an op with a grad-requiring input runs its autograd kernel in Python
(default filling, redispatch), ~30 us a forward+backward on a CPU: as much as the whole kernel for a
``[4, 64, 100]`` loss, and more than it on a GPU. :func:`register_autograd` registers the formula with
torch.library and builds from the very same ``setup_context`` and backward an ``autograd.Function``
(:func:`eager_function`) that calls the op below the autograd dispatch key (straight to its CPU/CUDA
kernel); :func:`call_with_autograd` picks the registered op while compiling and that Function
otherwise. Both paths are tested against each other by the
compile tests (same outputs and gradients) and every eager test.

The cpp and cuda backends go one step further in eager mode: their ops have C++ twins with a C++
autograd kernel (csrc/common/eager_autograd.h; snnkd_fast::kd_loss, nld_loss, neuron_multistep,
neuron_multistep_rate), which :func:`cxx_autograd_applies` lets the losses and neurons call outside
torch.compile and torch.func transforms; this module's Function then serves Triton, torch.func, and
the C++ twins' tests (``CXX_AUTOGRAD = False``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable

_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _dispatch_below_autograd():
    # private but long-standing (torch.library's own autograd kernel uses it); without it the op's
    # autograd kernel just runs and finds nothing to record (grad mode is off in forward)
    return _below_autograd() if _below_autograd is not None else contextlib.nullcontext()


def eager_function(forward_op: Callable, setup_context: Callable, backward: Callable) -> type:
    """An ``autograd.Function`` computing ``forward_op(*inputs)`` with the autograd formula registered
    for it (``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grad_outputs)``, as given to
    ``torch.library.register_autograd``). First-order only, like the registered formula."""

    class EagerOp(torch.autograd.Function):
        # forward without ctx plus a setup_context staticmethod: the form torch.func transforms
        # (grad, vjp, jacrev) accept, which torch.library's own autograd wrapper is not
        @staticmethod
        def forward(*inputs):
            with _dispatch_below_autograd():
                return forward_op(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        @once_differentiable
        def backward(ctx, *grad_outputs):
            with _dispatch_below_autograd():
                return backward(ctx, *grad_outputs)

    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{getattr(forward_op, '__name__', 'op')}"
    return EagerOp


# qualified op name -> (the op, the eager Function of its autograd formula)
_REGISTERED: dict[str, tuple[Callable, type]] = {}


def register_autograd(qualified_name: str, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd(qualified_name, backward, setup_context=...)``, and the eager
    Function of the same formula that :func:`call_with_autograd` uses outside torch.compile."""
    torch.library.register_autograd(qualified_name, backward, setup_context=setup_context)
    namespace, name = qualified_name.split("::")
    op = getattr(getattr(torch.ops, namespace), name)
    _REGISTERED[qualified_name] = (op, eager_function(op, setup_context, backward))


# Function.apply binds the arguments to forward's signature with inspect on every call when
# setup_context is defined: a per_timestep_kl forward+backward on tiny CPU inputs took 84 us through
# it and takes 61 us without it. Our forwards take *inputs and are always given all of them, so the
# binding changes nothing; outside torch.func transforms, apply is then the C base's apply after
# unwrapping dead functorch wrappers, which is what call_with_autograd calls. Under a transform
# (grad, vjp, ...) it goes through Function.apply.
_unwrap_dead_wrappers = getattr(getattr(getattr(torch, "_functorch", None), "utils", None),
                                "unwrap_dead_wrappers", None)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def call_with_autograd(qualified_name: str, *inputs: Any):
    """The op registered as ``qualified_name`` on ``inputs``: the torch.library op while torch.compile
    traces; its eager Function where autograd records the call (or a torch.func transform is active:
    its wrappers decide); otherwise the op's kernel itself, below the autograd key -- under no_grad,
    or on inputs none of which requires grad, a Function's apply costs ~15 us of host time for
    nothing (an eval forward of a small layer: 41 -> 25 us)."""
    op, eager = _REGISTERED[qualified_name]
    if torch.compiler.is_compiling():
        return op(*inputs)
    if _unwrap_dead_wrappers is None or _transforms_active is None or _transforms_active():
        return eager.apply(*inputs)
    if torch.is_grad_enabled():
        for value in inputs:  # the first tensor input usually decides
            if isinstance(value, torch.Tensor) and value.requires_grad:
                return super(torch.autograd.Function, eager).apply(*_unwrap_dead_wrappers(inputs))
    with _dispatch_below_autograd():
        return op(*inputs)


# The eager cpp/cuda calls' C++ autograd kernels (csrc/common/eager_autograd.h) on or off: off, they
# take the Python formulas' autograd.Function as torch.func does (the tests compare the two paths;
# SNNKD_FAST_CXX_AUTOGRAD=0 turns them off for a whole run).
CXX_AUTOGRAD = os.environ.get("SNNKD_FAST_CXX_AUTOGRAD", "1") != "0"


def cxx_autograd_applies() -> bool:
    """Whether an eager call may take an op's C++ autograd kernel (the cpp/cuda eager ops of
    csrc/common/eager_autograd.h, registered for the Autograd key: one C++ graph node per call, ~45 us
    less host time per loss forward+backward on a CPU than the Python Function and a separate
    reduction): outside torch.compile, whose tracing goes through the torch.library formulas, and
    outside torch.func transforms, whose wrappers need the Python autograd.Function (when torch
    cannot tell, never)."""
    if not CXX_AUTOGRAD or torch.compiler.is_compiling() or _transforms_active is None:
        return False
    return not _transforms_active()
