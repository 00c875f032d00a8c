"""Swap SpikingJelly 2.0 neurons in an existing model for snnkd_fast's, in place.

    from snnkd_fast.compat.spikingjelly import replace_neurons
    n = replace_neurons(model)          # LIFNode / IFNode / ParametricLIFNode -> snnkd_fast.nn

The replacement keeps every setting (tau, decay_input, v_threshold, v_reset, detach_reset, the
surrogate and its alpha, step_mode), the current membrane state, and for PLIF the very same ``w``
``Parameter`` object, so an optimizer built before the swap keeps training it. Outputs are identical
(same spikes bit for bit; gradients equal up to float rounding). Nodes whose configuration
snnkd_fast cannot reproduce (a subclass that overrides the dynamics, ``store_v_seq=True``, a
surrogate outside the table, explicit neuron precision) are left in place and listed in a warning.
"""
from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from .. import nn as snn
from ..lif.op import check_recompute_h
from ..lif.surrogates import resolve_surrogate


def _spikingjelly_neuron_classes():
    try:
        from spikingjelly.activation_based import neuron
    except ImportError as error:
        raise ImportError("replace_neurons needs SpikingJelly 2.0 (`pip install --no-deps spikingjelly==2.0.0 "
                          "loguru tqdm scipy matplotlib`)") from error
    return neuron.LIFNode, neuron.IFNode, neuron.ParametricLIFNode


def _why_unsupported(node) -> str:
    if getattr(node, "store_v_seq", False):
        return "store_v_seq=True"
    if getattr(node, "_neuron_precision", None) is not None:
        return "explicit neuron precision"
    try:
        resolve_surrogate(node.surrogate_function, None, "surrogate_function")
    except (TypeError, ValueError) as error:
        return str(error)
    return ""


def _convert(node, lif_cls, if_cls, plif_cls, backend: str, recompute_h: Optional[bool]) -> nn.Module:
    common = dict(v_threshold=node.v_threshold, v_reset=node.v_reset, surrogate_function=node.surrogate_function,
                  detach_reset=node.detach_reset, step_mode=node.step_mode, backend=backend, recompute_h=recompute_h)
    if type(node) is lif_cls:
        new = snn.LIFNode(tau=node.tau, decay_input=node.decay_input, **common)
    elif type(node) is if_cls:
        new = snn.IFNode(**common)
    else:
        new = snn.ParametricLIFNode(decay_input=node.decay_input, **common)
        new.w = node.w  # the same Parameter object: optimizers keep their reference and state
    new.v = node.v
    new.train(node.training)
    return new


def replace_neurons(model: nn.Module, backend: str = "auto", recompute_h: Optional[bool] = None) -> int:
    """Replace, in place, every SpikingJelly ``LIFNode``, ``IFNode`` and ``ParametricLIFNode`` in
    ``model`` (exact classes, not subclasses) with snnkd_fast's equivalent. Returns how many were
    replaced. ``model`` itself is never replaced (wrap a bare neuron in a container first).
    ``backend`` and ``recompute_h`` (what the BPTT keeps: see :func:`snnkd_fast.lif_multistep`) go to
    every new neuron."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_neurons: model must be an nn.Module, got {type(model).__name__}")
    check_recompute_h(recompute_h, "replace_neurons")
    lif_cls, if_cls, plif_cls = _spikingjelly_neuron_classes()
    targets = (lif_cls, if_cls, plif_cls)
    replaced, skipped = 0, []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) not in targets:
                if isinstance(child, targets):
                    skipped.append(f"{parent_name}.{child_name}: subclass {type(child).__name__}")
                continue
            reason = _why_unsupported(child)
            if reason:
                skipped.append(f"{parent_name}.{child_name}: {reason}")
                continue
            setattr(parent, child_name, _convert(child, lif_cls, if_cls, plif_cls, backend, recompute_h))
            replaced += 1
    if skipped:
        warnings.warn("replace_neurons left these SpikingJelly neurons in place: " + "; ".join(skipped),
                      stacklevel=2)
    return replaced
