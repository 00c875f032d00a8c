// The CPU neuron kernels for float inputs (lif_cpu_kernels.h; one dtype per file: see there).
#include "lif_cpu_kernels.h"

SNNKD_LIF_CPU_INSTANTIATE(float)
