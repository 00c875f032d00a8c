// Operator schemas of snnkd_fast. Each kernel file registers its own implementations
// (TORCH_LIBRARY_IMPL for CPU in *_cpu.cpp, CUDA in *_cuda.cu); fake (meta) implementations and
// autograd are registered in Python (snnkd_fast/<family>/op.py), next to the references.
#include <Python.h>
#include <torch/library.h>


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
  // The lean pair (CPU and CUDA kernels; the neuron ops pick it for CPU tensors only, until it is
  // measured on a GPU -- benchmarks/ab_neuron_pairs.py): the forward writes no H
  // and its backward recomputes H from the forward's input x (dtype grad_dtype): 20 bytes per
  // neuron-step over forward+backward in fp32 instead of 24, the same saved memory (x instead of H).
  m.def(
      "lif_forward_lean(Tensor x, Tensor v_init, Tensor? decay, int neuron, float tau, bool decay_input, "
      "float v_threshold, float v_reset, bool soft_reset, bool detach_reset, int surrogate, float alpha) "
      "-> (Tensor spikes, Tensor v_final)");
  m.def(
      "lif_backward_from_x(Tensor? grad_spikes, Tensor? grad_v, Tensor x, Tensor v_init, Tensor? decay, "
      "ScalarType grad_dtype, int neuron, float tau, bool decay_input, float v_threshold, float v_reset, "
      "bool soft_reset, bool detach_reset, int surrogate, float alpha, bool decay_grad) "
      "-> (Tensor grad_x, Tensor grad_v_init, Tensor grad_decay)");
  // Rate-based backpropagation's forward: the same neuron, but instead of H it returns the
  // eligibility e = (1/T) sum_t sg[t] dH[t]/dx (one step's shape): the backward needs nothing else.
  m.def(
      "lif_rate_forward(Tensor x, Tensor v_init, Tensor? decay, int neuron, float tau, bool decay_input, "
      "float v_threshold, float v_reset, bool soft_reset, bool detach_reset, int surrogate, float alpha) "
      "-> (Tensor spikes, Tensor v_final, Tensor eligibility)");
  // The eager paths of lif_forward and lif_rate_forward on the cpp and cuda backends
  // (csrc/lif/lif_autograd.cpp): the same forwards with C++ autograd kernels. recompute_h: run the
  // lean pair (lif_forward_lean / lif_backward_from_x) instead of the saved-H pair.
  m.def(
      "neuron_multistep(Tensor x, Tensor v_init, Tensor? decay, int neuron, float tau, bool decay_input, "
      "float v_threshold, float v_reset, bool soft_reset, bool detach_reset, int surrogate, float alpha, "
      "bool recompute_h=False) -> (Tensor spikes, Tensor v_final)");
  m.def(
      "neuron_multistep_rate(Tensor x, Tensor v_init, Tensor? decay, int neuron, float tau, bool decay_input, "
      "float v_threshold, float v_reset, bool soft_reset, bool detach_reset, int surrogate, float alpha) "
      "-> (Tensor spikes, Tensor v_final)");

  // Per-row losses of the fused KD family (loss: 0 KL, 1 TSER, 2 HTA; snnkd_fast/kd/params.py): rows
  // [T, B] and stats [T, B, 5] in float32 (float64 for float64 inputs), HTA head keys [Tt, B, 3] int32.
  m.def(
      "kd_rows_forward(Tensor student, Tensor teacher, int loss, float temperature, float entropy_temperature, "
      "float entropy_weight, float head_threshold) -> (Tensor rows, Tensor stats, Tensor hta_keys)");
  m.def(
      "kd_rows_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor stats, Tensor hta_keys, int loss, "
      "float temperature, float entropy_temperature, float entropy_weight, bool teacher_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");

  // CKDSNN's noise-smoothed logits distillation: the noise eps is regenerated from `seed` (int64,
  // one element, on the device) with Philox keyed by the element index; noise_std is used when
  // adaptive is false (the adaptive scale is the row's unbiased logit variance). Stats [T, B, 6].
  m.def(
      "nld_rows_forward(Tensor student, Tensor teacher, Tensor seed, float temperature, float noise_weight, "
      "float noise_std, bool adaptive, bool additive) -> (Tensor rows, Tensor stats)");
  m.def(
      "nld_rows_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor seed, Tensor stats, "
      "float temperature, float noise_weight, float noise_std, bool adaptive, bool additive, bool teacher_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
  // The eps the NLD kernels draw for `seed`, element i of the flattened shape (a test helper).
  m.def("nld_noise(Tensor seed, int[] shape) -> Tensor");

  // The eager path of the two row families on the cpp and cuda backends (csrc/kd/kd_autograd.cpp):
  // the row op and its reduction with a C++ autograd kernel. divisor 0 returns the rows [T, B];
  // else their sum / divisor (a mean when the divisor counts every row) as a 0-dim tensor.
  m.def(
      "kd_loss(Tensor student, Tensor teacher, int loss, float temperature, float entropy_temperature, "
      "float entropy_weight, float head_threshold, int divisor) -> Tensor");
  m.def(
      "nld_loss(Tensor student, Tensor teacher, Tensor seed, float temperature, float noise_weight, "
      "float noise_std, bool adaptive, bool additive, int divisor) -> Tensor");
}

