// Launchers of the CUDA KD-loss kernels (csrc/kd/kd_cuda_kernels.cuh) and their registration. Same
// argument checks, output shapes, dtypes and empty-input handling as the CPU ops (kd_cpu.cpp,
// nld_cpu.cpp), plus a same-device check; nothing synchronises with the host (the NLD seed is read
// by the kernels).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "kd_cuda_kernels.cuh"
#include "kd_ops.h"

namespace snnkd {
namespace kd {
namespace cuda {
namespace {

constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();

void check_same_device(const char* op, const at::Tensor& student, std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(student.is_cuda(), op, ": student must be a CUDA tensor");
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->device() == student.device(), op, ": every tensor must be on ", student.device(), ", got one on ",
                t->device());
  }
}

int64_t row_blocks(const char* op, int64_t rows) {
  TORCH_CHECK(rows <= kMaxGrid, op, ": too many rows (", rows, ") for one launch");
  return rows;
}

int64_t element_blocks(const char* op, int64_t elements) {
  const int64_t blocks = (elements + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= kMaxGrid, op, ": too many elements (", elements, ") for one launch");
  return blocks;
}


// Calls f(std::integral_constant<int, LOSS>{}) for a runtime loss id.
template <typename F>
void dispatch_loss(int64_t loss, F&& f) {
  switch (loss) {
    case kKL: f(std::integral_constant<int, kKL>{}); break;
    case kTSER: f(std::integral_constant<int, kTSER>{}); break;
    case kHTA: f(std::integral_constant<int, kHTA>{}); break;
    default: TORCH_CHECK(false, "snnkd_fast::kd_rows: unknown loss id ", loss);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_cuda(const at::Tensor& student,
                                                                    const at::Tensor& teacher, int64_t loss,
                                                                    double temperature, double entropy_temperature,
                                                                    double entropy_weight, double head_threshold) {
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
  if (rows.numel() == 0) return {rows, stats, keys};
  const char* op = "snnkd_fast::kd_rows_forward";
  const int64_t grid = row_blocks(op, T * B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_forward_cuda", [&] {
    const s_t* s_ptr = student.data_ptr<s_t>();
    const u_t* u_ptr = teacher.data_ptr<u_t>();
    dispatch_loss(loss, [&](auto loss_c) {
      constexpr int LOSS = decltype(loss_c)::value;
      if constexpr (LOSS == kHTA) {
        hta_teacher_kernel<u_t><<<row_blocks(op, teacher_rows * B), kThreads, 0, stream>>>(
            u_ptr, us, B, C, 1.0 / temperature, head_threshold, keys.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      kd_forward_kernel<s_t, u_t, LOSS><<<grid, kThreads, 0, stream>>>(
          s_ptr, ss, u_ptr, us, per_t, B, C, static_cast<acc_t>(1.0 / temperature),
          static_cast<acc_t>(1.0 / entropy_temperature), static_cast<acc_t>(temperature * temperature),
          static_cast<acc_t>(entropy_weight), LOSS == kHTA ? keys.data_ptr<int32_t>() : nullptr,
          rows.data_ptr<acc_t>(), stats.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {rows, stats, keys};
}

std::tuple<at::Tensor, at::Tensor> kd_rows_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& stats,
                                                         const at::Tensor& keys, int64_t loss, double temperature,
                                                         double entropy_temperature, double entropy_weight,
                                                         bool teacher_grad) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::kd_rows_backward");
  const Strides ss = L.s, us = L.u;
  const bool per_t = L.teacher_per_t;
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
  const int64_t grid = element_blocks(op, B * C);
  // The kernels compute in the inputs' accumulation dtype (the forward's stats dtype); statistics in
  // another dtype (a direct call) are converted rather than refused, as the CPU op accepts them.
  const auto acc = acc_dtype(student, teacher);
  const at::Tensor g_rows = grad_rows.scalar_type() == acc ? grad_rows : grad_rows.to(acc);
  const at::Tensor row_stats = stats.scalar_type() == acc ? stats : stats.to(acc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_backward_cuda", [&] {
    dispatch_loss(loss, [&](auto loss_c) {
      constexpr int LOSS = decltype(loss_c)::value;
      kd_backward_kernel<s_t, u_t, LOSS><<<grid, kThreads, 0, stream>>>(
          g_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C,
          row_stats.data_ptr<acc_t>(), static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(temperature),
          static_cast<acc_t>(1.0 / entropy_temperature), static_cast<acc_t>(entropy_weight),
          grad_student.data_ptr<s_t>(), teacher_grad ? grad_teacher.data_ptr<u_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_student, grad_teacher};
}

// nld_cpu.cpp's read_seed() check (one int64), without reading it on the host.
const int64_t* checked_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "snnkd_fast::nld: seed must be one int64");
  return seed.data_ptr<int64_t>();
}

std::tuple<at::Tensor, at::Tensor> nld_rows_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                         const at::Tensor& seed, double temperature,
                                                         double noise_weight, double noise_std, bool adaptive,
                                                         bool additive) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::nld_rows_forward");
  const Strides ss = L.s, us = L.u;
  const bool per_t = L.teacher_per_t;
  check_same_device("snnkd_fast::nld_rows_forward", student, {&teacher, &seed});
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t T = student.size(0), B = student.size(1), C = student.size(2);
  const auto acc = acc_dtype(student, teacher);
  at::Tensor rows = at::empty({T, B}, student.options().dtype(acc));
  at::Tensor stats = at::empty({T, B, kNldStats}, student.options().dtype(acc));
  if (rows.numel() == 0) return {rows, stats};
  const int64_t* seed_data = checked_seed(seed);
  const int64_t grid = row_blocks("snnkd_fast::nld_rows_forward", T * B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_nld_forward_cuda", [&] {
    const auto P = make_nld_params<acc_t>(temperature, noise_weight, noise_std, adaptive, additive);
    nld_forward_kernel<s_t, u_t><<<grid, kThreads, 0, stream>>>(
        student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, B, C, seed_data, P,
        static_cast<acc_t>(temperature * temperature), rows.data_ptr<acc_t>(), stats.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, stats};
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

}  // namespace
}  // namespace cuda
}  // namespace kd
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CUDA, m) {
  m.impl("kd_rows_forward", &snnkd::kd::cuda::kd_rows_forward_cuda);
  m.impl("kd_rows_backward", &snnkd::kd::cuda::kd_rows_backward_cuda);
  m.impl("nld_rows_forward", &snnkd::kd::cuda::nld_rows_forward_cuda);
  m.impl("nld_rows_backward", &snnkd::kd::cuda::nld_rows_backward_cuda);
  m.impl("nld_noise", &snnkd::kd::cuda::nld_noise_cuda);
}
