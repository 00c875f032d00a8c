// Launchers of the CUDA kernels of the KL-family losses (per-timestep KL, TSER, HTA-KL;
// csrc/kd/kd_cuda_kernels.cuh) and their registration; NLD's are in nld_cuda.cu (one file each, so
// that the build compiles them in parallel). Same argument checks, output shapes, dtypes and
// empty-input handling as the CPU ops (kd_cpu.cpp), plus a same-device check.
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kd_cuda_kernels.cuh"
#include "kd_cuda_launch.h"
#include "kd_ops.h"

namespace snnkd {
namespace kd {
namespace cuda {
namespace {

// SNNKD_CUDA_KD_UNPACKED=1 (read once per process): the loss row kernels one class per access and
// the HTA head in one 256-thread block per row whatever the rows allow -- the kernels' forms before
// packing, wide and split heads, for an A/B of the two in one build (run_gpu.sh --breakdown). Same
// results to rounding (the backward's bit for bit).
bool packing_disabled() {
  static const bool disabled = env_flag("SNNKD_CUDA_KD_UNPACKED");
  return disabled;
}

// HTA's teacher head into keys [rows, 3]: one block per row (hta_teacher_kernel, in 512-thread
// blocks where rows are fewer than multiprocessors) or, where the rows leave the GPU's head slots
// empty and are long enough to cut, the split head's launches (hta_head_splits). Under
// SNNKD_CUDA_KD_UNPACKED: one 256-thread block per row, whatever the rows.
template <typename u_t>
void launch_hta_head(const u_t* u, Strides us, int64_t rows, int64_t B, int64_t C, double inv_tau,
                     double head_threshold, int32_t* keys, const at::Tensor& like, cudaStream_t stream) {
  const char* op = "snnkd_fast::kd_rows_forward";
  // (cudaDeviceGetAttribute, not ATen/cuda/CUDAContext.h: that header needs cuSPARSE's, which the
  // CPU machines' compile check of this file lacks)
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, like.get_device()));
  const int64_t splits = packing_disabled() ? 1 : hta_head_splits(rows, C, multiprocessors);
  if (splits > 1) {
    const HtaSplit split = hta_split(rows, C, splits);
    row_blocks(op, split.rows * split.slices);
    // freed to the caching allocator on return: later work on this stream alone can reuse it
    at::Tensor scratch =
        at::empty({hta_split_scratch(split.rows, split.slices).bytes}, like.options().dtype(at::kByte));
    const auto launch = [&](auto kernel, int64_t blocks, auto... args) {
      kernel<<<blocks, kThreads, 0, stream>>>(args...);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    hta_split_head(launch, u, us, B, C, split, inv_tau, head_threshold, scratch.data_ptr<uint8_t>(), keys);
    return;
  }
  const int threads = packing_disabled() ? kThreads : hta_head_threads(rows, multiprocessors);
  const auto head =
      threads == kHtaWideThreads ? hta_teacher_kernel<u_t, kHtaWideThreads> : hta_teacher_kernel<u_t, kThreads>;
  head<<<row_blocks(op, rows), threads, 0, stream>>>(u, us, B, C, inv_tau, head_threshold, keys);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// kd_rows_forward, and with student_grad the student's gradient [T, B, C] (contiguous) at a row
// gradient of row_weight (kd_forward_student_grad_kernel; else undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_impl(
    const at::Tensor& student, const at::Tensor& teacher, int64_t loss, double temperature,
    double entropy_temperature, double entropy_weight, double head_threshold, bool student_grad,
    double row_weight) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::kd_rows_forward");
  const Strides ss = L.s, us = L.u;
  const bool per_t = L.teacher_per_t;
  TORCH_CHECK(loss >= kKL && loss <= kHTA, "snnkd_fast::kd_rows_forward: unknown loss id");
  check_same_device("snnkd_fast::kd_rows_forward", student, {&teacher});
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t T = student.size(0), B = student.size(1), C = student.size(2);
  auto acc_options = student.options().dtype(acc_dtype(student, teacher));
  at::Tensor rows = at::empty({T, B}, acc_options);
  at::Tensor stats = at::empty({T, B, kNumStats}, acc_options);
  const int64_t teacher_rows = per_t ? T : 1;
  at::Tensor keys = at::empty({loss == kHTA ? teacher_rows : 0, B, kHtaNum}, student.options().dtype(at::kInt));
  at::Tensor grad = student_grad ? at::empty({T, B, C}, student.options()) : at::Tensor();
  if (rows.numel() == 0) return {rows, stats, keys, grad};
  const char* op = "snnkd_fast::kd_rows_forward";
  const int64_t grid = row_blocks(op, T * B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_forward_cuda", [&] {
    const s_t* s_ptr = student.data_ptr<s_t>();
    const u_t* u_ptr = teacher.data_ptr<u_t>();
    with_loss_kind(loss, [&](auto loss_c) {
      constexpr int LOSS = decltype(loss_c)::value;
      if constexpr (LOSS == kHTA) {
        launch_hta_head(u_ptr, us, teacher_rows * B, B, C, 1.0 / temperature, head_threshold,
                        keys.data_ptr<int32_t>(), student, stream);
      }
      constexpr int kVec = kd_forward_pack<s_t, u_t>();
      const bool packed =
          !packing_disabled() && kd_rows_packable(kVec, s_ptr, sizeof(s_t), ss, u_ptr, sizeof(u_t), us, C);
      const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
      const acc_t inv_tau_h = static_cast<acc_t>(1.0 / entropy_temperature);
      const acc_t tau_sq = static_cast<acc_t>(temperature * temperature);
      const int32_t* hta_keys = LOSS == kHTA ? keys.data_ptr<int32_t>() : nullptr;
      // The gradient-forming forward takes the plain one's arguments and three more.
      const auto launch = [&](auto kernel, auto... grad_args) {
        kernel<<<grid, kThreads, 0, stream>>>(s_ptr, ss, u_ptr, us, per_t, B, C, inv_tau, inv_tau_h, tau_sq,
                                              static_cast<acc_t>(entropy_weight), hta_keys, rows.data_ptr<acc_t>(),
                                              stats.data_ptr<acc_t>(), grad_args...);
      };
      if (student_grad) {
        launch(packed ? kd_forward_student_grad_kernel<s_t, u_t, LOSS, kVec>
                      : kd_forward_student_grad_kernel<s_t, u_t, LOSS, 1>,
               static_cast<acc_t>(temperature), static_cast<acc_t>(row_weight), grad.data_ptr<s_t>());
      } else {
        launch(packed ? kd_forward_kernel<s_t, u_t, LOSS, kVec> : kd_forward_kernel<s_t, u_t, LOSS, 1>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {rows, stats, keys, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_cuda(const at::Tensor& student,
                                                                    const at::Tensor& teacher, int64_t loss,
                                                                    double temperature, double entropy_temperature,
                                                                    double entropy_weight, double head_threshold) {
  auto [rows, stats, keys, grad] = kd_rows_forward_impl(student, teacher, loss, temperature, entropy_temperature,
                                                        entropy_weight, head_threshold, false, 0.0);
  return {rows, stats, keys};
}

// kd_ops.h's CudaStudentGrad::forward: the eager autograd kernel's forward that also forms the
// student's gradient (kd_autograd.cpp), as kd_rows_forward_student_grad_cpu on the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_student_grad_cuda(
    const at::Tensor& student, const at::Tensor& teacher, int64_t loss, double temperature,
    double entropy_temperature, double entropy_weight, double head_threshold, double row_weight) {
  RECORD_FUNCTION("snnkd_fast::kd_rows_forward_student_grad", std::vector<c10::IValue>({student, teacher}));
  return kd_rows_forward_impl(student, teacher, loss, temperature, entropy_temperature, entropy_weight,
                              head_threshold, true, row_weight);
}

// kd_ops.h's CudaStudentGrad::scale_unless_one: grad *= scale (one element, on grad's device) unless
// it is 1, decided on the device (scale_unless_one_kernel).
void scale_unless_one_cuda(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.is_contiguous() && scale.numel() == 1 && scale.device() == grad.device() &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble),
              "snnkd_fast: scale_unless_one needs a contiguous gradient and a float or double scale on its device");
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // enough blocks to scale at bandwidth when it must (a grid-stride loop), few to return from when not
  const int64_t blocks = std::min<int64_t>((grad.numel() + kThreads - 1) / kThreads, 1024);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "snnkd_scale_unless_one", [&] {
    using g_t = scalar_t;
    g_t* g = grad.data_ptr<g_t>();
    if (scale.scalar_type() == at::kDouble) {
      scale_unless_one_kernel<g_t, double><<<blocks, kThreads, 0, stream>>>(g, grad.numel(), scale.data_ptr<double>());
    } else {
      scale_unless_one_kernel<g_t, float><<<blocks, kThreads, 0, stream>>>(g, grad.numel(), scale.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> kd_rows_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& stats,
                                                         const at::Tensor& keys, int64_t loss, double temperature,
                                                         double entropy_temperature, double entropy_weight,
                                                         bool teacher_grad) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::kd_rows_backward");
  const Strides ss = L.s, us = L.u;
  const bool per_t = L.teacher_per_t;
  TORCH_CHECK(loss >= kKL && loss <= kHTA, "snnkd_fast::kd_rows_backward: unknown loss id");
  const int64_t T = student.size(0), B = student.size(1), C = student.size(2);
  TORCH_CHECK(grad_rows.is_contiguous() && grad_rows.numel() == T * B && stats.is_contiguous() &&
                  stats.numel() == T * B * kNumStats && grad_rows.scalar_type() == stats.scalar_type(),
              "snnkd_fast::kd_rows_backward: grad_rows [T, B] and stats [T, B, 5] must be contiguous, one dtype");
  check_same_device("snnkd_fast::kd_rows_backward", student, {&teacher, &grad_rows, &stats});
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty(teacher.sizes(), teacher.options())
                                         : at::empty({0}, teacher.options());
  if (grad_student.numel() == 0) {
    grad_teacher.zero_();
    return {grad_student, grad_teacher};
  }
  const char* op = "snnkd_fast::kd_rows_backward";
  // The kernels compute in the inputs' accumulation dtype (the forward's stats dtype); statistics in
  // another dtype (a direct call) are converted rather than refused, as the CPU op accepts them.
  const auto acc = acc_dtype(student, teacher);
  const at::Tensor g_rows = grad_rows.scalar_type() == acc ? grad_rows : grad_rows.to(acc);
  const at::Tensor row_stats = stats.scalar_type() == acc ? stats : stats.to(acc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_backward_cuda", [&] {
    with_loss_kind(loss, [&](auto loss_c) {
      constexpr int LOSS = decltype(loss_c)::value;
      constexpr int kVec = kd_rows_pack<s_t, u_t>();
      const bool packed = !packing_disabled() && kd_rows_packable(kVec, student.data_ptr(), sizeof(s_t), ss,
                                                                  teacher.data_ptr(), sizeof(u_t), us, C);
      const auto kernel = packed ? kd_backward_kernel<s_t, u_t, LOSS, kVec> : kd_backward_kernel<s_t, u_t, LOSS, 1>;
      kernel<<<element_blocks(op, B * C / (packed ? kVec : 1)), kThreads, 0, stream>>>(
          g_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C,
          row_stats.data_ptr<acc_t>(), static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(temperature),
          static_cast<acc_t>(1.0 / entropy_temperature), static_cast<acc_t>(entropy_weight),
          grad_student.data_ptr<s_t>(), teacher_grad ? grad_teacher.data_ptr<u_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_student, grad_teacher};
}

// SNNKD_CUDA_KD_NO_FORWARD_GRAD=1 (read once per process): the CUDA forward forms no student gradient
// and the backward runs the row kernel, as before the precomputed gradient -- for an A/B of the two in
// one build (the benchmarks' and the breakdown's `--variant`).
const bool kStudentGradRegistered = [] {
  if (env_flag("SNNKD_CUDA_KD_NO_FORWARD_GRAD")) return false;
  CudaStudentGrad& kernels = cuda_student_grad();
  kernels.forward = &kd_rows_forward_student_grad_cuda;
  kernels.scale_unless_one = &scale_unless_one_cuda;
  return true;
}();

}  // namespace
}  // namespace cuda
}  // namespace kd
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CUDA, m) {
  m.impl("kd_rows_forward", &snnkd::kd::cuda::kd_rows_forward_cuda);
  m.impl("kd_rows_backward", &snnkd::kd::cuda::kd_rows_backward_cuda);
}
