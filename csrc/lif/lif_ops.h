// Tensor-level entry points of the neuron kernels, one pair per device, registered in
// csrc/ops.cpp (CPU) and csrc/lif/lif_cuda.cu (CUDA) under the schema defined in csrc/ops.cpp.
// Arguments are validated in Python (snnkd_fast/lif/op.py); the checks here only keep a direct
// torch.ops call from crashing the process.
#pragma once

#include <torch/types.h>

#include <optional>
#include <tuple>

#include "lif_math.h"

namespace snnkd {
namespace lif {

// The dtype the kernels compute (and keep the membrane) in: float64 for float64 inputs, float32
// for float32/float16/bfloat16.
inline at::ScalarType acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// v_init is one step of x ([N] values), or one value for every neuron: a one-element tensor when a
// step has more than one neuron (the membrane starting at v_reset or a float: the kernel reads the
// value instead of a materialised [N] tensor, 8 bytes per neuron less at T = 1). The CPU, CUDA and
// Triton kernels read it so. Such a v_init gets no gradient:
// the backward's grad_v_init is then empty ([0]). Python's twin: broadcasts_v_init in
// snnkd_fast/lif/params.py (the fake kernels and the Triton glue).
// (Symbolic sizes too: the C++ autograd kernel checks it while torch.compile or opcheck trace it.)
inline bool broadcast_v_init(const at::Tensor& v_init, const c10::SymInt& step_numel) {
  return v_init.sym_numel() == 1 && step_numel != 1;
}

// v_init's size fits a sequence of `numel` elements over `steps` steps: one step, or one value.
inline bool v_init_fits(const at::Tensor& v_init, int64_t steps, int64_t numel) {
  return v_init.numel() * steps == numel || v_init.numel() == 1;
}

inline void check_forward_args(const at::Tensor& x, const at::Tensor& v_init,
                               const std::optional<at::Tensor>& decay, const ScalarArgs& a) {
  TORCH_CHECK(x.dim() >= 1, "snnkd_fast::lif_forward: x must be [T, ...], got a 0-dim tensor");
  TORCH_CHECK(x.is_contiguous() && v_init.is_contiguous(),
              "snnkd_fast::lif_forward: x and v_init must be contiguous");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "snnkd_fast::lif_forward: x must be floating point");
  TORCH_CHECK(v_init.scalar_type() == acc_dtype(x.scalar_type()),
              "snnkd_fast::lif_forward: v_init must be float32 (float64 for float64 x)");
  TORCH_CHECK(v_init_fits(v_init, x.size(0), x.numel()),
              "snnkd_fast::lif_forward: v_init must hold one step of x, or one value for every neuron");
  TORCH_CHECK(a.neuron >= kIF && a.neuron <= kPLIF, "snnkd_fast::lif_forward: unknown neuron kind");
  TORCH_CHECK(a.neuron != kPLIF || (decay.has_value() && decay->numel() == 1 &&
                                    decay->scalar_type() == v_init.scalar_type()),
              "snnkd_fast::lif_forward: PLIF needs a one-element decay tensor of v_init's dtype");
  TORCH_CHECK(a.surrogate >= 0 && a.surrogate < kNumSurrogates, "snnkd_fast: unknown surrogate id");
  TORCH_CHECK(x.device() == v_init.device() && (!decay.has_value() || decay->device() == x.device()),
              "snnkd_fast::lif_forward: all tensors must be on one device");
}

inline void check_backward_args(const std::optional<at::Tensor>& grad_spikes,
                                const std::optional<at::Tensor>& grad_v, const at::Tensor& h_seq,
                                const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                                const ScalarArgs& a) {
  TORCH_CHECK(h_seq.dim() >= 1 && h_seq.is_contiguous() && v_init.is_contiguous(),
              "snnkd_fast::lif_backward: h_seq and v_init must be contiguous");
  TORCH_CHECK(v_init_fits(v_init, h_seq.size(0), h_seq.numel()) &&
                  v_init.scalar_type() == acc_dtype(h_seq.scalar_type()),
              "snnkd_fast::lif_backward: v_init must be one step of h_seq (or one value), in its acc dtype");
  if (grad_spikes.has_value()) {
    TORCH_CHECK(grad_spikes->is_contiguous() && grad_spikes->sizes() == h_seq.sizes(),
                "snnkd_fast::lif_backward: grad_spikes must be contiguous and shaped like h_seq");
  }
  if (grad_v.has_value()) {
    TORCH_CHECK(grad_v->is_contiguous() && grad_v->numel() * h_seq.size(0) == h_seq.numel() &&
                    grad_v->scalar_type() == v_init.scalar_type(),
                "snnkd_fast::lif_backward: grad_v must be contiguous, one step, dtype of v_init");
  }
  TORCH_CHECK(a.neuron != kPLIF || (decay.has_value() && decay->numel() == 1 &&
                                    decay->scalar_type() == v_init.scalar_type()),
              "snnkd_fast::lif_backward: PLIF needs a one-element decay tensor of v_init's dtype");
  TORCH_CHECK(a.surrogate >= 0 && a.surrogate < kNumSurrogates, "snnkd_fast: unknown surrogate id");
}

// Device launchers: outputs are allocated (and empty inputs handled) by the op adapters below.
using ForwardLauncher = void (*)(const at::Tensor& x, const at::Tensor& v_init,
                                 const std::optional<at::Tensor>& decay, const ScalarArgs& a,
                                 at::Tensor& spikes, at::Tensor& v_final, at::Tensor& h_seq);
using BackwardLauncher = void (*)(const std::optional<at::Tensor>& grad_spikes,
                                  const std::optional<at::Tensor>& grad_v, const at::Tensor& h_seq,
                                  const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                                  bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x,
                                  at::Tensor& grad_v_init, at::Tensor& grad_decay);

void launch_forward_cpu(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                        const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& h_seq);
void launch_rate_forward_cpu(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                             const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& eligibility);
void launch_backward_cpu(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                         const at::Tensor& h_seq, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                         bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                         at::Tensor& grad_decay);
// The lean pair (lif_forward_lean writes no H; lif_backward_from_x recomputes it from x); its CUDA
// launchers are in lif_cuda.cu.
void launch_lean_forward_cpu(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                             const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& unused);
void launch_backward_from_x_cpu(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                                const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                                bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                                at::Tensor& grad_decay);

// What a forward keeps for its backward (its third output).
enum class Keep {
  kH,            // H [T, ...] in the acc dtype, for the BPTT backward (lif_forward)
  kEligibility,  // the eligibility e [...] (acc dtype), for the rate-based backward (lif_rate_forward)
  kNothing,      // nothing: the backward recomputes H from x (lif_forward_lean / lif_backward_from_x)
};

// snnkd_fast::lif_forward for one device:
// (spikes [T, ...] in x's dtype, v_final [...] in the acc dtype, and what KEEP says: h_seq [T, ...]
// in the acc dtype; for lif_rate_forward the eligibility [...]; an undefined tensor for kNothing).
// A one-element v_init (one value for every neuron) reaches the launcher as it is.
template <ForwardLauncher launch, Keep KEEP = Keep::kH>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& x, const at::Tensor& v_init,
                                                          const std::optional<at::Tensor>& decay, int64_t neuron,
                                                          double tau, bool decay_input, double v_threshold,
                                                          double v_reset, bool soft_reset, bool detach_reset,
                                                          int64_t surrogate, double alpha) {
  const ScalarArgs a{neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate, alpha};
  check_forward_args(x, v_init, decay, a);
  auto acc_options = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor spikes = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor saved;
  if (KEEP != Keep::kNothing) saved = at::empty(KEEP == Keep::kH ? x.sizes() : x.sizes().slice(1), acc_options);
  at::Tensor v_final = at::empty(x.sizes().slice(1), acc_options);
  if (x.numel() == 0) {  // (T = 0: v_final is v_init, a one-value v_init standing for every neuron)
    v_final.copy_(v_init.reshape({-1}).expand({v_final.numel()}).view(v_final.sizes()));
    if (KEEP == Keep::kEligibility) saved.zero_();
  } else {
    launch(x, v_init, decay, a, spikes, v_final, saved);
  }
  return {spikes, v_final, saved};
}

