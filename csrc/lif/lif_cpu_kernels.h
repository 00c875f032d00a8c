// CPU kernels of the multi-step neurons. Parallel over blocks of neurons (at::parallel_for, OpenMP
// in torch's builds); inside a block the loop runs over time outside and over the block's neurons
// inside, so every access is a contiguous run of one timestep's row and the inner loop
// vectorizes. The membrane of the block lives in a small stack array (the CPU's "registers").
//
// This header holds the kernels and their dtype-templated launchers; lif_cpu_<dtype>.cpp instantiate
// them one dtype per file (the build compiles the four in parallel: as one file, ~670 backward
// specializations made it the longest compile of the build, ~2 minutes), and lif_cpu.cpp dispatches
// on the dtype and registers the ops.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "lif_cpu_typed.h"
#include "lif_ops.h"

namespace snnkd {
namespace lif {
namespace cpu_detail {

constexpr int64_t kMaxBlock = kCpuMaxBlock;  // neurons per block at most (lif_cpu_typed.h)

// Blocks per task: at least ~32k neuron-steps (15-30 us of work), so that a small layer runs on one
// thread rather than paying the thread pool's wake-up (measured: [4, 16, 64] fwd+bwd 0.4 ms on 1
// thread, 3.6 ms on 2). 64k before: [1, 64, 1024] then ran on one thread, 1.6-2.4x slower (raw ops);
// 16k gained only on the 32k-step backward.
inline int64_t grain_blocks(int64_t T, int64_t block) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / (block * std::max<int64_t>(T, 1)));
}

// Run f(StaticNeuronParams<...>) with the call's mode as compile-time constants, so that each
// instantiation's per-neuron loop has no branch on the mode and vectorizes. The forward fixes the
// neuron kind (LIF with and without an exact 1/tau), decay_input and the reset kind (16 variants);
// the backward fixes the surrogate and the reset kind and detach_reset (28 variants) and leaves the
// rest to loop unswitching.
template <typename F>
void with_bool(bool value, F&& f) {
  if (value) f(std::true_type{});
  else f(std::false_type{});
}

// f(neuron kind, exact reciprocal of tau) as compile-time constants; the second only for LIF.
template <typename F>
void with_neuron(int neuron, bool exact_reciprocal_tau, F&& f) {
  using Exact = std::true_type;
  using Divide = std::false_type;
  switch (neuron) {
    case kIF: f(std::integral_constant<int, kIF>{}, Divide{}); break;
    case kLIF:
      if (exact_reciprocal_tau) f(std::integral_constant<int, kLIF>{}, Exact{});
      else f(std::integral_constant<int, kLIF>{}, Divide{});
      break;
    default: f(std::integral_constant<int, kPLIF>{}, Divide{}); break;
  }
}

template <typename F>
void with_surrogate(int surrogate, F&& f) {
  switch (surrogate) {
    case kSigmoid: f(std::integral_constant<int, kSigmoid>{}); break;
    case kATan: f(std::integral_constant<int, kATan>{}); break;
    case kPiecewiseQuadratic: f(std::integral_constant<int, kPiecewiseQuadratic>{}); break;
    case kPiecewiseExp: f(std::integral_constant<int, kPiecewiseExp>{}); break;
    case kSoftSign: f(std::integral_constant<int, kSoftSign>{}); break;
    case kSuperSpike: f(std::integral_constant<int, kSuperSpike>{}); break;
    default: f(std::integral_constant<int, kErf>{}); break;
  }
}

// Forward-mode constants: neuron kind, decay_input, soft reset.
template <typename acc_t, typename F>
void with_forward_mode(const NeuronParams<acc_t>& p, F&& f) {
  with_neuron(p.neuron, reciprocal_is_exact(p.tau), [&](auto neuron, auto exact) {
    with_bool(p.decay_input, [&](auto decay_input) {
      with_bool(p.soft_reset, [&](auto soft) {
        f(StaticNeuronParams<acc_t, decltype(neuron)::value, decltype(decay_input)::value, decltype(soft)::value,
                             false, kSigmoid, decltype(exact)::value>(p));
      });
    });
  });
}

// A Params-like view for the backward: surrogate, soft reset and detach_reset fixed at compile time.
template <typename acc_t, int SURROGATE, bool SOFT_RESET, bool DETACH_RESET>
struct BackwardParams : NeuronParams<acc_t> {
  static constexpr bool soft_reset = SOFT_RESET;
  static constexpr bool detach_reset = DETACH_RESET;
  static constexpr int surrogate = SURROGATE;
  explicit BackwardParams(const NeuronParams<acc_t>& p) : NeuronParams<acc_t>(p) {}
};

// A backward Params with decay_input fixed at compile time as well (for PLIF's decay gradient).
template <typename BP, bool DECAY_INPUT>
struct WithDecayInput : BP {
  static constexpr bool decay_input = DECAY_INPUT;
  explicit WithDecayInput(const BP& p) : BP(p) {}
};

template <typename acc_t, typename F>
void with_backward_mode(const NeuronParams<acc_t>& p, F&& f) {
  with_surrogate(p.surrogate, [&](auto surrogate) {
    with_bool(p.soft_reset, [&](auto soft) {
      with_bool(p.detach_reset, [&](auto detach) {
        f(BackwardParams<acc_t, decltype(surrogate)::value, decltype(soft)::value, decltype(detach)::value>(p));
      });
    });
  });
}

// Eligibility update of one block of neurons at one step (rate-based backward), instantiated with the
// backward's compile-time modes and called through a pointer, so the forward's own loop stays
// specialised on the forward modes only.
template <typename acc_t>
using EligibilityFn = void (*)(const acc_t* h, acc_t* f, acc_t* e_sum, int64_t len, const NeuronParams<acc_t>& q);

template <typename acc_t, typename BP>
void eligibility_update(const acc_t* h, acc_t* f, acc_t* e_sum, int64_t len, const NeuronParams<acc_t>& q) {
  const BP p(q);
  for (int64_t i = 0; i < len; ++i) eligibility_step<acc_t>(h[i], f[i], e_sum[i], p);
}

// One step of the charge for `len` neurons: H from the membrane v (left at the reset V) and x's row.
// lif_backward_from_x's recomputation: instantiated with the forward's compile-time modes (FP) and
// called through a pointer from the backward kernel, which is specialised on the backward's modes
// only. The same charge/fire/reset instantiations as the forward kernel's: the same H, bit for bit.
template <typename scalar_t, typename acc_t>
using RechargeFn = void (*)(const scalar_t* x_row, int64_t len, acc_t* v, acc_t* h_row, const NeuronParams<acc_t>& q);

template <typename scalar_t, typename acc_t, typename FP>
void recharge_step(const scalar_t* x_row, int64_t len, acc_t* v, acc_t* h_row, const NeuronParams<acc_t>& q) {
  const FP p(q);
  for (int64_t i = 0; i < len; ++i) {
    const acc_t h = charge<acc_t>(v[i], static_cast<acc_t>(x_row[i]), p);
    v[i] = reset<acc_t>(h, fire<acc_t>(h, p.v_threshold), p);
    h_row[i] = h;
  }
}

// A block's initial membrane: v_init_step 0 is one value for every neuron (lif_ops.h,
// broadcast_v_init). Two plain loops: indexed by (n0 + i) * step, GCC gathered it element by element
// (~7% of a backward).
template <typename acc_t>
void load_v_init(acc_t* dst, const acc_t* v_init, int64_t v_init_step, int64_t n0, int64_t len) {
  if (v_init_step == 0) {
    for (int64_t i = 0; i < len; ++i) dst[i] = v_init[0];
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i] = v_init[n0 + i];
  }
}

