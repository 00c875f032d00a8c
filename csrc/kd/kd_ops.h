// Host-side helpers shared by the KD-loss launchers (kd_cpu.cpp, nld_cpu.cpp, kd_cuda.cu,
// nld_cuda.cu): the row layout of student and teacher, the accumulation dtype and the
// student/teacher dtype dispatch.
// Arguments are validated in Python (snnkd_fast/losses.py); the checks here keep a direct torch.ops
// call from reading out of bounds.
#pragma once

#include <ATen/Dispatch.h>
#include <torch/types.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "kd_math.h"

namespace snnkd {
namespace kd {

// A [T, B, C] student and a [B, C] (broadcast over t: stride 0) or [T, B, C] teacher, read in place.
struct RowLayout {
  int64_t T, B, C;
  Strides s, u;
  bool teacher_per_t;
};

inline RowLayout row_layout(const at::Tensor& student, const at::Tensor& teacher, const char* op) {
  TORCH_CHECK(student.dim() == 3, op, ": student must be [T, B, C]");
  TORCH_CHECK(teacher.dim() == 2 || teacher.dim() == 3, op, ": teacher must be [B, C] or [T, B, C]");
  TORCH_CHECK(teacher.size(-1) == student.size(2) && teacher.size(-2) == student.size(1) &&
                  (teacher.dim() == 2 || teacher.size(0) == student.size(0)),
              op, ": teacher and student shapes do not match");
  TORCH_CHECK(teacher.device() == student.device(), op, ": student and teacher must be on one device");
  const bool per_t = teacher.dim() == 3;
  return {student.size(0), student.size(1), student.size(2),
          Strides{student.stride(0), student.stride(1), student.stride(2)},
          Strides{per_t ? teacher.stride(0) : 0, teacher.stride(-2), teacher.stride(-1)}, per_t};
}

// float64 if either input is float64, else float32 (half types are computed in float32).
inline at::ScalarType acc_dtype(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether the CPU forward can form the student's gradient from its own exps: where the row kernel runs
// (HTA; KL and TSER at C = 32 or C >= 48, elsewhere the lane-rows kernels), a student in the
// accumulation dtype, TSER only at tau_H = tau. csrc/kd/kd_cpu.cpp.
bool kd_cpu_forms_student_grad(const at::Tensor& student, const at::Tensor& teacher, int64_t loss,
                               double temperature, double entropy_temperature);

// kd_rows_forward on the CPU that also returns the student's gradient at grad_rows = row_weight
// ([T, B, C], contiguous; d rows[t, b] / d student[t, b, :] row by row), formed from the forward's
// own exps while each row is in cache: the eager autograd kernel's (kd_autograd.cpp) precomputed
// gradient, which its backward completes (row_weight: 1 / the reduction's divisor, so that the
// gradient is final when the loss's is 1). Undefined unless kd_cpu_forms_student_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_student_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher, int64_t loss, double temperature,
    double entropy_temperature, double entropy_weight, double head_threshold, double row_weight);

// NLD's twins of the two above (csrc/kd/nld_cpu.cpp): a student in the accumulation dtype.
bool nld_cpu_forms_student_grad(const at::Tensor& student, const at::Tensor& teacher);
std::tuple<at::Tensor, at::Tensor, at::Tensor> nld_rows_forward_student_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& seed, double temperature,
    double noise_weight, double noise_std, bool adaptive, bool additive, double row_weight);

// The CUDA forwards that also form the student's gradient (any dtypes, any loss of the family, NLD in
// any mode; a gradient in the student's dtype) and the backward's completion of it, set by kd_cuda.cu
// and nld_cuda.cu where the extension is built with CUDA: kd_autograd.cpp, compiled in every build,
// reaches them through this table (null members: a CPU build, or SNNKD_CUDA_KD_NO_FORWARD_GRAD=1).
struct CudaStudentGrad {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*forward)(const at::Tensor& student,
                                                                        const at::Tensor& teacher, int64_t loss,
                                                                        double temperature,
                                                                        double entropy_temperature,
                                                                        double entropy_weight, double head_threshold,
                                                                        double row_weight) = nullptr;
  // grad *= scale (one element on grad's device) unless it is 1, decided on the device
  void (*scale_unless_one)(at::Tensor& grad, const at::Tensor& scale) = nullptr;
  // NLD's forward that also forms the student's gradient (nld_cuda.cu; any dtypes and modes)
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*nld_forward)(const at::Tensor& student, const at::Tensor& teacher,
                                                                const at::Tensor& seed, double temperature,
                                                                double noise_weight, double noise_std, bool adaptive,
                                                                bool additive, double row_weight) = nullptr;
};
CudaStudentGrad& cuda_student_grad();

}  // namespace kd
}  // namespace snnkd

// Runs the variadic body with s_t and u_t set to the student's and teacher's element types and acc_t
// to their accumulation type (acc_type_t).
#define SNNKD_KD_DISPATCH_PAIR(student, teacher, NAME, ...)                                             \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (student).scalar_type(), NAME, [&] {         \
    using s_t = scalar_t;                                                                               \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (teacher).scalar_type(), NAME, [&] {       \
      using u_t = scalar_t;                                                                             \
      using acc_t = snnkd::kd::acc_type_t<s_t, u_t>;                                                    \
      __VA_ARGS__();                                                                                    \
    });                                                                                                 \
  })
