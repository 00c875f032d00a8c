// Operator schemas of snnkd_fast and their CPU implementations. The CUDA implementations register
// themselves in the .cu files; fake (meta) implementations and autograd are registered in Python
// (snnkd_fast/lif/op.py), next to the reference they are tested against.
#include <Python.h>
#include <torch/library.h>

#include "lif/lif_ops.h"

// Importing snnkd_fast._C from Python runs the static registrations below; the module itself
// exposes nothing (no pybind11: the ops are reached through torch.ops.snnkd_fast).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(snnkd_fast, m) {
  // One kernel family serves IF (neuron=0), LIF (1) and PLIF (2; decay = sigmoid(w) as a tensor so
  // that the kernel reads it on the device, with no host synchronisation). v_reset is the resting
  // value of the charge (0 with soft_reset). The forward carries the backward's scalars
  // (detach_reset, surrogate, alpha) so that autograd, registered on the forward op, has them.
  m.def(
      "lif_forward(Tensor x, Tensor v_init, Tensor? decay, int neuron, float tau, bool decay_input, "
      "float v_threshold, float v_reset, bool soft_reset, bool detach_reset, int surrogate, float alpha) "
      "-> (Tensor spikes, Tensor v_final, Tensor h_seq)");
  m.def(
      "lif_backward(Tensor? grad_spikes, Tensor? grad_v, Tensor h_seq, Tensor v_init, Tensor? decay, "
      "ScalarType grad_dtype, int neuron, float tau, bool decay_input, float v_threshold, float v_reset, "
      "bool soft_reset, bool detach_reset, int surrogate, float alpha, bool decay_grad) "
      "-> (Tensor grad_x, Tensor grad_v_init, Tensor grad_decay)");
}

TORCH_LIBRARY_IMPL(snnkd_fast, CPU, m) {
  m.impl("lif_forward", &snnkd::lif::forward_op<snnkd::lif::launch_forward_cpu>);
  m.impl("lif_backward", &snnkd::lif::backward_op<snnkd::lif::launch_backward_cpu>);
}