template <Keep KEEP, typename scalar_t, typename acc_t, typename P>
void forward_kernel(const scalar_t* x, const acc_t* v_init, int64_t v_init_step, scalar_t* spikes, acc_t* v_final,
                    acc_t* out, int64_t T, int64_t N, const P p, EligibilityFn<acc_t> eligibility_fn,
                    const NeuronParams<acc_t>& q) {
  constexpr bool RATE = KEEP == Keep::kEligibility;
  const int64_t block_size = cpu_block(T);
  const int64_t num_blocks = (N + block_size - 1) / block_size;
  at::parallel_for(0, num_blocks, grain_blocks(T, block_size), [&](int64_t block_begin, int64_t block_end) {
    acc_t v[kMaxBlock];
    acc_t h_step[kMaxBlock];
    acc_t f[kMaxBlock];
    acc_t e_sum[kMaxBlock];
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t n0 = b * block_size;
      const int64_t len = std::min(block_size, N - n0);
      load_v_init(v, v_init, v_init_step, n0, len);
      if (RATE) {
        for (int64_t i = 0; i < len; ++i) f[i] = q.input_gain;
        for (int64_t i = 0; i < len; ++i) e_sum[i] = acc_t(0);
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = t * N + n0;
        acc_t* h_out = KEEP == Keep::kH ? out + row : h_step;
        for (int64_t i = 0; i < len; ++i) {
          const acc_t h = charge<acc_t>(v[i], static_cast<acc_t>(x[row + i]), p);
          const bool s = fire<acc_t>(h, p.v_threshold);
          v[i] = reset<acc_t>(h, s, p);
          if (KEEP != Keep::kNothing) h_out[i] = h;
          spikes[row + i] = static_cast<scalar_t>(s ? 1 : 0);
        }
        if (RATE) eligibility_fn(h_step, f, e_sum, len, q);
      }
      for (int64_t i = 0; i < len; ++i) v_final[n0 + i] = v[i];
      if (RATE) {
        for (int64_t i = 0; i < len; ++i) out[n0 + i] = e_sum[i] / static_cast<acc_t>(T);
      }
    }
  });
}

