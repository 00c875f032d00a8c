// Runs CUDA kernels written in the style of csrc/*/..._cuda_kernels.cuh on the host, for tests on a
// machine without a GPU: the CUDA keywords become plain C++, threadIdx / blockIdx / gridDim are
// variables the emulated launch sets, and `__shared__` storage is one static object per kernel
// instance (one block runs at a time). Two launches:
// * launch: the block's threads run one after another, highest index first, so thread 0 -- the
//   one that reads a block reduction's result -- runs last (the host cub::BlockReduce next to this
//   file then accumulates across the threads). For kernels without __syncthreads (the neurons').
// * launch_cooperative: each thread of the block is a fiber (ucontext) on this OS thread; the
//   fibers run in turns of one barrier phase each (__syncthreads switches to the next fiber), so
//   kernels whose threads exchange data through shared memory between barriers run as on a GPU
//   (the KD losses': block reductions, block scans).
// No warp intrinsics. The device's rounding intrinsics fall back to the host paths of lif_math.h
// (__CUDA_ARCH__ is undefined), which round alike; exp/log are the host's (results match a device
// run to rounding, not bit for bit).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::exp;  // device code calls exp/log unqualified: the float overloads, as on the device
using std::log;

namespace cuda_emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

}  // namespace cuda_emulation

inline cuda_emulation::Dim3 threadIdx, blockIdx, gridDim;

inline long long __double_as_longlong(double x) {
  long long bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

namespace cuda_emulation {

// The cooperative launch's scheduler state (one launch at a time).
struct Fibers {
  enum State { kRunnable, kAtBarrier, kDone };
  bool active = false;
  int current = 0;
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts;
  std::vector<State> states;
  std::vector<char> stacks;
  std::function<void()> body;
};
inline Fibers fibers;
constexpr size_t kFiberStack = 256 * 1024;

inline bool cooperative() { return fibers.active; }

inline void syncthreads() {
  if (!fibers.active) std::abort();  // a barrier needs launch_cooperative
  fibers.states[fibers.current] = Fibers::kAtBarrier;
  swapcontext(&fibers.contexts[fibers.current], &fibers.scheduler);
}

inline void fiber_entry() {
  fibers.body();
  fibers.states[fibers.current] = Fibers::kDone;
  swapcontext(&fibers.contexts[fibers.current], &fibers.scheduler);
}

// The block's dynamic shared memory (SNNKD_DYNAMIC_SHARED): launch_with_shared sizes it and fills
// it with 0xff bytes (a NaN in every floating type) before each block, so a read of a slot no
// thread of the block wrote shows.
inline std::vector<unsigned char> dynamic_shared;

template <int THREADS, typename Kernel, typename... Args>
void launch(int64_t blocks, Kernel kernel, Args... args) {
  gridDim.x = static_cast<unsigned>(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    std::fill(dynamic_shared.begin(), dynamic_shared.end(), static_cast<unsigned char>(0xff));
    for (int t = THREADS - 1; t >= 0; --t) {
      threadIdx.x = static_cast<unsigned>(t);
      kernel(args...);
    }
  }
}

template <int THREADS, typename Kernel, typename... Args>
void launch_with_shared(int64_t blocks, size_t shared_bytes, Kernel kernel, Args... args) {
  dynamic_shared.assign(shared_bytes, 0xff);
  launch<THREADS>(blocks, kernel, args...);
  dynamic_shared.clear();
}

template <int THREADS, typename Kernel, typename... Args>
void launch_cooperative(int64_t blocks, Kernel kernel, Args... args) {
  gridDim.x = static_cast<unsigned>(blocks);
  fibers.contexts.resize(THREADS);
  fibers.states.assign(THREADS, Fibers::kRunnable);
  fibers.stacks.resize(THREADS * kFiberStack);
  fibers.body = [&] { kernel(args...); };
  fibers.active = true;
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    for (int t = 0; t < THREADS; ++t) {
      ucontext_t& context = fibers.contexts[t];
      getcontext(&context);
      context.uc_stack.ss_sp = fibers.stacks.data() + t * kFiberStack;
      context.uc_stack.ss_size = kFiberStack;
      context.uc_link = &fibers.scheduler;
      makecontext(&context, fiber_entry, 0);
      fibers.states[t] = Fibers::kRunnable;
    }
    // one barrier phase per round: every live thread runs until its next __syncthreads or its end
    for (bool live = true; live;) {
      live = false;
      for (int t = 0; t < THREADS; ++t) {
        if (fibers.states[t] == Fibers::kDone) continue;
        fibers.current = t;
        threadIdx.x = static_cast<unsigned>(t);
        fibers.states[t] = Fibers::kRunnable;
        swapcontext(&fibers.scheduler, &fibers.contexts[t]);
        live = live || fibers.states[t] != Fibers::kDone;
      }
    }
  }
  fibers.active = false;
}

}  // namespace cuda_emulation

#define __syncthreads() cuda_emulation::syncthreads()
#define SNNKD_DYNAMIC_SHARED(TYPE, NAME) \
  TYPE* const NAME = reinterpret_cast<TYPE*>(cuda_emulation::dynamic_shared.data())