// snnkd_fast::lif_forward_lean for one device: (spikes, v_final), no H written (8 bytes per
// neuron-step in fp32 where lif_forward moves 12); its backward is lif_backward_from_x.
template <ForwardLauncher launch>
std::tuple<at::Tensor, at::Tensor> lean_forward_op(const at::Tensor& x, const at::Tensor& v_init,
                                                   const std::optional<at::Tensor>& decay, int64_t neuron, double tau,
                                                   bool decay_input, double v_threshold, double v_reset,
                                                   bool soft_reset, bool detach_reset, int64_t surrogate,
                                                   double alpha) {
  auto [spikes, v_final, none] = forward_op<launch, Keep::kNothing>(
      x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate, alpha);
  return {spikes, v_final};
}

// snnkd_fast::lif_backward for one device:
// (grad_x [T, ...] in grad_dtype, grad_v_init [...] acc ([0] for a one-element v_init broadcast to
// every neuron: the launcher gets it as it is, and an empty grad_v_init it writes nothing to),
// grad_decay [] acc, zero unless requested. FROM_X: snnkd_fast::lif_backward_from_x, whose `seq` is
// the forward's input x (dtype grad_dtype; the launcher recomputes H), else the saved H.
template <BackwardLauncher launch, bool FROM_X = false>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v, const at::Tensor& seq,
    const at::Tensor& v_init, const std::optional<at::Tensor>& decay, at::ScalarType grad_dtype, int64_t neuron,
    double tau, bool decay_input, double v_threshold, double v_reset, bool soft_reset, bool detach_reset,
    int64_t surrogate, double alpha, bool decay_grad) {
  const ScalarArgs a{neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate, alpha};
  check_backward_args(grad_spikes, grad_v, seq, v_init, decay, a);
  TORCH_CHECK(!grad_spikes.has_value() || grad_spikes->scalar_type() == grad_dtype,
              "snnkd_fast::lif_backward: grad_spikes must have the dtype of x");
  TORCH_CHECK(FROM_X ? seq.scalar_type() == grad_dtype : seq.scalar_type() == acc_dtype(seq.scalar_type()),
              FROM_X ? "snnkd_fast::lif_backward_from_x: grad_dtype must be the dtype of x"
                     : "snnkd_fast::lif_backward: h_seq must be float32 (float64 for float64 x)");
  const auto acc_options = seq.options().dtype(acc_dtype(seq.scalar_type()));
  at::Tensor grad_x = at::empty(seq.sizes(), seq.options().dtype(grad_dtype));
  at::Tensor grad_decay = at::zeros({}, acc_options);
  const bool plif_grad = decay_grad && a.neuron == kPLIF;
  if (seq.numel() > 0 && broadcast_v_init(v_init, seq.numel() / seq.size(0))) {
    at::Tensor no_grad_v_init = at::empty({0}, acc_options);
    launch(grad_spikes, grad_v, seq, v_init, decay, plif_grad, a, grad_x, no_grad_v_init, grad_decay);
    return {grad_x, no_grad_v_init, grad_decay};
  }
  at::Tensor grad_v_init = at::empty(seq.sizes().slice(1), acc_options);
  if (seq.numel() == 0) {
    if (grad_v.has_value()) grad_v_init.copy_(grad_v->view(grad_v_init.sizes()));
    else grad_v_init.zero_();
  } else {
    launch(grad_spikes, grad_v, seq, v_init, decay, plif_grad, a, grad_x, grad_v_init, grad_decay);
  }
  return {grad_x, grad_v_init, grad_decay};
}

}  // namespace lif
}  // namespace snnkd
