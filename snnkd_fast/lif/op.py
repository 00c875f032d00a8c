"""Public multi-step neuron ops: validation, backend choice, torch.library registration, autograd.

``lif_multistep`` / ``if_multistep`` / ``plif_multistep`` validate their arguments once, choose a
backend (``snnkd_fast._backends.resolve_backend``) and run one of

* ``torch``:  :func:`snnkd_fast.lif.reference.neuron_multistep_reference` (autograd through PyTorch ops);
* ``cpp`` / ``cuda``: ``torch.ops.snnkd_fast.lif_forward`` (csrc/, one schema with CPU and CUDA kernels);
* ``triton``: ``torch.ops.snnkd_fast.lif_forward_triton`` (snnkd_fast/lif/triton.py).

The compiled and Triton ops share one schema, one fake (meta) implementation and one autograd
formula, so ``torch.compile(fullgraph=True)`` traces through them and ``torch.library.opcheck`` passes.

Memory: the backward saves exactly one ``[T, ...]`` tensor, plus ``v_init`` (one step) and, for
PLIF, the decay scalar. On the GPU (cuda, triton) that tensor is the charged membrane ``h_seq`` in the
compute dtype (float32, or float64 for float64 inputs); spikes and the membrane after reset are
recomputed from it in the backward. On the CPU (cpp) it is the input ``x`` itself
(``lif_forward_lean`` / ``lif_backward_from_x``): the forward writes no H, the backward recomputes
it from ``x`` block by block in cache, bit for bit the forward's. 20 bytes per fp32 neuron-step move
over forward and backward instead of 24, and a bf16/fp16 ``x`` is kept in 2 bytes where H takes 4;
when ``x`` stays alive anyway (a leaf, or an input another op saves) nothing T-long is added at all.
The lean pair has CUDA kernels too, tested but not what the cuda backend runs: on an H200 their
first backward (H recharged into registers) lost more than the lean forward won (fwd+bwd 0.55-1.05x,
benchmarks/results/nvidia-h200/ab_neuron_pairs.json) for 0.51-0.69x of the saved-H pair's peak
memory; it now stages H in shared memory (T <= 64 in fp32), not yet timed on a GPU.
``_RECOMPUTE_H_DEVICES`` below is the devices' default; the ``recompute_h`` argument chooses per call.
A ``v_init`` of None or a float reaches the kernel ops as a one-element tensor, one value for every
neuron: the CPU kernels read the value, so no step-sized tensor is written and read again (8 of the
24 bytes per neuron a T=1 forward moved) and no gradient is written for it (4 of the backward's 16):
fwd+bwd at T=1 1.14-1.24x faster on the CPU. The CUDA and Triton kernels read the value too (no
[N] copy and no scratch gradient written: two kernel launches fewer per forward+backward).

NaN/inf policy (no host synchronisation is spent checking): a NaN input makes that neuron's membrane
NaN from then on and it never spikes (``NaN >= v_threshold`` is false), in every backend. A +inf
membrane spikes; with a hard reset the kernels then reset it to ``v_reset`` while the reference's
``s * v_reset + (1 - s) * h`` gives NaN (0 * inf), the one documented divergence.
"""
from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Optional, Union

import torch

from .._backends import resolve_backend, triton_launch_guard
from .._library import call_with_autograd, cxx_autograd_applies, register_autograd
from .params import (NEURON_IF, NEURON_LIF, NEURON_NAMES, NEURON_PLIF, NeuronConfig, broadcasts_v_init,
                     config_from_op_args)
from .reference import compute_dtype, neuron_multistep_rate_reference, neuron_multistep_reference
from .surrogates import resolve_surrogate

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------

def _forward_fake(x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset,
                  surrogate, alpha):
    acc = compute_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[1:], dtype=acc),
            x.new_empty(x.shape, dtype=acc))


