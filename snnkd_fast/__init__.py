"""snnkd_fast: fused kernels for training spiking neural networks by knowledge distillation.

Ops: :func:`lif_multistep`, :func:`if_multistep`, :func:`plif_multistep` (backends "torch", "cpp",
"cuda", "triton", "auto"); modules in :mod:`snnkd_fast.nn`; :func:`backends` says what works here.
"""
from ._backends import BackendStatus, backends
from .lif import SURROGATES, Surrogate, if_multistep, lif_multistep, plif_multistep

__version__ = "0.1.0"

__all__ = ["lif_multistep", "if_multistep", "plif_multistep", "Surrogate", "SURROGATES", "backends",
           "BackendStatus", "__version__"]
