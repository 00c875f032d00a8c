"""Knowledge-distillation losses for spiking students: pure-PyTorch references and fused kernels."""