def _backward_fake(grad_spikes, grad_v, seq, v_init, decay, grad_dtype, neuron, tau, decay_input, v_threshold,
                   v_reset, soft_reset, detach_reset, surrogate, alpha, decay_grad):
    # seq: the saved H (lif_backward) or the forward's input x (lif_backward_from_x)
    one_value = seq.numel() != 0 and broadcasts_v_init(v_init.numel(), math.prod(seq.shape[1:]))
    grad_v_init_shape = (0,) if one_value else seq.shape[1:]
    acc = compute_dtype(seq.dtype)
    return (seq.new_empty(seq.shape, dtype=grad_dtype), seq.new_empty(grad_v_init_shape, dtype=acc),
            seq.new_empty((), dtype=acc))


def _lean_forward_fake(x, v_init, decay, *scalars):
    # (spikes, v_final): lif_forward_lean, and the eager C++ ops neuron_multistep(_rate)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        x.shape[1:], dtype=compute_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    _save_context(ctx, inputs, output[2])  # h_seq: the one [T, ...] tensor kept
    ctx.mark_non_differentiable(output[2])


def _setup_lean_context(ctx, inputs, output):
    _save_context(ctx, inputs, inputs[0])  # x: the one [T, ...] tensor kept; the backward recomputes H


def _save_context(ctx, inputs, kept: Tensor):
    x, v_init, decay, *scalars = inputs
    if ctx.needs_input_grad[1] and broadcasts_v_init(v_init.numel(), math.prod(x.shape[1:])):
        raise ValueError("snnkd_fast::lif_forward: a one-element v_init stands for one value for every neuron and "
                         "gets no gradient; expand it to one step of x to differentiate it")
    ctx.save_for_backward(kept, v_init, decay)
    ctx.x_dtype = x.dtype
    ctx.scalars = tuple(scalars)
    ctx.set_materialize_grads(False)  # an unused spike or membrane output costs no zero tensor


def _make_backward(backward_op):
    # the first saved tensor is H (lif_backward) or x (lif_backward_from_x): the op knows which
    def backward(ctx, grad_spikes, grad_v, *_grad_h_seq):
        kept, v_init, decay = ctx.saved_tensors
        decay_grad = ctx.needs_input_grad[2]
        grad_x, grad_v_init, grad_decay = backward_op(
            None if grad_spikes is None else grad_spikes.contiguous(),
            None if grad_v is None else grad_v.contiguous(),
            kept, v_init, decay, ctx.x_dtype, *ctx.scalars, decay_grad)
        return ((grad_x, grad_v_init if ctx.needs_input_grad[1] else None, grad_decay if decay_grad else None)
                + (None,) * len(ctx.scalars))

    return backward


def _register(forward_name: str, backward_name: str, backward_op, lean: bool = False):
    torch.library.register_fake(forward_name)(_lean_forward_fake if lean else _forward_fake)
    torch.library.register_fake(backward_name)(_backward_fake)
    register_autograd(forward_name, _make_backward(backward_op), _setup_lean_context if lean else _setup_context)


_COMPILED_OPS_REGISTERED = False
if hasattr(torch.ops.snnkd_fast, "lif_forward"):  # the extension is built (see snnkd_fast._backends)
    _register("snnkd_fast::lif_forward", "snnkd_fast::lif_backward", torch.ops.snnkd_fast.lif_backward)
    # The CPU's pair (the cpp backend): no H written, recomputed from x in the backward (module docstring)
    _register("snnkd_fast::lif_forward_lean", "snnkd_fast::lif_backward_from_x",
              torch.ops.snnkd_fast.lif_backward_from_x, lean=True)
    _COMPILED_OPS_REGISTERED = True

    # The eager paths of lif_forward and lif_rate_forward on cpp/cuda (csrc/lif/lif_autograd.cpp: C++
    # autograd kernels of the formulas here); their fake kernel, so that opcheck and tracing work.
    torch.library.register_fake("snnkd_fast::neuron_multistep")(_lean_forward_fake)
    torch.library.register_fake("snnkd_fast::neuron_multistep_rate")(_lean_forward_fake)


