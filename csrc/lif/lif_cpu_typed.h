// The CPU neuron launchers of one dtype: declared here, defined in lif_cpu_kernels.h and
// instantiated one dtype per file (lif_cpu_float.cpp, lif_cpu_double.cpp, lif_cpu_half.cpp,
// lif_cpu_bfloat16.cpp), so that lif_cpu.cpp's dtype dispatch compiles none of the kernels.
#pragma once

#include <torch/types.h>

#include <optional>

#include "lif_ops.h"

#define SNNKD_LIF_FORWARD_TYPED_ARGS                                                                     \
  const at::Tensor &x, const at::Tensor &v_init, const std::optional<at::Tensor> &decay, const ScalarArgs &a, \
      at::Tensor &spikes, at::Tensor &v_final, at::Tensor &out
#define SNNKD_LIF_BACKWARD_TYPED_ARGS                                                                       \
  const std::optional<at::Tensor> &grad_spikes, const std::optional<at::Tensor> &grad_v, const at::Tensor &seq, \
      const at::Tensor &v_init, const std::optional<at::Tensor> &decay, bool decay_grad, const ScalarArgs &a,   \
      at::Tensor &grad_x, at::Tensor &grad_v_init, double *decay_partials

namespace snnkd {
namespace lif {

// Neurons per block of the CPU kernels. Fixed (not derived from the thread count) so that the PLIF
// decay-gradient partial sums, one per block, are reduced in the same order whatever the number of
// threads.
constexpr int64_t kCpuBlock = 256;

// KEEP: what the forward writes besides spikes and v_final (lif_ops.h).
template <Keep KEEP, typename scalar_t>
void forward_cpu_typed(SNNKD_LIF_FORWARD_TYPED_ARGS);

// FROM_X: `seq` is x (lif_backward_from_x, H recomputed), else the saved H (lif_backward).
// decay_partials: one PLIF decay-gradient partial per 256-neuron block when decay_grad.
template <bool FROM_X, typename scalar_t>
void backward_cpu_typed(SNNKD_LIF_BACKWARD_TYPED_ARGS);

}  // namespace lif
}  // namespace snnkd
