// Device code of the multi-step neuron kernels (no torch headers: compiled standalone by the
// CMake check and the tests, included by lif_cuda.cu for the extension). One thread owns VEC
// adjacent neurons for all T steps, the membrane stays in registers, and each timestep's row is
// read and written with one VEC-wide (up to 16-byte) access per thread, so a warp touches
// contiguous memory at every t. Traffic per neuron-step (fp32): the saved-H pair's forward reads x
// and writes spikes and H (12 bytes), its backward reads grad_spikes and H and writes grad_x (12
// bytes); the lean pair's forward writes no H (8 bytes) and its backward recharges H from x (12
// bytes: x in place of H) -- 20 bytes where the saved-H pair moves 24.
#pragma once

#include <cstdint>

#include <cub/block/block_reduce.cuh>

#include "common/pack.cuh"  // Pack, load_pack, store_pack
#include "lif_math.h"

namespace snnkd {
namespace lif {

constexpr int kThreads = 256;

// A kernel's dynamic shared memory as an array of TYPE (the CPU emulation of the kernels in
// csrc/tests/cuda_emulation/ defines its own).
#ifndef SNNKD_DYNAMIC_SHARED
#define SNNKD_DYNAMIC_SHARED(TYPE, NAME)                       \
  extern __shared__ __align__(16) unsigned char NAME##_raw[]; \
  TYPE* const NAME = reinterpret_cast<TYPE*>(NAME##_raw)
#endif

// v_init's VEC values at neuron n: one step of neurons, or (one_v_init) one value for every neuron.
template <typename acc_t, int VEC>
__device__ __forceinline__ Pack<acc_t, VEC> load_v_init(const acc_t* __restrict__ v_init, bool one_v_init, int64_t n) {
  if (!one_v_init) return load_pack<acc_t, VEC>(v_init + n);
  Pack<acc_t, VEC> v;
#pragma unroll
  for (int i = 0; i < VEC; ++i) v.v[i] = v_init[0];
  return v;
}

// What a forward kernel writes besides (or instead of) the spikes and v_final.
enum class ForwardMode {
  kSaveH,     // spikes, v_final and H [T, N] for the BPTT backward (lif_forward)
  kRate,      // spikes, v_final and the eligibility e = (1/T) sum_t sg[t] f[t] [N] (lif_rate_forward)
  kLean,      // spikes and v_final only: the backward recharges H from x (lif_forward_lean)
  kRecharge,  // H only (no spikes, no v_final): lif_backward_from_x's recharge beyond staged_steps_max
};

// one_v_init: v_init is one value for every neuron (read once instead of a materialised [N] tensor).
template <typename scalar_t, typename acc_t, int VEC, ForwardMode MODE>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ v_init, bool one_v_init,
                   const acc_t* __restrict__ decay, scalar_t* __restrict__ spikes, acc_t* __restrict__ v_final,
                   acc_t* __restrict__ out, int64_t T, int64_t N, NeuronParams<acc_t> p) {
  constexpr bool RATE = MODE == ForwardMode::kRate;
  constexpr bool STORE_H = MODE == ForwardMode::kSaveH || MODE == ForwardMode::kRecharge;
  constexpr bool STORE_SPIKES = MODE != ForwardMode::kRecharge;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (n >= N) return;
  if (p.neuron == kPLIF) {
    p.decay = *decay;  // read on the device: no host synchronisation
    set_gains(p);
  }
  Pack<acc_t, VEC> v = load_v_init<acc_t, VEC>(v_init, one_v_init, n);
  Pack<acc_t, VEC> f, e_sum;
  if (RATE) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      f.v[i] = p.input_gain;
      e_sum.v[i] = acc_t(0);
    }
  }
#pragma unroll 2
  for (int64_t t = 0; t < T; ++t) {
    const int64_t at = t * N + n;
    const Pack<scalar_t, VEC> xs = load_pack<scalar_t, VEC>(x + at);
    Pack<acc_t, VEC> hs;
    Pack<scalar_t, VEC> ss;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t h = charge<acc_t>(v.v[i], static_cast<acc_t>(xs.v[i]), p);
      const bool s = fire<acc_t>(h, p.v_threshold);
      v.v[i] = reset<acc_t>(h, s, p);
      hs.v[i] = h;
      ss.v[i] = static_cast<scalar_t>(s ? 1.0f : 0.0f);
      if (RATE) eligibility_step<acc_t>(h, f.v[i], e_sum.v[i], p);
    }
    if (STORE_H) store_pack<acc_t, VEC>(out + at, hs);
    if (STORE_SPIKES) store_pack<scalar_t, VEC>(spikes + at, ss);
  }
  if (MODE != ForwardMode::kRecharge) store_pack<acc_t, VEC>(v_final + n, v);
  if (RATE) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) e_sum.v[i] /= static_cast<acc_t>(T);
    store_pack<acc_t, VEC>(out + n, e_sum);
  }
}

