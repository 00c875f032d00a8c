// The eager autograd kernels of the fused KD losses on the cpp and cuda backends (see
// csrc/common/eager_autograd.h): snnkd_fast::kd_loss and snnkd_fast::nld_loss run the row op of
// their device (kd_rows_forward / nld_rows_forward) and reduce the rows [T, B] to the loss in the
// same node, so a training call records one C++ node -- no Python autograd.Function, no separate
// reduction node. The reduction is reduce_rows of snnkd_fast/kd/reference.py, op for op: the loss
// is bitwise that of the Python path, and so is the gradient except where the CPU forward forms it
// (below).
//
// On the CPU, when the call will be differentiated for the student alone, kd_loss's and nld_loss's
// forwards also return the student's gradient for a loss gradient of 1 (kd_rows_forward_student_grad_cpu,
// nld_rows_forward_student_grad_cpu: each row from the exps of its own forward while it is in cache,
// times 1/divisor), and the backward returns it as it is when the loss's gradient is 1 -- a loss
// backpropagated alone or as a term of a sum -- else multiplies it by that gradient in place (by the
// rows' gradient for "none"). The row backward instead re-reads both inputs and takes one exp per
// element again (NLD's also draws the noise again): at [4, 512, 100] the KL's was 70 of the ~245 us of
// a forward+backward. The gradient formed this way differs from the row backward's in its last bits
// (p = e^{u - m} / l, q = e^{s - m} / l rather than e^{log p}, e^{log q}); tests/test_cxx_autograd.py
// holds the two within 2e-6 of the gradient's largest element (fp32). The gradient is allocated by the
// forward instead of the backward -- either way at the time of a training step's peak, the loss being
// its last forward op. Not under saved-tensor hooks (offloading, checkpointing: the precomputed
// gradient would bypass them); a second backward through a retained graph runs the row backward.
//
// On a GPU kd_loss does the same (kd_forward_student_grad_kernel: the forward kernel's block writes
// its row's gradient with the row backward's formula, bit for bit the row backward's at a loss
// gradient of 1), for its traffic and its launches: the row backward reads the student and teacher
// again and writes the gradient (3 [T, B, C] passes over a step; here 2 where the forward's second
// read of each row hits L2), and costs the host a division, a broadcast copy and its own launch,
// where the backward here is one launch that returns at once when the loss's gradient -- read on
// the device, never synchronised -- is 1 (scale_unless_one). A 16-bit student's gradient scaled by
// another value rounds twice (once in the forward, once scaled) where the row backward's rounds once.
// nld_loss alike (nld_forward_student_grad_kernel: its row sums and gradient formed in the forward's
// block, one draw of the noise fewer than the row sums and backward kernels take, bit for bit theirs
// at a loss gradient of 1). SNNKD_CUDA_KD_NO_FORWARD_GRAD=1 turns both off (an A/B).
#include <ATen/SavedTensorHooks.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/library.h>

#include <tuple>

#include "common/eager_autograd.h"
#include "kd_ops.h"

namespace snnkd {
namespace kd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using RowsForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                   double, double, double, double);
using RowsBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                                        double, bool);
using NldForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                      double, double, bool, bool);
using NldBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const at::Tensor&, double, double, double,
                                                       bool, bool, bool);

// divisor 0: the rows themselves ("none"); else (1/divisor) * their sum, as reduce_rows computes it
// (one mean when the divisor counts every row, else a sum and a division by the integer).
at::Tensor reduce_rows(const at::Tensor& rows, int64_t divisor) {
  if (divisor == 0) return rows;
  if (divisor != 1 && rows.sym_numel() == divisor) return rows.mean();  // sym_*: traceable with symbolic shapes
  at::Tensor total = rows.sum();
  return divisor == 1 ? total : total.div(at::Scalar(divisor));
}

// The rows' gradient from the loss's: the backward of reduce_rows (the division by the divisor, then
// the broadcast), contiguous for the row kernels.
at::Tensor grad_of_rows(const at::Tensor& grad, int64_t divisor, c10::SymIntArrayRef rows_shape) {
  if (divisor == 0) return grad.contiguous();
  return (divisor == 1 ? grad : grad.div(at::Scalar(divisor))).expand_symint(rows_shape).contiguous();
}

void check_divisor(int64_t divisor, const char* op) {
  TORCH_CHECK(divisor >= 0, op, ": divisor must be >= 0 (0: no reduction)");
}

}  // namespace

CudaStudentGrad& cuda_student_grad() {
  static CudaStudentGrad kernels;  // filled by kd_cuda.cu's static initializer in a CUDA build
  return kernels;
}

