// Launchers of the CUDA kernels of CKDSNN's noise-smoothed logits distillation (NLD;
// csrc/kd/kd_cuda_kernels.cuh) and of the noise itself, and their registration. Same argument
// checks, output shapes, dtypes and empty-input handling as the CPU ops (nld_cpu.cpp), plus a
// same-device check; nothing synchronises with the host (the seed is read by the kernels).
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "kd_cuda_kernels.cuh"
#include "kd_cuda_launch.h"
#include "kd_ops.h"

namespace snnkd {
namespace kd {
namespace cuda {
namespace {

// nld_cpu.cpp's read_seed() check (one int64), without reading it on the host.
const int64_t* checked_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "snnkd_fast::nld: seed must be one int64");
  return seed.data_ptr<int64_t>();
}

// nld_rows_forward, and with student_grad the student's gradient [T, B, C] (contiguous) at a row
// gradient of row_weight (nld_forward_student_grad_kernel; else undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> nld_rows_forward_impl(const at::Tensor& student,
                                                                     const at::Tensor& teacher, const at::Tensor& seed,
                                                                     double temperature, double noise_weight,
                                                                     double noise_std, bool adaptive, bool additive,
                                                                     bool student_grad, double row_weight) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::nld_rows_forward");
  const Strides ss = L.s, us = L.u;  // a [B, C] teacher has a t stride of 0: the kernel needs no flag
  check_same_device("snnkd_fast::nld_rows_forward", student, {&teacher, &seed});
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t T = student.size(0), B = student.size(1), C = student.size(2);
  const auto acc = acc_dtype(student, teacher);
  at::Tensor rows = at::empty({T, B}, student.options().dtype(acc));
  at::Tensor stats = at::empty({T, B, kNldStats}, student.options().dtype(acc));
  at::Tensor grad = student_grad ? at::empty({T, B, C}, student.options()) : at::Tensor();
  if (rows.numel() == 0) return {rows, stats, grad};
  const int64_t* seed_data = checked_seed(seed);
  const int64_t grid = row_blocks("snnkd_fast::nld_rows_forward", T * B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_nld_forward_cuda", [&] {
    const auto P = make_nld_params<acc_t>(temperature, noise_weight, noise_std, adaptive, additive);
    const acc_t tau_sq = static_cast<acc_t>(temperature * temperature);
    // The gradient-forming forward takes the plain one's arguments and two more.
    const auto launch = [&](auto kernel, auto... grad_args) {
      kernel<<<grid, kThreads, 0, stream>>>(student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, B, C, seed_data,
                                            P, tau_sq, rows.data_ptr<acc_t>(), stats.data_ptr<acc_t>(), grad_args...);
    };
    if (student_grad) {
      launch(nld_forward_student_grad_kernel<s_t, u_t>, static_cast<acc_t>(row_weight), grad.data_ptr<s_t>());
    } else {
      launch(nld_forward_kernel<s_t, u_t>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, stats, grad};
}

std::tuple<at::Tensor, at::Tensor> nld_rows_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                         const at::Tensor& seed, double temperature,
                                                         double noise_weight, double noise_std, bool adaptive,
                                                         bool additive) {
  auto [rows, stats, grad] = nld_rows_forward_impl(student, teacher, seed, temperature, noise_weight, noise_std,
                                                   adaptive, additive, false, 0.0);
  return {rows, stats};
}

// kd_ops.h's CudaStudentGrad::nld_forward: the eager autograd kernel's NLD forward that also forms the
// student's gradient (kd_autograd.cpp), as nld_rows_forward_student_grad_cpu on the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nld_rows_forward_student_grad_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& seed, double temperature,
    double noise_weight, double noise_std, bool adaptive, bool additive, double row_weight) {
  RECORD_FUNCTION("snnkd_fast::nld_rows_forward_student_grad", std::vector<c10::IValue>({student, teacher}));
  return nld_rows_forward_impl(student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive,
                               true, row_weight);
}

