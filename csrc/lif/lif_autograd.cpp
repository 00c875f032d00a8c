// The eager autograd kernels of the multi-step neurons on the cpp and cuda backends (see
// csrc/common/eager_autograd.h): snnkd_fast::neuron_multistep runs lif_forward on the tensors'
// device (lif_forward_lean with recompute_h, which snnkd_fast/lif/op.py passes for the devices whose
// backends run the lean pair) and records one C++ node whose backward is lif_backward
// (lif_backward_from_x) -- the formula of snnkd_fast/lif/op.py (_setup_context /
// _setup_lean_context, _make_backward), which torch.compile and torch.func use;
// neuron_multistep_rate does the same for lif_rate_forward (backward="rate").
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/eager_autograd.h"
#include "lif_ops.h"

namespace snnkd {
namespace lif {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const std::optional<at::Tensor>&, int64_t, double, bool,
                                                               double, double, bool, bool, int64_t, double);
using LeanForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const std::optional<at::Tensor>&, int64_t, double, bool, double,
                                                       double, bool, bool, int64_t, double);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, at::ScalarType, int64_t, double, bool, double, double, bool, bool, int64_t,
    double, bool);

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t.contiguous()) : std::nullopt;
}

// The BPTT forward on x's device: (spikes, v_final, the [T, ...] tensor its backward needs). With
// recompute_h that is x itself -- lif_forward_lean writes no H and lif_backward_from_x recomputes it
// (as _setup_lean_context in lif/op.py) -- else the H lif_forward saves.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bptt_forward(const at::Tensor& x, const at::Tensor& v_init,
                                                            const std::optional<at::Tensor>& decay, int64_t neuron,
                                                            double tau, bool decay_input, double v_threshold,
                                                            double v_reset, bool soft_reset, bool detach_reset,
                                                            int64_t surrogate, double alpha, bool recompute_h) {
  static const auto lif_forward = find_op<Forward>("snnkd_fast::lif_forward");
  static const auto lif_forward_lean = find_op<LeanForward>("snnkd_fast::lif_forward_lean");
  if (recompute_h) {
    auto [spikes, v_final] = lif_forward_lean.call(x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset,
                                                   soft_reset, detach_reset, surrogate, alpha);
    return {spikes, v_final, x};
  }
  return lif_forward.call(x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset,
                          surrogate, alpha);
}

struct NeuronFunction : public torch::autograd::Function<NeuronFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& v_init,
                               const std::optional<at::Tensor>& decay, int64_t neuron, double tau, bool decay_input,
                               double v_threshold, double v_reset, bool soft_reset, bool detach_reset,
                               int64_t surrogate, double alpha, bool recompute_h) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the device kernel, not the op's Python formula
    auto [spikes, v_final, kept] = bptt_forward(x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset,
                                                soft_reset, detach_reset, surrogate, alpha, recompute_h);
    ctx->save_for_backward({kept, v_init, decay.has_value() ? *decay : at::Tensor()});
    ctx->saved_data["from_x"] = recompute_h;  // kept is x: the backward is lif_backward_from_x
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["ints"] = std::vector<int64_t>{neuron, decay_input, soft_reset, detach_reset, surrogate};
    ctx->saved_data["floats"] = std::vector<double>{tau, v_threshold, v_reset, alpha};
    ctx->set_materialize_grads(false);  // an unused spike or membrane output costs no zero tensor
    return {spikes, v_final};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto lif_backward = find_op<Backward>("snnkd_fast::lif_backward");
    static const auto lif_backward_from_x = find_op<Backward>("snnkd_fast::lif_backward_from_x");
    const auto& backward_op = ctx->saved_data["from_x"].toBool() ? lif_backward_from_x : lif_backward;
    const variable_list saved = ctx->get_saved_variables();
    const auto i = ctx->saved_data["ints"].toIntVector();  // neuron, decay_input, soft_reset, detach_reset,
    const auto f = ctx->saved_data["floats"].toDoubleVector();  // surrogate; tau, v_threshold, v_reset, alpha
    // needs_input_grad counts the tensor inputs given: decay (PLIF's) is the third only when present
    const bool v_init_grad = ctx->needs_input_grad(1), decay_grad = saved[2].defined() && ctx->needs_input_grad(2);
    const std::optional<at::Tensor> decay = defined_or_none(saved[2]);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_v_init, grad_decay] = backward_op.call(
        defined_or_none(grad_outputs[0]), defined_or_none(grad_outputs[1]), saved[0], saved[1], decay,
        ctx->saved_data["x_dtype"].toScalarType(), i[0], f[0], i[1] != 0, f[1], f[2], i[2] != 0, i[3] != 0, i[4],
        f[3], decay_grad);
    variable_list grads(13);
    grads[0] = grad_x;
    if (v_init_grad) grads[1] = grad_v_init;
    if (decay_grad) grads[2] = grad_decay;
    return once_differentiable(grad_outputs, std::move(grads), "snnkd_fast::neuron_multistep");
  }
};