@torch.library.custom_op("snnkd_fast::lif_forward_triton", mutates_args=())
def _lif_forward_triton(x: Tensor, v_init: Tensor, decay: Optional[Tensor], neuron: int, tau: float,
                        decay_input: bool, v_threshold: float, v_reset: float, soft_reset: bool, detach_reset: bool,
                        surrogate: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton as kernels  # imported on first use: importing triton costs ~1 s

    cfg = config_from_op_args(neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate,
                              alpha)
    with triton_launch_guard():
        return kernels.lif_forward(x, v_init, decay, cfg)


@torch.library.custom_op("snnkd_fast::lif_backward_triton", mutates_args=())
def _lif_backward_triton(grad_spikes: Optional[Tensor], grad_v: Optional[Tensor], h_seq: Tensor, v_init: Tensor,
                         decay: Optional[Tensor], grad_dtype: torch.dtype, neuron: int, tau: float, decay_input: bool,
                         v_threshold: float, v_reset: float, soft_reset: bool, detach_reset: bool, surrogate: int,
                         alpha: float, decay_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton as kernels

    cfg = config_from_op_args(neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate,
                              alpha)
    with triton_launch_guard():
        return kernels.lif_backward(grad_spikes, grad_v, h_seq, v_init, decay, grad_dtype, cfg, decay_grad)


_register("snnkd_fast::lif_forward_triton", "snnkd_fast::lif_backward_triton",
          torch.ops.snnkd_fast.lif_backward_triton)


# Rate-based backward (backward="rate"): the forward returns the eligibility e (one step) instead of
# H; the backward gives every timestep dL/dx[t] = (1/T) e sum_t' dL/dS[t'] (lif_multistep explains).
def _rate_forward_fake(x, v_init, decay, *scalars):
    acc = compute_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[1:], dtype=acc),
            x.new_empty(x.shape[1:], dtype=acc))


def _rate_setup_context(ctx, inputs, output):
    x = inputs[0]
    ctx.save_for_backward(output[2])  # the eligibility: O(N), nothing T-long
    ctx.x_dtype, ctx.num_steps, ctx.num_scalars = x.dtype, x.shape[0], len(inputs) - 3
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _rate_backward(ctx, grad_spikes, _grad_v, _grad_e):
    (eligibility,) = ctx.saved_tensors
    grad_x = None
    if grad_spikes is not None:
        grad_mean = grad_spikes.sum(0, dtype=eligibility.dtype) * (eligibility / ctx.num_steps)
        grad_x = grad_mean.to(ctx.x_dtype).unsqueeze(0).expand(ctx.num_steps, *grad_mean.shape)
    return (grad_x, None, None) + (None,) * ctx.num_scalars


def _register_rate(forward_name: str) -> None:
    torch.library.register_fake(forward_name)(_rate_forward_fake)
    register_autograd(forward_name, _rate_backward, _rate_setup_context)


@torch.library.custom_op("snnkd_fast::lif_rate_forward_triton", mutates_args=())
def _lif_rate_forward_triton(x: Tensor, v_init: Tensor, decay: Optional[Tensor], neuron: int, tau: float,
                             decay_input: bool, v_threshold: float, v_reset: float, soft_reset: bool,
                             detach_reset: bool, surrogate: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton as kernels

    cfg = config_from_op_args(neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate,
                              alpha)
    with triton_launch_guard():
        return kernels.lif_forward(x, v_init, decay, cfg, rate=True)


_register_rate("snnkd_fast::lif_rate_forward_triton")
if hasattr(torch.ops.snnkd_fast, "lif_rate_forward"):
    _register_rate("snnkd_fast::lif_rate_forward")


# --------------------------------------------------------------------------------------------------
# validation (once, at the public entry; kernels assume valid input)
# --------------------------------------------------------------------------------------------------

def _check_real(value, name: str, op_name: str) -> float:
    if type(value) is float and math.isfinite(value):  # the usual case, without the ~0.4 us ABC check below
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op_name}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op_name}: {name} must be finite, got {value}")
    return value


def _check_flag(value, name: str, op_name: str) -> bool:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise TypeError(f"{op_name}: {name} must be a bool, got {value!r}")
    return bool(value)


