// CPU kernels of the multi-step neurons. Parallel over blocks of neurons (at::parallel_for, OpenMP
// in torch's builds); inside a block the loop runs over time outside and over the block's neurons
// inside, so every access is a contiguous run of one timestep's row and the inner loop
// vectorizes. The membrane of the block lives in a small stack array (the CPU's "registers").
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "lif_ops.h"

namespace snnkd {
namespace lif {
namespace {

// Neurons per block. Fixed (not derived from the thread count) so that the PLIF decay-gradient
// partial sums, one per block, are reduced in the same order whatever the number of threads.
constexpr int64_t kBlock = 256;

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* x, const acc_t* v_init, scalar_t* spikes, acc_t* v_final, acc_t* h_seq,
                    int64_t T, int64_t N, const NeuronParams<acc_t> p) {
  const int64_t num_blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    acc_t v[kBlock];
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t n0 = b * kBlock;
      const int64_t len = std::min(kBlock, N - n0);
      for (int64_t i = 0; i < len; ++i) v[i] = v_init[n0 + i];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = t * N + n0;
        for (int64_t i = 0; i < len; ++i) {
          const acc_t h = charge<acc_t>(v[i], static_cast<acc_t>(x[row + i]), p);
          const bool s = fire<acc_t>(h, p.v_threshold);
          v[i] = reset<acc_t>(h, s, p);
          h_seq[row + i] = h;
          spikes[row + i] = static_cast<scalar_t>(s ? 1 : 0);
        }
      }
      for (int64_t i = 0; i < len; ++i) v_final[n0 + i] = v[i];
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad_spikes, const acc_t* grad_v, const acc_t* h_seq, const acc_t* v_init,
                     scalar_t* grad_x, acc_t* grad_v_init, double* decay_partials, int64_t T, int64_t N,
                     const NeuronParams<acc_t> p) {
  const int64_t num_blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    acc_t gv[kBlock];
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t n0 = b * kBlock;
      const int64_t len = std::min(kBlock, N - n0);
      for (int64_t i = 0; i < len; ++i) gv[i] = grad_v ? grad_v[n0 + i] : acc_t(0);
      double decay_sum = 0.0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t row = t * N + n0;
        for (int64_t i = 0; i < len; ++i) {
          const acc_t h = h_seq[row + i];
          const acc_t gs = grad_spikes ? static_cast<acc_t>(grad_spikes[row + i]) : acc_t(0);
          const StepGrad<acc_t> g = backward_step<acc_t>(h, gs, gv[i], p);
          grad_x[row + i] = static_cast<scalar_t>(g.grad_x);
          gv[i] = g.grad_v_prev;
          if (decay_partials) {
            // V[t-1] is the reset of H[t-1] (or v_init at t = 0): recomputed, not saved.
            const acc_t v_prev = t > 0 ? reset<acc_t>(h_seq[row - N + i], fire<acc_t>(h_seq[row - N + i], p.v_threshold), p)
                                       : v_init[n0 + i];
            decay_sum += static_cast<double>(g.grad_h * dh_ddecay<acc_t>(h, v_prev, p));
          }
        }
      }
      for (int64_t i = 0; i < len; ++i) grad_v_init[n0 + i] = gv[i];
      if (decay_partials) decay_partials[b] = decay_sum;
    }
  });
}

template <typename acc_t>
acc_t read_decay(const std::optional<at::Tensor>& decay, int64_t neuron) {
  return neuron == kPLIF ? decay->data_ptr<acc_t>()[0] : acc_t(0);
}

}  // namespace

void launch_forward_cpu(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                        const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& h_seq) {
  const int64_t T = x.size(0);
  const int64_t N = x.numel() / T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "snnkd_lif_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(a, read_decay<acc_t>(decay, a.neuron));
    forward_kernel<scalar_t, acc_t>(x.data_ptr<scalar_t>(), v_init.data_ptr<acc_t>(), spikes.data_ptr<scalar_t>(),
                                    v_final.data_ptr<acc_t>(), h_seq.data_ptr<acc_t>(), T, N, p);
  });
}

void launch_backward_cpu(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                         const at::Tensor& h_seq, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                         bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                         at::Tensor& grad_decay) {
  const int64_t T = h_seq.size(0);
  const int64_t N = h_seq.numel() / T;
  std::vector<double> partials(decay_grad ? (N + kBlock - 1) / kBlock : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "snnkd_lif_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(a, read_decay<acc_t>(decay, a.neuron));
    backward_kernel<scalar_t, acc_t>(grad_spikes ? grad_spikes->data_ptr<scalar_t>() : nullptr,
                                     grad_v ? grad_v->data_ptr<acc_t>() : nullptr, h_seq.data_ptr<acc_t>(),
                                     v_init.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(),
                                     grad_v_init.data_ptr<acc_t>(), decay_grad ? partials.data() : nullptr, T, N, p);
  });
  if (decay_grad) {
    double total = 0.0;
    for (double partial : partials) total += partial;  // fixed order: deterministic
    grad_decay.fill_(total);
  }
}

}  // namespace lif
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CPU, m) {
  m.impl("lif_forward", &snnkd::lif::forward_op<snnkd::lif::launch_forward_cpu>);
  m.impl("lif_backward", &snnkd::lif::backward_op<snnkd::lif::launch_backward_cpu>);
}
