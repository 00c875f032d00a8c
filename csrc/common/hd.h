// SNNKD_HD marks the per-element math shared by the CPU and CUDA kernels: __host__ __device__ and
// force-inlined under nvcc, force-inlined functions in the C++ compiler.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SNNKD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host too: a call left in a loop (the noise generator is large once
// unrolled) would stop the compiler from vectorizing it.
#define SNNKD_HD inline __attribute__((always_inline))
#else
#define SNNKD_HD inline
#endif
