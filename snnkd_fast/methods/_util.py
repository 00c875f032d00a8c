"""Small helpers shared by the method modules (no method logic here)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..nn.neurons import _MultiStepNeuron


def is_spiking_neuron(module: nn.Module) -> bool:
    """True for snnkd_fast neuron modules (and, duck-typed, SpikingJelly memory modules: a ``v``
    state and a ``reset()`` method)."""
    return isinstance(module, _MultiStepNeuron) or (hasattr(module, "v") and callable(getattr(module, "reset", None)))


def reset_neurons(model: nn.Module) -> int:
    """Reset the membrane state of every spiking neuron inside ``model`` (SpikingJelly's
    ``functional.reset_net``); call it before each batch. Returns how many were reset. [ours]"""
    count = 0
    for m in model.modules():
        if is_spiking_neuron(m):
            m.reset()
            count += 1
    return count


@contextmanager
def training_mode(model: nn.Module, mode: bool) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in train (``mode=True``) or eval mode, restoring every submodule's
    own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
