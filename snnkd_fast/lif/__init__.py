"""Multi-step spiking neurons (IF, LIF, PLIF): reference, kernels and ops."""
from .op import if_multistep, lif_multistep, plif_multistep
from .surrogates import SURROGATES, Surrogate

__all__ = ["lif_multistep", "if_multistep", "plif_multistep", "Surrogate", "SURROGATES"]
