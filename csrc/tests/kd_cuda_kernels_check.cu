// Instantiates every CUDA KD-loss kernel (csrc/kd/kd_cuda_kernels.cuh) for every pair of student and
// teacher types without torch headers, so that tests/test_cuda_build.py can check that the device
// code compiles (for sm_80 and sm_90) on a machine with nvcc and no GPU. The extension instantiates
// the same templates with c10::Half / c10::BFloat16 in place of __half / __nv_bfloat16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kd/kd_cuda_kernels.cuh"

namespace snnkd {
namespace kd {
namespace cuda {

// The row kernels at one class per access and at the pack kd_cuda.cu launches where the rows allow.
// The forward's pack is 1 for double, and an explicit instantiation cannot name one specialization
// twice: its packed kernel is instantiated by taking its address.
template <typename s_t, typename u_t, int LOSS>
const void* packed_forward_kernel() {
  return reinterpret_cast<const void*>(&kd_forward_kernel<s_t, u_t, LOSS, kd_forward_pack<s_t, u_t>()>);
}
// The forward that also writes the student's gradient, at both class counts per access alike.
template <typename s_t, typename u_t, int LOSS>
const void* student_grad_forward_kernels() {
  static const void* kernels[] = {
      reinterpret_cast<const void*>(&kd_forward_student_grad_kernel<s_t, u_t, LOSS, 1>),
      reinterpret_cast<const void*>(&kd_forward_student_grad_kernel<s_t, u_t, LOSS, kd_forward_pack<s_t, u_t>()>)};
  return kernels;
}

#define SNNKD_KD_INSTANTIATE_LOSS(s_t, u_t, LOSS)                                                               \
  SNNKD_KD_INSTANTIATE_FORWARD(s_t, u_t, LOSS, 1)                                                               \
  template const void* packed_forward_kernel<s_t, u_t, LOSS>();                                                 \
  template const void* student_grad_forward_kernels<s_t, u_t, LOSS>();                                          \
  SNNKD_KD_INSTANTIATE_BACKWARD(s_t, u_t, LOSS, 1)                                                              \
  SNNKD_KD_INSTANTIATE_BACKWARD(s_t, u_t, LOSS, (kd_rows_pack<s_t, u_t>()))

#define SNNKD_KD_INSTANTIATE_FORWARD(s_t, u_t, LOSS, VEC)                                                       \
  template __global__ void kd_forward_kernel<s_t, u_t, LOSS, VEC>(                                              \
      const s_t*, Strides, const u_t*, Strides, bool, int64_t, int64_t, acc_type_t<s_t, u_t>,                  \
      acc_type_t<s_t, u_t>, acc_type_t<s_t, u_t>, acc_type_t<s_t, u_t>, const int32_t*, acc_type_t<s_t, u_t>*,  \
      acc_type_t<s_t, u_t>*);
#define SNNKD_KD_INSTANTIATE_BACKWARD(s_t, u_t, LOSS, VEC)                                                      \
  template __global__ void kd_backward_kernel<s_t, u_t, LOSS, VEC>(                                             \
      const acc_type_t<s_t, u_t>*, const s_t*, Strides, const u_t*, Strides, bool, int64_t, int64_t, int64_t,   \
      const acc_type_t<s_t, u_t>*, acc_type_t<s_t, u_t>, acc_type_t<s_t, u_t>, acc_type_t<s_t, u_t>,            \
      acc_type_t<s_t, u_t>, s_t*, u_t*);

#define SNNKD_KD_INSTANTIATE_PAIR(s_t, u_t)                                                                     \
  SNNKD_KD_INSTANTIATE_LOSS(s_t, u_t, kKL)                                                                      \
  SNNKD_KD_INSTANTIATE_LOSS(s_t, u_t, kTSER)                                                                    \
  SNNKD_KD_INSTANTIATE_LOSS(s_t, u_t, kHTA)                                                                     \
  template __global__ void nld_forward_kernel<s_t, u_t>(const s_t*, Strides, const u_t*, Strides, int64_t,      \
                                                        int64_t, const int64_t*, NldParams<acc_type_t<s_t, u_t>>, \
                                                        acc_type_t<s_t, u_t>, acc_type_t<s_t, u_t>*,            \
                                                        acc_type_t<s_t, u_t>*);                                 \
  template __global__ void nld_forward_student_grad_kernel<s_t, u_t>(                                           \
      const s_t*, Strides, const u_t*, Strides, int64_t, int64_t, const int64_t*, NldParams<acc_type_t<s_t, u_t>>, \
      acc_type_t<s_t, u_t>, acc_type_t<s_t, u_t>*, acc_type_t<s_t, u_t>*, acc_type_t<s_t, u_t>, s_t*);          \
  template __global__ void nld_row_sums_kernel<s_t, u_t>(const s_t*, Strides, const u_t*, Strides, int64_t,     \
                                                         int64_t, const int64_t*,                               \
                                                         NldParams<acc_type_t<s_t, u_t>>,                       \
                                                         const acc_type_t<s_t, u_t>*, acc_type_t<s_t, u_t>*);   \
  template __global__ void nld_backward_kernel<s_t, u_t>(                                                       \
      const acc_type_t<s_t, u_t>*, const s_t*, Strides, const u_t*, Strides, bool, int64_t, int64_t, int64_t,   \
      const int64_t*, NldParams<acc_type_t<s_t, u_t>>, const acc_type_t<s_t, u_t>*, const acc_type_t<s_t, u_t>*, \
      s_t*, u_t*);

#define SNNKD_KD_INSTANTIATE_STUDENT(s_t)                                                                       \
  SNNKD_KD_INSTANTIATE_PAIR(s_t, float)                                                                         \
  SNNKD_KD_INSTANTIATE_PAIR(s_t, double)                                                                        \
  SNNKD_KD_INSTANTIATE_PAIR(s_t, __half)                                                                        \
  SNNKD_KD_INSTANTIATE_PAIR(s_t, __nv_bfloat16)                                                                 \
  template __global__ void hta_teacher_kernel<s_t, kThreads>(const s_t*, Strides, int64_t, int64_t, double,    \
                                                             double, int32_t*);                                \
  template __global__ void hta_teacher_kernel<s_t, kHtaWideThreads>(const s_t*, Strides, int64_t, int64_t,      \
                                                                    double, double, int32_t*);                 \
  template __global__ void hta_split_pass1_kernel<s_t, kThreads>(const s_t*, Strides, int64_t, int64_t,         \
                                                                 HtaSplit, double, HtaPass1*);                 \
  template __global__ void hta_split_search_kernel<s_t, kThreads>(const s_t*, Strides, int64_t, int64_t,        \
                                                                  HtaSplit, double, double, int,               \
                                                                  const HtaPass1*, HtaSearch*,                 \
                                                                  SumN<double, kHtaCandidates>*);              \
  template __global__ void hta_split_tied_kernel<s_t, kThreads>(const s_t*, Strides, int64_t, int64_t,          \
                                                                HtaSplit, double, double, int, HtaSearch*,     \
                                                                const SumN<double, kHtaCandidates>*,           \
                                                                TiedClasses*);                                 \
  template __global__ void hta_split_finish_kernel<s_t, kThreads>(const s_t*, Strides, int64_t, int64_t,        \
                                                                  HtaSplit, double, double, int,               \
                                                                  const HtaSearch*, const TiedClasses*,        \
                                                                  int32_t*);

SNNKD_KD_INSTANTIATE_STUDENT(float)
SNNKD_KD_INSTANTIATE_STUDENT(double)
SNNKD_KD_INSTANTIATE_STUDENT(__half)
SNNKD_KD_INSTANTIATE_STUDENT(__nv_bfloat16)
template __global__ void nld_noise_kernel<float>(const int64_t*, float*, int64_t, int64_t);
#define SNNKD_KD_INSTANTIATE_SCALE(g_t)                                                                         \
  template __global__ void scale_unless_one_kernel<g_t, float>(g_t*, int64_t, const float*);                   \
  template __global__ void scale_unless_one_kernel<g_t, double>(g_t*, int64_t, const double*);
SNNKD_KD_INSTANTIATE_SCALE(float)
SNNKD_KD_INSTANTIATE_SCALE(double)
SNNKD_KD_INSTANTIATE_SCALE(__half)
SNNKD_KD_INSTANTIATE_SCALE(__nv_bfloat16)

}  // namespace cuda
}  // namespace kd
}  // namespace snnkd