def _check_x_seq(x_seq, op_name: str) -> None:
    if not isinstance(x_seq, Tensor):
        raise TypeError(f"{op_name}: x_seq must be a torch.Tensor, got {type(x_seq).__name__}")
    if x_seq.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op_name}: x_seq must be float16, bfloat16, float32 or float64, got {x_seq.dtype}")
    if x_seq.dim() < 1:
        raise ValueError(f"{op_name}: x_seq must have a leading time dimension [T, ...], got a 0-dim tensor")
    if x_seq.shape[0] == 0:
        raise ValueError(f"{op_name}: x_seq has T=0 timesteps (shape {tuple(x_seq.shape)}); need T >= 1")


def _checked_v_init(v_init, x_seq: Tensor, op_name: str):
    """v_init validated (before any backend is chosen, so a bad argument is named whatever the backend):
    None, a finite float, or the tensor as one step of x_seq in the compute dtype (a differentiable
    view/copy of the user's tensor, so its gradient flows back, summed over broadcast dimensions)."""
    if v_init is None:
        return None
    if isinstance(v_init, Real) and not isinstance(v_init, bool):
        return _check_real(v_init, "v_init", op_name)
    if not isinstance(v_init, Tensor):
        raise TypeError(f"{op_name}: v_init must be None, a float or a tensor, got {type(v_init).__name__}")
    if v_init.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op_name}: v_init must be a floating-point tensor, got {v_init.dtype}")
    if v_init.device != x_seq.device:
        raise ValueError(f"{op_name}: v_init is on {v_init.device} but x_seq is on {x_seq.device}")
    step_shape = x_seq.shape[1:]
    try:
        return v_init.to(compute_dtype(x_seq.dtype)).expand(step_shape)
    except RuntimeError:
        raise ValueError(f"{op_name}: v_init has shape {tuple(v_init.shape)}, which does not broadcast to one "
                         f"step of x_seq, {tuple(step_shape)}") from None


def _initial_membrane(v_init, x_seq: Tensor, cfg: NeuronConfig, one_value: bool = False) -> Tensor:
    """The initial membrane as a tensor, from _checked_v_init's result (a tensor passes through).
    ``one_value``: the kernel ops take None or a float as a one-element tensor (one value for every
    neuron: no [N] tensor written and read again, 8 of a T=1 forward's 24 bytes per neuron)."""
    if isinstance(v_init, Tensor):
        return v_init
    fill_shape = (1,) if one_value and x_seq.numel() > 0 else x_seq.shape[1:]
    value = cfg.v_rest if v_init is None else v_init
    return torch.full(fill_shape, value, dtype=compute_dtype(x_seq.dtype), device=x_seq.device)


def _check_w(w, x_seq: Tensor, op_name: str) -> Tensor:
    if isinstance(w, Real) and not isinstance(w, bool):
        return torch.tensor(_check_real(w, "w", op_name), dtype=compute_dtype(x_seq.dtype), device=x_seq.device)
    if not isinstance(w, Tensor):
        raise TypeError(f"{op_name}: w must be a one-element tensor (decay = sigmoid(w)), got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op_name}: w must be a floating-point tensor, got {w.dtype}")
    if w.numel() != 1:
        raise ValueError(f"{op_name}: w must hold one element (a scalar parameter), got shape {tuple(w.shape)}")
    if w.device != x_seq.device:
        raise ValueError(f"{op_name}: w is on {w.device} but x_seq is on {x_seq.device}")
    return w


def _make_config(op_name: str, neuron: int, tau, decay_input, v_threshold, v_reset, detach_reset, surrogate,
                 alpha) -> NeuronConfig:
    """The validated config of a neuron call. Building one costs ~3.5 us, most of a small layer's Python
    time (an nn module builds it on every call, so that changed attributes take effect): the usual
    arguments -- floats, bools, a surrogate by name -- are looked up in a small cache instead. Only
    those: an int or a bool where a float goes must still fail or convert as below (True == 1 as a key),
    and a SpikingJelly surrogate object's alpha can change under the same object."""
    args = (op_name, neuron, tau, decay_input, v_threshold, v_reset, detach_reset, surrogate, alpha)
    if (type(surrogate) is str and type(decay_input) is bool and type(detach_reset) is bool
            and all(value is None or type(value) is float for value in (tau, v_threshold, v_reset, alpha))
            and not torch.compiler.is_compiling()):  # torch.compile traces the build (it warns on lru_cache)
        return _cached_config(*args)
    return _build_config(*args)


