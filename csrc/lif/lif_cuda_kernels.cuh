// Device code of the multi-step neuron kernels (no torch headers: compiled standalone by the
// CMake check and the tests, included by lif_cuda.cu for the extension). One thread owns VEC
// adjacent neurons for all T steps, the membrane stays in registers, and each timestep's row is
// read and written with one VEC-wide (up to 16-byte) access per thread, so a warp touches
// contiguous memory at every t. Traffic per neuron-step (fp32): forward reads x and writes spikes
// and H (12 bytes); backward reads grad_spikes and H and writes grad_x (12 bytes).
#pragma once

#include <cstdint>

#include <cub/block/block_reduce.cuh>

#include "lif_math.h"

namespace snnkd {
namespace lif {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, VEC>*>(ptr);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

// RATE = false: writes H [T, N] for the BPTT backward into `out`. RATE = true (rate-based backward):
// writes no H; accumulates the eligibility e = (1/T) sum_t sg[t] f[t] in registers and writes it
// into `out` [N].
template <typename scalar_t, typename acc_t, int VEC, bool RATE = false>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ v_init,
                   const acc_t* __restrict__ decay, scalar_t* __restrict__ spikes, acc_t* __restrict__ v_final,
                   acc_t* __restrict__ out, int64_t T, int64_t N, NeuronParams<acc_t> p) {
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (n >= N) return;
  if (p.neuron == kPLIF) {
    p.decay = *decay;  // read on the device: no host synchronisation
    set_gains(p);
  }
  Pack<acc_t, VEC> v = load_pack<acc_t, VEC>(v_init + n);
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
    if (!RATE) store_pack<acc_t, VEC>(out + at, hs);
    store_pack<scalar_t, VEC>(spikes + at, ss);
  }
  store_pack<acc_t, VEC>(v_final + n, v);
  if (RATE) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) e_sum.v[i] /= static_cast<acc_t>(T);
    store_pack<acc_t, VEC>(out + n, e_sum);
  }
}

// DECAY_GRAD (PLIF with a learnable w) also accumulates dL/d(decay); it needs V[t-1], recomputed
// from H[t-1], which is loaded one step ahead and carried so every H is still read once.
template <typename scalar_t, typename acc_t, int VEC, bool DECAY_GRAD>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_spikes, const acc_t* __restrict__ grad_v,
                    const acc_t* __restrict__ h_seq, const acc_t* __restrict__ v_init,
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
        v_prev = load_pack<acc_t, VEC>(v_init + n);
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
    store_pack<acc_t, VEC>(grad_v_init + n, gv);
  }
  if (DECAY_GRAD) {
    // One partial per block, summed by the caller in a fixed order: deterministic, no atomics.
    using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
    __shared__ typename BlockReduce::TempStorage temp;
    const acc_t block_sum = BlockReduce(temp).Sum(decay_sum);
    if (threadIdx.x == 0) decay_partials[blockIdx.x] = block_sum;
  }
}

}  // namespace lif
}  // namespace snnkd