// The BPTT backward. H comes from h_seq ([T, N], saved by lif_forward) or, when recharge_fn is given,
// is recomputed per block from x and v_init into a [T, block_size] buffer that stays in cache
// (lif_backward_from_x: 4 of the 24 bytes per neuron-step less DRAM traffic over forward+backward).
template <bool DECAY_GRAD, typename scalar_t, typename acc_t, typename P>
void backward_kernel(const scalar_t* grad_spikes, const acc_t* grad_v, const acc_t* h_seq, const scalar_t* x,
                     RechargeFn<scalar_t, acc_t> recharge_fn, const NeuronParams<acc_t>& q, const acc_t* v_init,
                     int64_t v_init_step, scalar_t* grad_x, acc_t* grad_v_init, double* decay_partials, int64_t T,
                     int64_t N, const P params) {
  const int64_t block_size = cpu_block(T);
  const int64_t num_blocks = (N + block_size - 1) / block_size;
  at::parallel_for(0, num_blocks, grain_blocks(T, block_size), [&](int64_t block_begin, int64_t block_end) {
    // A local copy: read through the lambda's reference, the float parameters may alias the float
    // outputs, and in the decay-gradient loop GCC then reloaded them per element (measured: PLIF's
    // backward ~3x slower without the copy).
    const P p = params;
    acc_t gv[kMaxBlock];
    // no spike gradient: a row of zeros (copying each row into a block array instead, which GCC made
    // a memcpy call per row, took ~10% of the backward)
    const std::vector<scalar_t> zero_row(grad_spikes != nullptr ? 0 : block_size, static_cast<scalar_t>(0));
    acc_t v_prev[kMaxBlock];
    acc_t decay_terms[kMaxBlock];
    // Recomputed H, two [T, block_size] buffers: the backward of block b reads one while the same loop
    // over t recomputes block b + 1's H into the other. The backward is compute-bound and the
    // recomputation bound by the core's load bandwidth; one block apart they overlap (recomputing a
    // whole block first left the backward ~30% slower than lif_backward reading the saved H).
    std::vector<acc_t> recharged(recharge_fn != nullptr ? 2 * T * block_size : 0);
    acc_t membrane[kMaxBlock];
    auto recharge_begin = [&](int64_t block) {  // block's membrane at v_init, before its first step
      const int64_t m0 = block * block_size;
      load_v_init(membrane, v_init, v_init_step, m0, std::min(block_size, N - m0));
    };
    if (recharge_fn != nullptr) {
      recharge_begin(block_begin);
      const int64_t len = std::min(block_size, N - block_begin * block_size);
      for (int64_t t = 0; t < T; ++t) {
        recharge_fn(x + t * N + block_begin * block_size, len, membrane, recharged.data() + t * block_size, q);
      }
    }
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t n0 = b * block_size;
      const int64_t len = std::min(block_size, N - n0);
      const acc_t* h_block = h_seq + n0;  // H[t] of the block at h_block + t * h_step
      int64_t h_step = N;
      acc_t* next_h = nullptr;  // block b + 1's recomputed H, filled during this block's loop
      int64_t next_len = 0;
      if (recharge_fn != nullptr) {
        h_block = recharged.data() + ((b - block_begin) % 2) * T * block_size;
        h_step = block_size;
        if (b + 1 < block_end) {
          next_h = recharged.data() + ((b + 1 - block_begin) % 2) * T * block_size;
          next_len = std::min(block_size, N - n0 - block_size);
          recharge_begin(b + 1);
        }
      }
      for (int64_t i = 0; i < len; ++i) gv[i] = grad_v ? grad_v[n0 + i] : acc_t(0);
      for (int64_t i = 0; i < len; ++i) decay_terms[i] = acc_t(0);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t row = t * N + n0;
        const acc_t* h_row = h_block + t * h_step;
        const scalar_t* gs = grad_spikes != nullptr ? grad_spikes + row : zero_row.data();
        if (DECAY_GRAD) {
          // V[t-1] is the reset of H[t-1] (v_init at t = 0): recomputed, not saved. Written into
          // v_prev first so that the loop below has no branch on t.
          if (t > 0) {
            for (int64_t i = 0; i < len; ++i) {
              const acc_t h_prev = h_row[i - h_step];
              v_prev[i] = reset<acc_t>(h_prev, fire<acc_t>(h_prev, p.v_threshold), p);
            }
          } else {
            load_v_init(v_prev, v_init, v_init_step, n0, len);
          }
        }
        for (int64_t i = 0; i < len; ++i) {
          const acc_t h = h_row[i];
          const StepGrad<acc_t> g = backward_step<acc_t>(h, static_cast<acc_t>(gs[i]), gv[i], p);
          grad_x[row + i] = static_cast<scalar_t>(g.grad_x);
          gv[i] = g.grad_v_prev;
          if (DECAY_GRAD) decay_terms[i] += g.grad_h * dh_ddecay<acc_t>(h, v_prev[i], p);
        }
        if (next_h != nullptr) {
          const int64_t step = T - 1 - t;  // forward order
          recharge_fn(x + step * N + n0 + block_size, next_len, membrane, next_h + step * block_size, q);
        }
      }
      if (grad_v_init != nullptr) {  // none for a v_init broadcast to every neuron
        for (int64_t i = 0; i < len; ++i) grad_v_init[n0 + i] = gv[i];
      }
      if (DECAY_GRAD) {
        double decay_sum = 0.0;
        for (int64_t i = 0; i < len; ++i) decay_sum += static_cast<double>(decay_terms[i]);
        decay_partials[b] = decay_sum;
      }
    }
  });
}