@functools.lru_cache(maxsize=256)
def _cached_config(*args) -> NeuronConfig:
    return _build_config(*args)


def _build_config(op_name: str, neuron: int, tau, decay_input, v_threshold, v_reset, detach_reset, surrogate,
                  alpha) -> NeuronConfig:
    if neuron == NEURON_LIF:
        tau = _check_real(tau, "tau", op_name)
        if tau <= 1.0:
            raise ValueError(f"{op_name}: tau must be > 1 (the membrane keeps 1 - 1/tau of itself per step), "
                             f"got {tau}")
    spec, alpha = resolve_surrogate(surrogate, alpha)
    return NeuronConfig(
        neuron=neuron, tau=tau if neuron == NEURON_LIF else 2.0,
        decay_input=_check_flag(decay_input, "decay_input", op_name),
        v_threshold=_check_real(v_threshold, "v_threshold", op_name),
        v_reset=None if v_reset is None else _check_real(v_reset, "v_reset", op_name),
        detach_reset=_check_flag(detach_reset, "detach_reset", op_name),
        surrogate=spec.id, alpha=alpha)


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------

BACKWARD_MODES = ("bptt", "rate")

_KERNEL_OPS = {  # (backend, backward) -> op name in torch.ops.snnkd_fast (cpp/cuda BPTT: _bptt_op)
    ("triton", "bptt"): "lif_forward_triton",
    ("cpp", "rate"): "lif_rate_forward", ("cuda", "rate"): "lif_rate_forward",
    ("triton", "rate"): "lif_rate_forward_triton",
}

# The devices whose cpp/cuda BPTT runs the lean pair (lif_forward_lean / lif_backward_from_x: no H
# saved, H recomputed from x in the backward) instead of the saved-H pair (lif_forward /
# lif_backward). Both pairs give the same bits. The CPU: measured faster (README). CUDA: the lean
# kernels are registered and tested; their register-resident backward measured slower on an H200
# (module docstring), and CUDA joins this set once benchmarks/ab_neuron_pairs.py shows the
# shared-memory backward's gain. One switch for the eager C++ node (neuron_multistep's recompute_h)
# and the torch.library path alike.
_RECOMPUTE_H_DEVICES = frozenset({"cpu"})


def _recomputes_h(x_seq: Tensor) -> bool:
    return x_seq.device.type in _RECOMPUTE_H_DEVICES


def check_recompute_h(recompute_h, op_name: str) -> Optional[bool]:
    """``recompute_h`` is None, True or False (the functions, the nn modules and replace_neurons)."""
    if recompute_h is not None and not isinstance(recompute_h, bool):
        raise TypeError(f"{op_name}: recompute_h must be None, True or False, got {recompute_h!r}")
    return recompute_h


def _resolve_recompute_h(recompute_h, backend: str, backward: str, x_seq: Tensor, op_name: str) -> bool:
    """The user's ``recompute_h`` (None: the device's measured default) for the resolved backend; a
    choice that backend cannot honour is an error, not ignored."""
    if check_recompute_h(recompute_h, op_name) is None:
        return backend in ("cpp", "cuda") and backward == "bptt" and _recomputes_h(x_seq)
    if backend not in ("cpp", "cuda"):
        raise ValueError(f"{op_name}: recompute_h={recompute_h} chooses between the cpp and cuda kernels' two BPTT "
                         f"pairs; backend={backend!r} has one (the torch reference saves what autograd saves, the "
                         "Triton kernels save H): leave recompute_h=None")
    if backward != "bptt":
        raise ValueError(f"{op_name}: recompute_h={recompute_h} applies to backward='bptt'; backward='rate' keeps "
                         "only one step (the eligibility): leave recompute_h=None")
    return recompute_h


def _bptt_op(backend: str, recompute_h: bool) -> str:
    if backend == "triton":
        return _KERNEL_OPS[backend, "bptt"]
    return "lif_forward_lean" if recompute_h else "lif_forward"