std::tuple<at::Tensor, at::Tensor> nld_rows_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& student,
                                                          const at::Tensor& teacher, const at::Tensor& seed,
                                                          const at::Tensor& stats, double temperature,
                                                          double noise_weight, double noise_std, bool adaptive,
                                                          bool additive, bool teacher_grad) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::nld_rows_backward");
  const Strides ss = L.s, us = L.u;
  const bool per_t = L.teacher_per_t;
  const int64_t T = student.size(0), B = student.size(1), C = student.size(2);
  TORCH_CHECK(grad_rows.is_contiguous() && stats.is_contiguous() && grad_rows.numel() == T * B &&
                  stats.numel() == T * B * kNldStats && grad_rows.scalar_type() == stats.scalar_type(),
              "snnkd_fast::nld_rows_backward: grad_rows [T, B] and stats [T, B, 6] must be contiguous, one dtype");
  check_same_device("snnkd_fast::nld_rows_backward", student, {&teacher, &seed, &grad_rows, &stats});
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty(teacher.sizes(), teacher.options())
                                         : at::empty({0}, teacher.options());
  if (grad_student.numel() == 0) {
    grad_teacher.zero_();
    return {grad_student, grad_teacher};
  }
  const int64_t* seed_data = checked_seed(seed);
  const char* op = "snnkd_fast::nld_rows_backward";
  const int64_t row_grid = row_blocks(op, T * B);
  const int64_t grid = element_blocks(op, B * nld_quads(C));  // one thread per sample and quad of classes
  const auto acc = acc_dtype(student, teacher);
  const at::Tensor g_rows = grad_rows.scalar_type() == acc ? grad_rows : grad_rows.to(acc);
  const at::Tensor row_stats = stats.scalar_type() == acc ? stats : stats.to(acc);
  // The mixture's row sums (sum q A, sum r A, sum r A eps, sum r eps), [T, B, 4].
  at::Tensor sums = additive ? at::Tensor() : at::empty({T, B, kNldSums}, student.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_nld_backward_cuda", [&] {
    const auto P = make_nld_params<acc_t>(temperature, noise_weight, noise_std, adaptive, additive);
    if (!additive) {
      nld_row_sums_kernel<s_t, u_t><<<row_grid, kThreads, 0, stream>>>(
          student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, B, C, seed_data, P, row_stats.data_ptr<acc_t>(),
          sums.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    nld_backward_kernel<s_t, u_t><<<grid, kThreads, 0, stream>>>(
        g_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C, seed_data,
        P, row_stats.data_ptr<acc_t>(), additive ? nullptr : sums.data_ptr<acc_t>(), grad_student.data_ptr<s_t>(),
        teacher_grad ? grad_teacher.data_ptr<u_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_student, grad_teacher};
}

at::Tensor nld_noise_cuda(const at::Tensor& seed, at::IntArrayRef shape) {
  TORCH_CHECK(seed.is_cuda(), "snnkd_fast::nld_noise: seed must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty(shape, seed.options().dtype(at::kFloat));
  const int64_t* seed_data = checked_seed(seed);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 8192);  // grid-stride beyond
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = shape.empty() ? 1 : shape.back();  // a 0-d shape: one row of one class
  nld_noise_kernel<float><<<blocks, kThreads, 0, stream>>>(seed_data, out.data_ptr<float>(), n, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// As kd_cuda.cu's: SNNKD_CUDA_KD_NO_FORWARD_GRAD=1 leaves the row backward in place.
const bool kNldStudentGradRegistered = [] {
  if (env_flag("SNNKD_CUDA_KD_NO_FORWARD_GRAD")) return false;
  cuda_student_grad().nld_forward = &nld_rows_forward_student_grad_cuda;
  return true;
}();

}  // namespace
}  // namespace cuda
}  // namespace kd
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CUDA, m) {
  m.impl("nld_rows_forward", &snnkd::kd::cuda::nld_rows_forward_cuda);
  m.impl("nld_rows_backward", &snnkd::kd::cuda::nld_rows_backward_cuda);
  m.impl("nld_noise", &snnkd::kd::cuda::nld_noise_cuda);
}
