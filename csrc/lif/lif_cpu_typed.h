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

// Neurons per block of the CPU kernels: a function of T alone -- not of the thread count, so that the
// PLIF decay-gradient partial sums, one per block, are reduced in the same order whatever the number
// of threads. 256 below T = 16; from T = 16 on, 1024 while the backward's two [T, block] buffers of
// recomputed H stay within 512 KB (float32; a core's L2), so up to T = 64 (512 to T = 128, then 256).
// Why wider rows at long T (our reading; the VM exposes no cache counters): a block's loop over t
// touches T rows of each tensor (3T streams in the backward: the spike gradient, the input gradient,
// the next block's x), more than a hardware prefetcher follows, and each visit of a row is one run of
// block * 4 bytes -- 1 KB at 256 neurons, a quarter of a page. Measured (AMD EPYC VM, 2 threads,
// 256 -> 1024, alternating runs): fwd+bwd [16, 32, 64, 16, 16] 10.1 -> 9.1 ms (medians of 6); backward
// [32, 64, 4096] 6.7 -> 5.4 ms, [64, 64, 1024] 3.1 -> 2.8 ms (medians of 3); at T = 4 and 8 no gain
// beyond the VM's noise (and at 256 the buffer stays in L1), so short sequences keep 256.
constexpr int64_t kCpuMinBlock = 256;
constexpr int64_t kCpuMaxBlock = 1024;
inline int64_t cpu_block(int64_t T) {
  if (T < 16) return kCpuMinBlock;
  int64_t block = kCpuMaxBlock;
  while (block > kCpuMinBlock && 2 * T * block * int64_t(sizeof(float)) > (int64_t(512) << 10)) block /= 2;
  return block;
}

// KEEP: what the forward writes besides spikes and v_final (lif_ops.h).
template <Keep KEEP, typename scalar_t>
void forward_cpu_typed(SNNKD_LIF_FORWARD_TYPED_ARGS);

// FROM_X: `seq` is x (lif_backward_from_x, H recomputed), else the saved H (lif_backward).
// decay_partials: one PLIF decay-gradient partial per block of cpu_block(T) neurons when decay_grad.
template <bool FROM_X, typename scalar_t>
void backward_cpu_typed(SNNKD_LIF_BACKWARD_TYPED_ARGS);

}  // namespace lif
}  // namespace snnkd
