"""Interoperability with other SNN libraries (``snnkd_fast.compat.spikingjelly``)."""
