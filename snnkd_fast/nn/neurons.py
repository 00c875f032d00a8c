"""Drop-in replacements for SpikingJelly 2.0's ``LIFNode``, ``IFNode`` and ``ParametricLIFNode``.

Same constructor arguments (``surrogate_function`` may be a SpikingJelly surrogate object, a
:class:`snnkd_fast.Surrogate`, or a name), same ``step_mode`` ("s": one step ``[N, ...]`` per
call; "m": a sequence ``[T, N, ...]``), same state handling: ``self.v`` starts as the float
``v_reset`` (0.0 for a soft reset), becomes the membrane tensor after a call, carries the autograd
graph across calls (so single-step BPTT works) and returns to the float on :meth:`reset`. The extra
``backend`` argument chooses the kernel ("auto" by default), ``backward`` ("bptt" or "rate") the
gradient and ``recompute_h`` what the BPTT keeps for it: see :func:`snnkd_fast.lif_multistep` (a PLIF's
``w`` must not require grad with "rate").
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..lif.op import _make_config, check_recompute_h, neuron_multistep
from ..lif.params import NEURON_IF, NEURON_LIF, NEURON_PLIF


class _MultiStepNeuron(nn.Module):
    _neuron: int
    _op_name: str

    def __init__(self, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0, surrogate_function="sigmoid",
                 detach_reset: bool = False, step_mode: str = "s", store_v_seq: bool = False,
                 backend: str = "auto", tau: Optional[float] = None, decay_input: bool = True,
                 backward: str = "bptt", recompute_h: Optional[bool] = None):
        super().__init__()
        if step_mode not in ("s", "m"):
            raise ValueError(f"{type(self).__name__}: step_mode must be 's' or 'm', got {step_mode!r}")
        if store_v_seq:
            raise ValueError(f"{type(self).__name__}: store_v_seq=True is not supported: snnkd_fast neurons never "
                             "materialise the [T, ...] membrane (that is where their memory saving comes from); "
                             "use SpikingJelly's node for monitoring the membrane")
        self.tau = tau
        self.decay_input = decay_input
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.surrogate_function = surrogate_function
        self.detach_reset = detach_reset
        self.step_mode = step_mode
        self.backend = backend
        if backward not in ("bptt", "rate"):
            raise ValueError(f"{type(self).__name__}: backward must be 'bptt' or 'rate', got {backward!r}")
        self.backward = backward  # "rate": rate-based backpropagation (see snnkd_fast.lif_multistep)
        # True: keep x, recompute H in the backward (less memory)
        self.recompute_h = check_recompute_h(recompute_h, type(self).__name__)
        self._config()  # validate now: a bad argument fails at construction, naming the argument
        self.v: Union[float, torch.Tensor] = self._rest_value()

    def _rest_value(self) -> float:
        return 0.0 if self.v_reset is None else float(self.v_reset)

    def _config(self):
        # Rebuilt on every call so that attribute changes (e.g. node.v_threshold = 0.5) take effect.
        return _make_config(type(self).__name__, self._neuron, self.tau, self.decay_input, self.v_threshold,
                            self.v_reset, self.detach_reset, self.surrogate_function, None)

    def reset(self) -> None:
        """Forget the membrane (SpikingJelly's ``functional.reset_net`` calls this)."""
        self._set_v(self._rest_value())

    def _set_v(self, value: Union[float, torch.Tensor]) -> None:
        # v is a plain attribute (never a parameter, buffer or submodule): set directly, it skips
        # nn.Module.__setattr__'s checks, ~1.2 us of a small layer's call and again of its reset.
        # While torch.compile traces, through __setattr__, the path its tracer models.
        if torch.compiler.is_compiling():
            self.v = value
        else:
            self.__dict__["v"] = value

    def _w(self) -> Optional[torch.Tensor]:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: x must be a tensor, got {type(x).__name__}")
        x_seq = x if self.step_mode == "m" else x.unsqueeze(0)
        spikes, v_final = neuron_multistep(x_seq, self.v, self._w(), self._config(), self.backend, True, name,
                                           self.backward, self.recompute_h)
        self._set_v(v_final)
        return spikes if self.step_mode == "m" else spikes[0]

    def extra_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
                f"step_mode={self.step_mode}, surrogate_function={self.surrogate_function}, backend={self.backend}, "
                f"backward={self.backward}" + ("" if self.recompute_h is None else f", recompute_h={self.recompute_h}"))


class LIFNode(_MultiStepNeuron):
    """Leaky integrate-and-fire neuron; see :func:`snnkd_fast.lif_multistep` for the dynamics."""

    _neuron = NEURON_LIF

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate_function="sigmoid", detach_reset: bool = False,
                 step_mode: str = "s", store_v_seq: bool = False, backend: str = "auto", backward: str = "bptt",
                 recompute_h: Optional[bool] = None):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq, backend,
                         tau=tau, decay_input=decay_input, backward=backward, recompute_h=recompute_h)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + super().extra_repr()


class IFNode(_MultiStepNeuron):
    """Integrate-and-fire neuron (``H = V + X``); see :func:`snnkd_fast.if_multistep`."""

    _neuron = NEURON_IF

    def __init__(self, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0, surrogate_function="sigmoid",
                 detach_reset: bool = False, step_mode: str = "s", store_v_seq: bool = False, backend: str = "auto",
                 backward: str = "bptt", recompute_h: Optional[bool] = None):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq, backend,
                         backward=backward, recompute_h=recompute_h)


class ParametricLIFNode(_MultiStepNeuron):
    """LIF with a learnable time constant: ``1/tau = sigmoid(w)``, ``w`` initialised to
    ``-log(init_tau - 1)`` as in SpikingJelly; see :func:`snnkd_fast.plif_multistep`."""

    _neuron = NEURON_PLIF

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate_function="sigmoid", detach_reset: bool = False,
                 step_mode: str = "s", store_v_seq: bool = False, backend: str = "auto", backward: str = "bptt",
                 recompute_h: Optional[bool] = None):
        if isinstance(init_tau, bool) or not isinstance(init_tau, (int, float)) or not init_tau > 1.0:
            raise ValueError(f"ParametricLIFNode: init_tau must be a float > 1, got {init_tau!r}")
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq, backend,
                         decay_input=decay_input, backward=backward, recompute_h=recompute_h)
        self.w = nn.Parameter(torch.as_tensor(-math.log(init_tau - 1.0)))

    def _w(self) -> torch.Tensor:
        return self.w

    def extra_repr(self) -> str:
        tau = 1.0 / self.w.detach().sigmoid().item()
        return f"tau={tau:.4f}, decay_input={self.decay_input}, " + super().extra_repr()
