"""``nn.Module`` wrappers of snnkd_fast's ops (drop-in for SpikingJelly's neuron modules)."""
from .neurons import IFNode, LIFNode, ParametricLIFNode

__all__ = ["LIFNode", "IFNode", "ParametricLIFNode"]