def neuron_multistep(x_seq: Tensor, v_init, w: Optional[Tensor], cfg: NeuronConfig, backend: str,
                     return_v: bool, op_name: str, backward: str = "bptt", recompute_h: Optional[bool] = None):
    """Run a validated config. ``x_seq`` is checked here; ``cfg`` must come from :func:`_make_config`."""
    _check_x_seq(x_seq, op_name)
    return_v = _check_flag(return_v, "return_v", op_name)
    if backward not in BACKWARD_MODES:
        raise ValueError(f"{op_name}: backward={backward!r}; choose 'bptt' or 'rate'")
    # Every argument is checked before the backend is resolved: a bad one is named whatever the backend
    # (an unavailable one included).
    v_init = _checked_v_init(v_init, x_seq, op_name)
    if cfg.neuron == NEURON_PLIF:
        w = _check_w(w, x_seq, op_name)
        if backward == "rate" and w.requires_grad:
            raise ValueError(f"{op_name}: backward='rate' gives no gradient for PLIF's w (the rate approximation "
                             "has no time constant to differentiate); detach w or use backward='bptt'")
    backend = resolve_backend(backend, x_seq.device, op_name)
    recompute = _resolve_recompute_h(recompute_h, backend, backward, x_seq, op_name)
    v0 = _initial_membrane(v_init, x_seq, cfg, one_value=backend != "torch")
    if backend == "torch":
        run = neuron_multistep_rate_reference if backward == "rate" else neuron_multistep_reference
        spikes, v_final = run(x_seq, v0, w, cfg)
    else:
        if backend == "triton" and x_seq.dtype == torch.float64:
            raise TypeError(f"{op_name}: backend='triton' computes in float32 and does not take float64 input; "
                            "use backend='cpp', 'cuda' or 'torch' for float64")
        acc = compute_dtype(x_seq.dtype)
        decay = torch.sigmoid(w.to(acc)).reshape(()) if cfg.neuron == NEURON_PLIF else None
        if backend != "triton" and cxx_autograd_applies():
            # one C++ autograd node (csrc/lif/lif_autograd.cpp) instead of a Python autograd.Function
            if backward == "bptt":
                spikes, v_final = torch.ops.snnkd_fast.neuron_multistep(
                    x_seq.contiguous(), v0.contiguous(), decay, *cfg.op_args(), recompute)
            else:
                spikes, v_final = torch.ops.snnkd_fast.neuron_multistep_rate(x_seq.contiguous(), v0.contiguous(),
                                                                             decay, *cfg.op_args())
        else:
            name = _bptt_op(backend, recompute) if backward == "bptt" else _KERNEL_OPS[backend, backward]
            spikes, v_final = call_with_autograd("snnkd_fast::" + name, x_seq.contiguous(), v0.contiguous(), decay,
                                                 *cfg.op_args())[:2]
    return (spikes, v_final) if return_v else spikes


