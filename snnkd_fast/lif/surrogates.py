"""The surrogate-gradient table: one row per surrogate, shared by every backend.

The forward of a spiking neuron is a Heaviside step; its backward replaces the step's derivative
(zero almost everywhere) with the derivative of a smooth "primitive" function. Names, default
``alpha`` values and derivative formulas follow SpikingJelly 2.0 (``spikingjelly.activation_based.
surrogate``); the ids are the ``SurrogateKind`` enum of ``csrc/lif/lif_math.h`` and the ``KIND``
constexpr of ``snnkd_fast/lif/triton.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class SurrogateSpec:
    name: str                # our name (snake_case), used by the functional API
    id: int                  # kernel id (csrc/lif/lif_math.h SurrogateKind)
    default_alpha: float     # SpikingJelly's default
    spikingjelly_class: str  # SpikingJelly's class name
    derivative: Callable[[torch.Tensor, float], torch.Tensor]
    primitive: Callable[[torch.Tensor, float], torch.Tensor]  # smooth stand-in for Heaviside(x)


def _sigmoid_grad(x, a):
    s = torch.sigmoid(a * x)
    return (1 - s) * s * a


def _atan_grad(x, a):
    z = x * (math.pi / 2 * a)
    return (a / 2) / (1 + z * z)


def _piecewise_quadratic_grad(x, a):
    return (a - a * a * x.abs()).clamp_min(0)


def _piecewise_quadratic_primitive(x, a):
    inner = -a * a / 2 * x * x.abs() + a * x + 0.5
    return torch.where(x < -1 / a, torch.zeros_like(x), torch.where(x > 1 / a, torch.ones_like(x), inner))


def _piecewise_exp_grad(x, a):
    return (a / 2) * torch.exp(-a * x.abs())


def _piecewise_exp_primitive(x, a):
    return torch.where(x < 0, 0.5 * torch.exp(a * x.clamp_max(0)), 1 - 0.5 * torch.exp(-a * x.clamp_min(0)))


def _soft_sign_grad(x, a):
    z = 1 / a + x.abs()
    return 1 / (2 * a * z * z)


def _super_spike_grad(x, a):
    z = 1 + x.abs()
    return a / (z * z)


def _erf_grad(x, a):
    z = a * x
    return (a / math.sqrt(math.pi)) * torch.exp(-z * z)


SURROGATES: tuple[SurrogateSpec, ...] = (
    SurrogateSpec("sigmoid", 0, 4.0, "Sigmoid", _sigmoid_grad, lambda x, a: torch.sigmoid(a * x)),
    SurrogateSpec("atan", 1, 2.0, "ATan", _atan_grad,
                  lambda x, a: torch.atan(math.pi / 2 * a * x) / math.pi + 0.5),
    SurrogateSpec("piecewise_quadratic", 2, 1.0, "PiecewiseQuadratic", _piecewise_quadratic_grad,
                  _piecewise_quadratic_primitive),
    SurrogateSpec("piecewise_exp", 3, 1.0, "PiecewiseExp", _piecewise_exp_grad, _piecewise_exp_primitive),
    SurrogateSpec("soft_sign", 4, 2.0, "SoftSign", _soft_sign_grad,
                  lambda x, a: 0.5 * (a * x / (1 + (a * x).abs()) + 1)),
    SurrogateSpec("super_spike", 5, 1.0, "SuperSpike", _super_spike_grad, lambda x, a: a * x / (1 + x.abs())),
    SurrogateSpec("erf", 6, 2.0, "Erf", _erf_grad, lambda x, a: 0.5 * torch.special.erfc(-a * x)),
)

_BY_NAME = {spec.name: spec for spec in SURROGATES}
_BY_NAME.update({spec.spikingjelly_class.lower(): spec for spec in SURROGATES})
_BY_NAME.update({spec.name.replace("_", ""): spec for spec in SURROGATES})
_BY_SJ_CLASS = {spec.spikingjelly_class: spec for spec in SURROGATES}


@dataclass(frozen=True)
class Surrogate:
    """A surrogate choice: ``Surrogate("atan", alpha=2.0)``. ``alpha=None`` takes the default."""

    name: str = "sigmoid"
    alpha: Optional[float] = None

    def resolve(self) -> tuple[SurrogateSpec, float]:
        return resolve_surrogate(self.name, self.alpha)


def _check_alpha(alpha, argument: str) -> float:
    if isinstance(alpha, torch.Tensor) or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{argument} must be a Python float, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{argument} must be a finite positive float, got {alpha}")
    return alpha


def resolve_surrogate(surrogate, alpha: Optional[float] = None, argument: str = "surrogate"
                      ) -> tuple[SurrogateSpec, float]:
    """Map a surrogate given as a name, a :class:`Surrogate`, or a SpikingJelly surrogate object
    (``spikingjelly.activation_based.surrogate.ATan(alpha=...)``) to ``(spec, alpha)``.

    ``alpha`` (when not None) overrides the object's alpha; ``None`` keeps the object's or the
    surrogate's SpikingJelly default. Raises ValueError/TypeError naming ``argument``.
    """
    if isinstance(surrogate, Surrogate):
        return resolve_surrogate(surrogate.name, surrogate.alpha if alpha is None else alpha, argument)
    if isinstance(surrogate, str):
        spec = _BY_NAME.get(surrogate.lower())
        if spec is None:
            known = ", ".join(s.name for s in SURROGATES)
            raise ValueError(f"{argument}={surrogate!r} is not a known surrogate; choose one of: {known}")
        return spec, spec.default_alpha if alpha is None else _check_alpha(alpha, "alpha")
    # A SpikingJelly surrogate object, recognised by class name so SpikingJelly need not be installed.
    cls = type(surrogate)
    spec = _BY_SJ_CLASS.get(cls.__name__)
    if spec is not None and cls.__module__.startswith("spikingjelly"):
        if not getattr(surrogate, "spiking", True):
            raise ValueError(f"{argument}: {cls.__name__}(spiking=False) outputs the smooth primitive, not "
                             "spikes; snnkd_fast neurons only implement spiking=True")
        sj_alpha = getattr(surrogate, "alpha", spec.default_alpha)
        return spec, _check_alpha(sj_alpha if alpha is None else alpha, f"{argument}.alpha")
    raise ValueError(
        f"{argument}: unsupported surrogate {surrogate!r}; use a name ("
        + ", ".join(s.name for s in SURROGATES)
        + "), snnkd_fast.Surrogate, or one of SpikingJelly's "
        + ", ".join(s.spikingjelly_class for s in SURROGATES))