// PLIF's decay gradient: one partial per block, summed by the caller in a fixed order --
// deterministic, no atomics. Every thread of the block calls it.
template <typename acc_t>
__device__ __forceinline__ void write_block_sum(acc_t value, acc_t* __restrict__ partials) {
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const acc_t block_sum = BlockReduce(temp).Sum(value);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_sum;
}

// DECAY_GRAD (PLIF with a learnable w) also accumulates dL/d(decay); it needs V[t-1], recomputed
// from H[t-1], which is loaded one step ahead and carried so every H is still read once.
// grad_v_init null: v_init is one value for every neuron (one_v_init), which gets no gradient.
template <typename scalar_t, typename acc_t, int VEC, bool DECAY_GRAD>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_spikes, const acc_t* __restrict__ grad_v,
                    const acc_t* __restrict__ h_seq, const acc_t* __restrict__ v_init, bool one_v_init,
                    const acc_t* __restrict__ decay, scalar_t* __restrict__ grad_x,
                    acc_t* __restrict__ grad_v_init, acc_t* __restrict__ decay_partials, int64_t T, int64_t N,
                    NeuronParams<acc_t> p) {
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (p.neuron == kPLIF) {
    p.decay = *decay;  // read on the device: no host synchronisation
    set_gains(p);
  }
  acc_t decay_sum = acc_t(0);
  if (n < N) {
    Pack<acc_t, VEC> gv;
    if (grad_v) {
      gv = load_pack<acc_t, VEC>(grad_v + n);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) gv.v[i] = acc_t(0);
    }
    Pack<acc_t, VEC> h = load_pack<acc_t, VEC>(h_seq + (T - 1) * N + n);
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t at = t * N + n;
      Pack<acc_t, VEC> gs;
      if (grad_spikes) {
        const Pack<scalar_t, VEC> g = load_pack<scalar_t, VEC>(grad_spikes + at);
#pragma unroll
        for (int i = 0; i < VEC; ++i) gs.v[i] = static_cast<acc_t>(g.v[i]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) gs.v[i] = acc_t(0);
      }
      // V[t-1]: the reset of H[t-1], or v_init before the first step.
      Pack<acc_t, VEC> h_prev, v_prev;
      if (t > 0) {
        h_prev = load_pack<acc_t, VEC>(h_seq + at - N);
        if (DECAY_GRAD) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) v_prev.v[i] = reset<acc_t>(h_prev.v[i], fire<acc_t>(h_prev.v[i], p.v_threshold), p);
        }
      } else if (DECAY_GRAD) {
        v_prev = load_v_init<acc_t, VEC>(v_init, one_v_init, n);
      }
      Pack<scalar_t, VEC> gx;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const StepGrad<acc_t> g = backward_step<acc_t>(h.v[i], gs.v[i], gv.v[i], p);
        gx.v[i] = static_cast<scalar_t>(g.grad_x);
        gv.v[i] = g.grad_v_prev;
        if (DECAY_GRAD) decay_sum += g.grad_h * dh_ddecay<acc_t>(h.v[i], v_prev.v[i], p);
      }
      store_pack<scalar_t, VEC>(grad_x + at, gx);
      h = h_prev;
    }
    if (grad_v_init) store_pack<acc_t, VEC>(grad_v_init + n, gv);  // none for one value (one_v_init)
  }
  if (DECAY_GRAD) write_block_sum(decay_sum, decay_partials);
}

