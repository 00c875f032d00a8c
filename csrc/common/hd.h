// SNNKD_HD marks the per-element math shared by the CPU and CUDA kernels: __host__ __device__ (and
// inlined) under nvcc, plain inline functions in the C++ compiler.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SNNKD_HD __host__ __device__ __forceinline__
#else
#define SNNKD_HD inline
#endif
