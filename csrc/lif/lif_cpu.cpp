// The CPU neuron ops: the dtype dispatch and the registration. The kernels (blocks of neurons in
// parallel, time outside, the block's neurons inside: see lif_cpu_kernels.h) are compiled one dtype
// per file, lif_cpu_<dtype>.cpp.
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>
#include <vector>

#include "lif_cpu_typed.h"
#include "lif_ops.h"

namespace snnkd {
namespace lif {

// Each dtype's kernels live in their own file (lif_cpu_typed.h); this one dispatches and registers.
template <Keep KEEP>
void launch_forward_cpu_impl(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                             const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "snnkd_lif_forward_cpu", [&] {
    forward_cpu_typed<KEEP, scalar_t>(x, v_init, decay, a, spikes, v_final, out);
  });
}

void launch_forward_cpu(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                        const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& h_seq) {
  launch_forward_cpu_impl<Keep::kH>(x, v_init, decay, a, spikes, v_final, h_seq);
}

void launch_rate_forward_cpu(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                             const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& eligibility) {
  launch_forward_cpu_impl<Keep::kEligibility>(x, v_init, decay, a, spikes, v_final, eligibility);
}

void launch_lean_forward_cpu(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                             const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& unused) {
  launch_forward_cpu_impl<Keep::kNothing>(x, v_init, decay, a, spikes, v_final, unused);
}

// FROM_X: `seq` is x (lif_backward_from_x, H recomputed), else the saved H (lif_backward).
template <bool FROM_X>
void launch_backward_cpu_impl(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                              const at::Tensor& seq, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                              bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                              at::Tensor& grad_decay) {
  const int64_t N = seq.numel() / seq.size(0);
  const int64_t block = cpu_block(seq.size(0));
  std::vector<double> partials(decay_grad ? (N + block - 1) / block : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "snnkd_lif_backward_cpu", [&] {
    backward_cpu_typed<FROM_X, scalar_t>(grad_spikes, grad_v, seq, v_init, decay, decay_grad, a, grad_x, grad_v_init,
                                         partials.data());
  });
  if (decay_grad) {
    double total = 0.0;
    for (double partial : partials) total += partial;  // fixed order: deterministic
    grad_decay.fill_(total);
  }
}

void launch_backward_cpu(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                         const at::Tensor& h_seq, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                         bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                         at::Tensor& grad_decay) {
  launch_backward_cpu_impl<false>(grad_spikes, grad_v, h_seq, v_init, decay, decay_grad, a, grad_x, grad_v_init,
                                  grad_decay);
}

void launch_backward_from_x_cpu(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                                const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                                bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                                at::Tensor& grad_decay) {
  launch_backward_cpu_impl<true>(grad_spikes, grad_v, x, v_init, decay, decay_grad, a, grad_x, grad_v_init,
                                 grad_decay);
}

}  // namespace lif
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CPU, m) {
  using snnkd::lif::Keep;
  // the CPU kernels read a one-element v_init themselves
  m.impl("lif_forward", &snnkd::lif::forward_op<snnkd::lif::launch_forward_cpu, Keep::kH>);
  m.impl("lif_backward", &snnkd::lif::backward_op<snnkd::lif::launch_backward_cpu>);
  m.impl("lif_rate_forward", &snnkd::lif::forward_op<snnkd::lif::launch_rate_forward_cpu, Keep::kEligibility>);
  m.impl("lif_forward_lean", &snnkd::lif::lean_forward_op<snnkd::lif::launch_lean_forward_cpu>);
  m.impl("lif_backward_from_x", &snnkd::lif::backward_op<snnkd::lif::launch_backward_from_x_cpu, true>);
}
