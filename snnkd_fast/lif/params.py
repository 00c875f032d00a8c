"""Validated configuration of one multi-step neuron call, shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Neuron kinds; the NeuronKind enum of csrc/lif/lif_math.h and NEURON of snnkd_fast/lif/triton.py.
NEURON_IF = 0
NEURON_LIF = 1
NEURON_PLIF = 2
NEURON_NAMES = {NEURON_IF: "IF", NEURON_LIF: "LIF", NEURON_PLIF: "PLIF"}


@dataclass(frozen=True)
class NeuronConfig:
    neuron: int                 # NEURON_IF / NEURON_LIF / NEURON_PLIF
    tau: float                  # LIF: H = V + (X - (V - v_rest)) / tau (unused by IF and PLIF)
    decay_input: bool
    v_threshold: float
    v_reset: Optional[float]    # None: soft reset (subtract v_threshold on a spike)
    detach_reset: bool
    surrogate: int              # row id of snnkd_fast.lif.surrogates.SURROGATES
    alpha: float

    @property
    def soft_reset(self) -> bool:
        return self.v_reset is None

    @property
    def v_rest(self) -> float:
        """The membrane's resting value in the charge: v_reset, or 0 with a soft reset."""
        return 0.0 if self.v_reset is None else self.v_reset

    def op_args(self) -> tuple:
        """Scalar arguments of the snnkd_fast::lif_forward schema, in order."""
        return (self.neuron, float(self.tau), self.decay_input, float(self.v_threshold), float(self.v_rest),
                self.soft_reset, self.detach_reset, self.surrogate, float(self.alpha))


def broadcasts_v_init(v_init_numel: int, step_numel: int) -> bool:
    """Whether a v_init of ``v_init_numel`` elements, given for a step of ``step_numel`` neurons, is
    one value for every neuron (a one-element tensor for several neurons: the CPU kernels read the
    value, the GPU ones get it expanded; it gets no gradient, grad_v_init is empty). The C++ twin is
    ``broadcast_v_init`` in csrc/lif/lif_ops.h."""
    return v_init_numel == 1 and step_numel != 1


def config_from_op_args(neuron: int, tau: float, decay_input: bool, v_threshold: float, v_reset: float,
                        soft_reset: bool, detach_reset: bool, surrogate: int, alpha: float) -> NeuronConfig:
    """Inverse of :meth:`NeuronConfig.op_args` (the op schema carries v_rest and soft_reset)."""
    return NeuronConfig(neuron, tau, decay_input, v_threshold, None if soft_reset else v_reset, detach_reset,
                        surrogate, alpha)