// The lean pair's backward (lif_backward_from_x) for T <= staged_steps_max<acc_t>(): each thread
// recharges its neuron's H[0..T-1] from x into its own column of the block's shared memory, then
// runs the backward over it -- x read in place of the saved H, so 12 bytes per fp32 neuron-step as
// backward_kernel, while the lean forward moved 8 instead of 12.
// Why shared memory, not registers: the first version kept H in registers (loops unrolled to T <= 8,
// 16, 32), and on an H200 (benchmarks/results/nvidia-h200/ab_neuron_pairs.json, 1021d8f) its backward
// reached 41-66% of the bandwidth peak in fp32 and 19-33% in bf16 where backward_kernel reaches
// 78-87%: up to 128 registers per thread left 512 threads per SM to hide two serial sweeps. A column
// of shared memory costs no registers (T * 1 KiB per 256-thread block in fp32; at this kernel's 48
// registers, 1,280 threads per SM up to T = 40), and both sweeps are plain loops whose loads do not
// wait on the recurrence. No barrier: a thread reads only its own column (consecutive threads,
// consecutive words: no bank conflicts). One neuron per thread (a warp's row access is one
// contiguous line); each sweep loads kStagedChunk steps' inputs before it computes them, so that
// many loads are in flight per thread (LIF's division branches, and the compiler does not move
// loads across branches). Longer sequences take the recharge kernel (ForwardMode::kRecharge) into a
// temporary H and backward_kernel.
// grad_v_init null: one value for every neuron (one_v_init), which gets no gradient.
constexpr int kStagedChunk = 8;
template <typename scalar_t, typename acc_t, bool DECAY_GRAD>
__global__ void __launch_bounds__(kThreads)
    backward_from_x_kernel(const scalar_t* __restrict__ grad_spikes, const acc_t* __restrict__ grad_v,
                           const scalar_t* __restrict__ x, const acc_t* __restrict__ v_init, bool one_v_init,
                           const acc_t* __restrict__ decay, scalar_t* __restrict__ grad_x,
                           acc_t* __restrict__ grad_v_init, acc_t* __restrict__ decay_partials, int T, int64_t N,
                           NeuronParams<acc_t> p) {
  SNNKD_DYNAMIC_SHARED(acc_t, h_stage);  // [T][kThreads]: staged_bytes<acc_t>(T)
  acc_t* const h_column = h_stage + threadIdx.x;  // this thread's H[t] at h_column[t * kThreads]
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (p.neuron == kPLIF) {
    p.decay = *decay;
    set_gains(p);
  }
  acc_t decay_sum = acc_t(0);
  if (n < N) {
    const acc_t v0 = load_v_init<acc_t, 1>(v_init, one_v_init, n).v[0];
    acc_t v = v0;
    for (int t0 = 0; t0 < T; t0 += kStagedChunk) {  // recharge, kStagedChunk steps at a time
      acc_t xs[kStagedChunk];
#pragma unroll
      for (int i = 0; i < kStagedChunk; ++i)
        if (t0 + i < T) xs[i] = static_cast<acc_t>(x[(t0 + i) * N + n]);
#pragma unroll
      for (int i = 0; i < kStagedChunk; ++i) {
        if (t0 + i < T) {
          const acc_t h = charge<acc_t>(v, xs[i], p);
          v = reset<acc_t>(h, fire<acc_t>(h, p.v_threshold), p);
          h_column[(t0 + i) * kThreads] = h;
        }
      }
    }
    acc_t gv = grad_v ? grad_v[n] : acc_t(0);
    for (int t1 = T - 1; t1 >= 0; t1 -= kStagedChunk) {  // the backward, from step t1 down
      acc_t gs[kStagedChunk];
#pragma unroll
      for (int i = 0; i < kStagedChunk; ++i)
        if (t1 - i >= 0) gs[i] = grad_spikes ? static_cast<acc_t>(grad_spikes[(t1 - i) * N + n]) : acc_t(0);
#pragma unroll
      for (int i = 0; i < kStagedChunk; ++i) {
        const int t = t1 - i;
        if (t >= 0) {
          const acc_t h = h_column[t * kThreads];
          const StepGrad<acc_t> g = backward_step<acc_t>(h, gs[i], gv, p);
          grad_x[t * N + n] = static_cast<scalar_t>(g.grad_x);
          gv = g.grad_v_prev;
          if (DECAY_GRAD) {
            // V[t-1]: the reset of H[t-1], or v_init before the first step
            acc_t v_prev = v0;
            if (t > 0) {
              const acc_t h_prev = h_column[(t - 1) * kThreads];
              v_prev = reset<acc_t>(h_prev, fire<acc_t>(h_prev, p.v_threshold), p);
            }
            decay_sum += g.grad_h * dh_ddecay<acc_t>(h, v_prev, p);
          }
        }
      }
    }
    if (grad_v_init) grad_v_init[n] = gv;
  }
  if (DECAY_GRAD) write_block_sum(decay_sum, decay_partials);
}

// Host side: backward_from_x_kernel's dynamic shared memory for T steps, and the longest T it takes
// (kMaxStagedBytes per block: 64 steps in fp32, 32 in fp64; three 256-thread blocks per SM at the
// limit on a Hopper's 228 KiB).
constexpr int64_t kMaxStagedBytes = 64 * 1024;
template <typename acc_t>
constexpr int64_t staged_bytes(int64_t T) {
  return T * kThreads * static_cast<int64_t>(sizeof(acc_t));
}
template <typename acc_t>
constexpr int64_t staged_steps_max() {
  return kMaxStagedBytes / staged_bytes<acc_t>(1);
}

}  // namespace lif
}  // namespace snnkd