namespace {

// Whether kd_loss's and nld_loss's forwards precompute the student's gradient (see the top of the
// file): plain tensors in an eager call that records the student's gradient alone, with nothing that
// watches the ops or the saved tensors (a dispatch mode or a tensor subclass would not see the direct
// kernel call; saved-tensor hooks would not see the gradient held for the backward); on the CPU, or
// (kd_loss only) on a GPU where the CUDA kernels for it are built (cuda_student_grad).
bool precompute_student_grad(const at::Tensor& student, const at::Tensor& teacher, bool on_cuda) {
  const bool device = student.device().is_cpu() || (on_cuda && student.is_cuda());
  return device && at::GradMode::is_enabled() && student.requires_grad() && !teacher.requires_grad() &&
         !student.key_set().has(c10::DispatchKey::Python) && !teacher.key_set().has(c10::DispatchKey::Python) &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set() && !at::SavedTensorDefaultHooks::get_hooks().has_value();
}

// The backward's use of a gradient the forward precomputed (saved_data "student_grad"), into grads[0]:
// taken out of the node (the gradient is then this tensor alone, which AccumulateGrad adopts without a
// copy; a retained graph's next backward runs the row backward) and completed in place. False where
// the node holds none or the call wants other gradients: the caller runs its row backward.
bool use_precomputed_student_grad(AutogradContext* ctx, const variable_list& grad_outputs, int64_t divisor,
                                  bool student_grad, bool teacher_grad, variable_list& grads) {
  const auto precomputed = ctx->saved_data.find("student_grad");
  if (precomputed == ctx->saved_data.end()) return false;
  at::Tensor grad_student = precomputed->second.toTensor();
  ctx->saved_data.erase(precomputed);
  if (!student_grad || teacher_grad) return false;
  const at::Tensor& grad_loss = grad_outputs[0];
  if (divisor == 0) {
    grad_student.mul_(grad_loss.unsqueeze(-1));  // the rows' own gradients
  } else if (grad_student.is_cuda()) {  // decided on the device: .item() would synchronise
    cuda_student_grad().scale_unless_one(grad_student, grad_loss);
  } else if (grad_loss.item<double>() != 1.0) {  // a CPU scalar: no synchronisation
    grad_student.mul_(grad_loss);
  }
  grads[0] = grad_student;
  return true;
}

// The weight of each row's gradient when the loss's gradient is 1.
double row_weight(int64_t divisor) { return divisor == 0 ? 1.0 : 1.0 / static_cast<double>(divisor); }

struct KdLossFunction : public torch::autograd::Function<KdLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher, int64_t loss,
                            double temperature, double entropy_temperature, double entropy_weight,
                            double head_threshold, int64_t divisor, bool precompute_grad) {
    static const auto rows_forward = find_op<RowsForward>("snnkd_fast::kd_rows_forward");
    check_divisor(divisor, "snnkd_fast::kd_loss");
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the device kernel, not the op's Python formula
    at::Tensor rows, stats, keys, student_grad;
    if (precompute_grad && student.is_cuda()) {  // any loss and dtypes (kd_forward_student_grad_kernel)
      std::tie(rows, stats, keys, student_grad) = cuda_student_grad().forward(
          student, teacher, loss, temperature, entropy_temperature, entropy_weight, head_threshold,
          row_weight(divisor));
    } else if (precompute_grad &&
               kd_cpu_forms_student_grad(student, teacher, loss, temperature, entropy_temperature)) {
      std::tie(rows, stats, keys, student_grad) = kd_rows_forward_student_grad_cpu(
          student, teacher, loss, temperature, entropy_temperature, entropy_weight, head_threshold,
          row_weight(divisor));
    } else {
      std::tie(rows, stats, keys) =
          rows_forward.call(student, teacher, loss, temperature, entropy_temperature, entropy_weight, head_threshold);
    }
    // held outside save_for_backward: the node's own tensor, not a view of an input to check versions of
    if (student_grad.defined()) ctx->saved_data["student_grad"] = student_grad;
    ctx->save_for_backward({student, teacher, stats, keys});
    ctx->saved_data["loss"] = loss;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["entropy_temperature"] = entropy_temperature;
    ctx->saved_data["entropy_weight"] = entropy_weight;
    ctx->saved_data["divisor"] = divisor;
    return reduce_rows(rows, divisor);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto rows_backward = find_op<RowsBackward>("snnkd_fast::kd_rows_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& stats = saved[2];
    const int64_t divisor = ctx->saved_data["divisor"].toInt();
    const bool student_grad = ctx->needs_input_grad(0), teacher_grad = ctx->needs_input_grad(1);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list grads(9);
    if (use_precomputed_student_grad(ctx, grad_outputs, divisor, student_grad, teacher_grad, grads)) {
      return once_differentiable(grad_outputs, std::move(grads), "snnkd_fast::kd_loss");
    }
    const at::Tensor grad_rows = grad_of_rows(grad_outputs[0], divisor, stats.sym_sizes().slice(0, 2));
    auto [grad_student, grad_teacher] = rows_backward.call(
        grad_rows, saved[0], saved[1], stats, saved[3], ctx->saved_data["loss"].toInt(),
        ctx->saved_data["temperature"].toDouble(), ctx->saved_data["entropy_temperature"].toDouble(),
        ctx->saved_data["entropy_weight"].toDouble(), teacher_grad);
    if (student_grad) grads[0] = grad_student;
    if (teacher_grad) grads[1] = grad_teacher;
    return once_differentiable(grad_outputs, std::move(grads), "snnkd_fast::kd_loss");
  }
};

