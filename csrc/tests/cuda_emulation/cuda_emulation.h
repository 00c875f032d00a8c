// Runs CUDA kernels written in the style of csrc/*/..._cuda_kernels.cuh on the host: the CUDA
// keywords become plain C++, threadIdx / blockIdx are variables the emulated launch sets, and
// `__shared__` storage is one static object per kernel instance (one block runs at a time). A launch
// runs the block's threads one after another, highest index first, so thread 0 -- the one that
// reads a block reduction's result -- runs last (cub/block/block_reduce.cuh next to this file
// accumulates across the threads). Only for kernels without __syncthreads between dependent phases
// and without warp intrinsics (the neuron kernels); the device's rounding intrinsics fall back to
// the host paths of lif_math.h (__CUDA_ARCH__ is undefined), which round alike.
#pragma once

#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace cuda_emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

}  // namespace cuda_emulation

inline cuda_emulation::Dim3 threadIdx, blockIdx;

namespace cuda_emulation {

template <int THREADS, typename Kernel, typename... Args>
void launch(int64_t blocks, Kernel kernel, Args... args) {
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    for (int t = THREADS - 1; t >= 0; --t) {
      threadIdx.x = static_cast<unsigned>(t);
      kernel(args...);
    }
  }
}

}  // namespace cuda_emulation