template <typename acc_t>
acc_t read_decay(const std::optional<at::Tensor>& decay, int64_t neuron) {
  return neuron == kPLIF ? decay->data_ptr<acc_t>()[0] : acc_t(0);
}

}  // namespace cpu_detail

// The launchers of one dtype (declared in lif_cpu_typed.h).
template <Keep KEEP, typename scalar_t>
void forward_cpu_typed(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                       const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& out) {
  using namespace cpu_detail;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0);
  const int64_t N = x.numel() / T;
  const NeuronParams<acc_t> q = make_params<acc_t>(a, read_decay<acc_t>(decay, a.neuron));
  EligibilityFn<acc_t> eligibility_fn = nullptr;
  if (KEEP == Keep::kEligibility) {
    with_backward_mode(q, [&](auto bp) { eligibility_fn = &eligibility_update<acc_t, decltype(bp)>; });
  }
  with_forward_mode(q, [&](auto p) {
    forward_kernel<KEEP, scalar_t, acc_t>(x.data_ptr<scalar_t>(), v_init.data_ptr<acc_t>(),
                                          broadcast_v_init(v_init, N) ? 0 : 1, spikes.data_ptr<scalar_t>(),
                                          v_final.data_ptr<acc_t>(),
                                          KEEP == Keep::kNothing ? nullptr : out.data_ptr<acc_t>(), T, N, p,
                                          eligibility_fn, q);
  });
}

