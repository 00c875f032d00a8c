// Helpers of the C++ autograd kernels (csrc/kd/kd_autograd.cpp, csrc/lif/lif_autograd.cpp): the eager
// path of the cpp and cuda backends. Those kernels wrap the device ops of csrc/ops.cpp in a
// torch::autograd::Function registered for the Autograd dispatch key, so an eager training call
// costs one C++ graph node instead of a Python autograd.Function (its apply, setup_context and
// backward in Python: ~30 us per forward+backward on a CPU, as much as a small loss's kernels).
// The Python formulas registered with torch.library (snnkd_fast/_library.py) stay what
// torch.compile and torch.func transforms use; the tests hold both paths to the same numbers.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <string>
#include <utility>

namespace snnkd {

// A typed handle of the registered op `name` (overload ""), looked up once per call site.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The gradients a backward returns, made first-order only as Python's @once_differentiable does:
// when the backward itself is being recorded (create_graph with a grad output that requires grad),
// they carry an error node, so differentiating them again raises instead of giving a silent zero.
inline torch::autograd::variable_list once_differentiable(const torch::autograd::variable_list& grad_outputs,
                                                          torch::autograd::variable_list grads, const char* op) {
  if (!at::GradMode::is_enabled()) return grads;
  bool recorded = false;
  for (const auto& g : grad_outputs) recorded = recorded || (g.defined() && g.requires_grad());
  if (!recorded) return grads;
  for (auto& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_(true);
  }
  torch::autograd::DelayedError error(std::string("trying to differentiate twice ") + op +
                                          " (once_differentiable: its backward is not differentiable)",
                                      static_cast<int64_t>(grads.size()));
  return error.apply(std::move(grads));
}

}  // namespace snnkd