def lif_multistep(x_seq: Tensor, v_init: Union[Tensor, float, None] = None, *, tau: float = 2.0,
                  decay_input: bool = True, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                  detach_reset: bool = False, surrogate="sigmoid", alpha: Optional[float] = None,
                  backend: str = "auto", return_v: bool = False, backward: str = "bptt",
                  recompute_h: Optional[bool] = None):
    """Multi-step leaky integrate-and-fire neuron (SpikingJelly 2.0 ``LIFNode``, step_mode="m").

    Args:
        x_seq: input current ``[T, ...]``, float16/bfloat16/float32/float64, any strides
            (non-contiguous input is copied once).
        v_init: membrane before the first step: None (``v_reset``, or 0 with soft reset), a float, or a
            tensor broadcastable to ``x_seq.shape[1:]``; its gradient is computed.
        tau: membrane time constant, > 1. ``decay_input``: whether the input decays too.
        v_threshold: firing threshold (spike when ``H >= v_threshold``).
        v_reset: hard-reset value, or None for a soft reset (subtract ``v_threshold``).
        detach_reset: drop the reset path from the gradient.
        surrogate: "sigmoid", "atan", "piecewise_quadratic", "piecewise_exp", "soft_sign",
            "super_spike", "erf" (or SpikingJelly's class names / objects); ``alpha``: its sharpness,
            None for SpikingJelly's default (4.0 for sigmoid).
        backend: "auto", "torch" (reference), "cpp", "cuda", "triton".
        return_v: also return the final membrane (compute dtype: float32, float64 for float64 input).
        backward: "bptt" (default): exact surrogate-gradient backpropagation through time; saves the
            charged membrane, one [T, ...] tensor. "rate": rate-based backpropagation (Yu et al.,
            NeurIPS 2024): saves only the eligibility e = (1/T) sum_t sg[t] dH[t]/dx (one step) and
            gives every timestep dL/dx[t] = (1/T) e sum_t' dL/dS[t'] -- the gradient of the firing
            rate w.r.t. the mean input. Exact for the rate approximation through linear layers (conv,
            linear, average pooling, residual adds); max pooling and BatchNorm's statistics break it.
            In this mode v_init and the returned v_final carry no gradient.
        recompute_h: which tensor the cpp/cuda BPTT keeps for the backward (same results, bit for bit).
            None (default): the device's faster pair as measured (CPU: recompute; GPU: save H).
            True: keep only ``x_seq`` and recompute H in the backward -- nothing T-long is added when
            ``x_seq`` is alive anyway (on an H200 the fwd+bwd peak was 0.51-0.69x the saved-H
            pair's); False: save the charged membrane H (float32; float64 for float64 input).
            Other backends and backward="rate" have one choice and refuse True/False.

    Returns:
        spikes ``[T, ...]`` in ``x_seq``'s dtype, or ``(spikes, v_final)`` with ``return_v=True``.
    """
    cfg = _make_config("lif_multistep", NEURON_LIF, tau, decay_input, v_threshold, v_reset, detach_reset,
                       surrogate, alpha)
    return neuron_multistep(x_seq, v_init, None, cfg, backend, return_v, "lif_multistep", backward, recompute_h)


def if_multistep(x_seq: Tensor, v_init: Union[Tensor, float, None] = None, *, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, detach_reset: bool = False, surrogate="sigmoid",
                 alpha: Optional[float] = None, backend: str = "auto", return_v: bool = False,
                 backward: str = "bptt", recompute_h: Optional[bool] = None):
    """Multi-step integrate-and-fire neuron (SpikingJelly ``IFNode``): ``H = V + X``. Arguments and
    returns as :func:`lif_multistep`."""
    cfg = _make_config("if_multistep", NEURON_IF, None, False, v_threshold, v_reset, detach_reset, surrogate, alpha)
    return neuron_multistep(x_seq, v_init, None, cfg, backend, return_v, "if_multistep", backward, recompute_h)


def plif_multistep(x_seq: Tensor, w: Union[Tensor, float], v_init: Union[Tensor, float, None] = None, *,
                   decay_input: bool = True, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                   detach_reset: bool = False, surrogate="sigmoid", alpha: Optional[float] = None,
                   backend: str = "auto", return_v: bool = False, backward: str = "bptt",
                   recompute_h: Optional[bool] = None):
    """Multi-step parametric LIF neuron (SpikingJelly ``ParametricLIFNode``): the LIF charge with
    ``1/tau = sigmoid(w)``, ``w`` a learnable one-element tensor whose gradient the kernels compute
    (deterministic reduction over neurons and time). SpikingJelly initialises ``w = -log(init_tau - 1)``.
    Other arguments and returns as :func:`lif_multistep` (``backward="rate"`` needs a ``w`` that does
    not require grad)."""
    cfg = _make_config("plif_multistep", NEURON_PLIF, None, decay_input, v_threshold, v_reset, detach_reset,
                       surrogate, alpha)
    return neuron_multistep(x_seq, v_init, w, cfg, backend, return_v, "plif_multistep", backward, recompute_h)


__all__ = ["lif_multistep", "if_multistep", "plif_multistep", "neuron_multistep", "NEURON_NAMES"]