// Rate-based backpropagation's node: lif_rate_forward keeps the eligibility e (one step); the backward
// gives every step dL/dx[t] = (1/T) e sum_t' dL/dS[t'], as _rate_backward in snnkd_fast/lif/op.py
// (op for op: the same bits). v_init, decay and v_final carry no gradient in this mode.
struct RateNeuronFunction : public torch::autograd::Function<RateNeuronFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& v_init,
                               const std::optional<at::Tensor>& decay, int64_t neuron, double tau, bool decay_input,
                               double v_threshold, double v_reset, bool soft_reset, bool detach_reset,
                               int64_t surrogate, double alpha) {
    static const auto rate_forward = find_op<Forward>("snnkd_fast::lif_rate_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [spikes, v_final, eligibility] = rate_forward.call(x, v_init, decay, neuron, tau, decay_input, v_threshold,
                                                            v_reset, soft_reset, detach_reset, surrogate, alpha);
    ctx->save_for_backward({eligibility});  // O(N): nothing T-long
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["num_steps"] = x.size(0);
    ctx->mark_non_differentiable({v_final});
    ctx->set_materialize_grads(false);
    return {spikes, v_final};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor eligibility = ctx->get_saved_variables()[0];
    variable_list grads(12);
    if (grad_outputs[0].defined()) {
      const int64_t num_steps = ctx->saved_data["num_steps"].toInt();
      const at::Tensor grad_mean =
          grad_outputs[0].sum(0, false, eligibility.scalar_type()) * eligibility.div(at::Scalar(num_steps));
      std::vector<int64_t> shape{num_steps};
      shape.insert(shape.end(), grad_mean.sizes().begin(), grad_mean.sizes().end());
      grads[0] = grad_mean.to(ctx->saved_data["x_dtype"].toScalarType()).unsqueeze(0).expand(shape);
    }
    return once_differentiable(grad_outputs, std::move(grads), "snnkd_fast::neuron_multistep_rate");
  }
};

std::tuple<at::Tensor, at::Tensor> neuron_multistep_rate_autograd(
    const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay, int64_t neuron, double tau,
    bool decay_input, double v_threshold, double v_reset, bool soft_reset, bool detach_reset, int64_t surrogate,
    double alpha) {
  variable_list out = RateNeuronFunction::apply(x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset,
                                                soft_reset, detach_reset, surrogate, alpha);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> neuron_multistep_rate_plain(
    const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay, int64_t neuron, double tau,
    bool decay_input, double v_threshold, double v_reset, bool soft_reset, bool detach_reset, int64_t surrogate,
    double alpha) {
  static const auto rate_forward = find_op<Forward>("snnkd_fast::lif_rate_forward");
  auto [spikes, v_final, eligibility] = rate_forward.call(x, v_init, decay, neuron, tau, decay_input, v_threshold,
                                                          v_reset, soft_reset, detach_reset, surrogate, alpha);
  return {spikes, v_final};
}

std::tuple<at::Tensor, at::Tensor> neuron_multistep_autograd(const at::Tensor& x, const at::Tensor& v_init,
                                                             const std::optional<at::Tensor>& decay, int64_t neuron,
                                                             double tau, bool decay_input, double v_threshold,
                                                             double v_reset, bool soft_reset, bool detach_reset,
                                                             int64_t surrogate, double alpha, bool recompute_h) {
  // as the Python formula's setup_context: one value standing for every neuron gets no gradient
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && v_init.requires_grad() && x.dim() >= 1 && x.sym_size(0) != 0 &&
                      broadcast_v_init(v_init, x.sym_numel() / x.sym_size(0))),
                    "snnkd_fast::neuron_multistep: a one-element v_init stands for one value for every neuron and "
                    "gets no gradient; expand it to one step of x to differentiate it");
  variable_list out = NeuronFunction::apply(x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset,
                                            soft_reset, detach_reset, surrogate, alpha, recompute_h);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> neuron_multistep_plain(const at::Tensor& x, const at::Tensor& v_init,
                                                          const std::optional<at::Tensor>& decay, int64_t neuron,
                                                          double tau, bool decay_input, double v_threshold,
                                                          double v_reset, bool soft_reset, bool detach_reset,
                                                          int64_t surrogate, double alpha, bool recompute_h) {
  auto [spikes, v_final, kept] = bptt_forward(x, v_init, decay, neuron, tau, decay_input, v_threshold, v_reset,
                                              soft_reset, detach_reset, surrogate, alpha, recompute_h);
  return {spikes, v_final};
}

}  // namespace
}  // namespace lif
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, Autograd, m) {
  m.impl("neuron_multistep", &snnkd::lif::neuron_multistep_autograd);
  m.impl("neuron_multistep_rate", &snnkd::lif::neuron_multistep_rate_autograd);
}

TORCH_LIBRARY_IMPL(snnkd_fast, CompositeExplicitAutograd, m) {
  m.impl("neuron_multistep", &snnkd::lif::neuron_multistep_plain);
  m.impl("neuron_multistep_rate", &snnkd::lif::neuron_multistep_rate_plain);
}