struct NldLossFunction : public torch::autograd::Function<NldLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& seed, double temperature, double noise_weight, double noise_std,
                            bool adaptive, bool additive, int64_t divisor, bool precompute_grad) {
    static const auto rows_forward = find_op<NldForward>("snnkd_fast::nld_rows_forward");
    check_divisor(divisor, "snnkd_fast::nld_loss");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor rows, stats, student_grad;
    if (precompute_grad && student.is_cuda()) {  // any dtypes and modes (nld_forward_student_grad_kernel)
      std::tie(rows, stats, student_grad) = cuda_student_grad().nld_forward(
          student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive, row_weight(divisor));
    } else if (precompute_grad && nld_cpu_forms_student_grad(student, teacher)) {
      std::tie(rows, stats, student_grad) = nld_rows_forward_student_grad_cpu(
          student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive, row_weight(divisor));
    } else {
      std::tie(rows, stats) =
          rows_forward.call(student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive);
    }
    if (student_grad.defined()) ctx->saved_data["student_grad"] = student_grad;
    ctx->save_for_backward({student, teacher, seed, stats});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["noise_weight"] = noise_weight;
    ctx->saved_data["noise_std"] = noise_std;
    ctx->saved_data["adaptive"] = adaptive;
    ctx->saved_data["additive"] = additive;
    ctx->saved_data["divisor"] = divisor;
    return reduce_rows(rows, divisor);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto rows_backward = find_op<NldBackward>("snnkd_fast::nld_rows_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& stats = saved[3];
    const int64_t divisor = ctx->saved_data["divisor"].toInt();
    const bool student_grad = ctx->needs_input_grad(0), teacher_grad = ctx->needs_input_grad(1);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list grads(10);
    if (use_precomputed_student_grad(ctx, grad_outputs, divisor, student_grad, teacher_grad, grads)) {
      return once_differentiable(grad_outputs, std::move(grads), "snnkd_fast::nld_loss");
    }
    const at::Tensor grad_rows = grad_of_rows(grad_outputs[0], divisor, stats.sym_sizes().slice(0, 2));
    auto [grad_student, grad_teacher] = rows_backward.call(
        grad_rows, saved[0], saved[1], saved[2], stats, ctx->saved_data["temperature"].toDouble(),
        ctx->saved_data["noise_weight"].toDouble(), ctx->saved_data["noise_std"].toDouble(),
        ctx->saved_data["adaptive"].toBool(), ctx->saved_data["additive"].toBool(), teacher_grad);
    if (student_grad) grads[0] = grad_student;
    if (teacher_grad) grads[1] = grad_teacher;
    return once_differentiable(grad_outputs, std::move(grads), "snnkd_fast::nld_loss");
  }
};

at::Tensor kd_loss_autograd(const at::Tensor& student, const at::Tensor& teacher, int64_t loss, double temperature,
                            double entropy_temperature, double entropy_weight, double head_threshold,
                            int64_t divisor) {
  return KdLossFunction::apply(student, teacher, loss, temperature, entropy_temperature, entropy_weight,
                               head_threshold, divisor,
                               precompute_student_grad(student, teacher, cuda_student_grad().forward != nullptr));
}

// Below the autograd key (an op call autograd would not record reaches the Function too, which
// then records nothing; this is the kernel for callers already below it).
at::Tensor kd_loss_plain(const at::Tensor& student, const at::Tensor& teacher, int64_t loss, double temperature,
                         double entropy_temperature, double entropy_weight, double head_threshold, int64_t divisor) {
  static const auto rows_forward = find_op<RowsForward>("snnkd_fast::kd_rows_forward");
  check_divisor(divisor, "snnkd_fast::kd_loss");
  return reduce_rows(std::get<0>(rows_forward.call(student, teacher, loss, temperature, entropy_temperature,
                                                   entropy_weight, head_threshold)),
                     divisor);
}

at::Tensor nld_loss_autograd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& seed,
                             double temperature, double noise_weight, double noise_std, bool adaptive, bool additive,
                             int64_t divisor) {
  return NldLossFunction::apply(student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive,
                                divisor,
                                precompute_student_grad(student, teacher, cuda_student_grad().nld_forward != nullptr));
}

at::Tensor nld_loss_plain(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& seed,
                          double temperature, double noise_weight, double noise_std, bool adaptive, bool additive,
                          int64_t divisor) {
  static const auto rows_forward = find_op<NldForward>("snnkd_fast::nld_rows_forward");
  check_divisor(divisor, "snnkd_fast::nld_loss");
  return reduce_rows(
      std::get<0>(rows_forward.call(student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive)),
      divisor);
}

}  // namespace
}  // namespace kd
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, Autograd, m) {
  m.impl("kd_loss", &snnkd::kd::kd_loss_autograd);
  m.impl("nld_loss", &snnkd::kd::nld_loss_autograd);
}

TORCH_LIBRARY_IMPL(snnkd_fast, CompositeExplicitAutograd, m) {
  m.impl("kd_loss", &snnkd::kd::kd_loss_plain);
  m.impl("nld_loss", &snnkd::kd::nld_loss_plain);
}