template <bool FROM_X, typename scalar_t>
void backward_cpu_typed(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                        const at::Tensor& seq, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                        bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                        double* decay_partials) {
  using namespace cpu_detail;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = seq.size(0);
  const int64_t N = seq.numel() / T;
  const bool broadcast = broadcast_v_init(v_init, N);  // then grad_v_init is empty: nothing to write
  const NeuronParams<acc_t> q = make_params<acc_t>(a, read_decay<acc_t>(decay, a.neuron));
  RechargeFn<scalar_t, acc_t> recharge_fn = nullptr;
  if (FROM_X) {
    with_forward_mode(q, [&](auto fp) { recharge_fn = &recharge_step<scalar_t, acc_t, decltype(fp)>; });
  }
  with_backward_mode(q, [&](auto p) {
    auto run = [&](auto with_decay_grad, const auto& params) {
      backward_kernel<decltype(with_decay_grad)::value, scalar_t, acc_t>(
          grad_spikes ? grad_spikes->data_ptr<scalar_t>() : nullptr, grad_v ? grad_v->data_ptr<acc_t>() : nullptr,
          FROM_X ? nullptr : seq.data_ptr<acc_t>(), FROM_X ? seq.data_ptr<scalar_t>() : nullptr, recharge_fn, q,
          v_init.data_ptr<acc_t>(), broadcast ? 0 : 1, grad_x.data_ptr<scalar_t>(),
          broadcast ? nullptr : grad_v_init.data_ptr<acc_t>(), decay_partials, T, N, params);
    };
    if (!decay_grad) {
      run(std::false_type{}, p);
      return;
    }
    // PLIF's decay gradient: decay_input fixed too (dH/d(decay) depends on it; a runtime select on
    // it left the whole loop scalar).
    with_bool(p.decay_input, [&](auto decay_input) {
      run(std::true_type{}, WithDecayInput<decltype(p), decltype(decay_input)::value>(p));
    });
  });
}

}  // namespace lif
}  // namespace snnkd

// Explicit instantiations of one dtype's launchers (each lif_cpu_<dtype>.cpp has one line of this).
#define SNNKD_LIF_CPU_INSTANTIATE(scalar_t)                                                                     \
  namespace snnkd {                                                                                           \
  namespace lif {                                                                                             \
  template void forward_cpu_typed<Keep::kH, scalar_t>(SNNKD_LIF_FORWARD_TYPED_ARGS);                          \
  template void forward_cpu_typed<Keep::kEligibility, scalar_t>(SNNKD_LIF_FORWARD_TYPED_ARGS);                \
  template void forward_cpu_typed<Keep::kNothing, scalar_t>(SNNKD_LIF_FORWARD_TYPED_ARGS);                    \
  template void backward_cpu_typed<false, scalar_t>(SNNKD_LIF_BACKWARD_TYPED_ARGS);                           \
  template void backward_cpu_typed<true, scalar_t>(SNNKD_LIF_BACKWARD_TYPED_ARGS);                            \
  }                                                                                                           \
  }
