// Instantiates every CUDA neuron kernel for every input type without torch headers, so that
// tests/test_cuda_build.py can check in seconds that the device code compiles (for sm_80 and sm_90)
// on a machine with nvcc and no GPU. The CMake build compiles the real extension file too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lif/lif_cuda_kernels.cuh"

namespace snnkd {
namespace lif {

#define SNNKD_INSTANTIATE_FORWARD(scalar_t, acc_t, VEC, MODE)                                                 \
  template __global__ void forward_kernel<scalar_t, acc_t, VEC, ForwardMode::MODE>(                            \
      const scalar_t*, const acc_t*, bool, const acc_t*, scalar_t*, acc_t*, acc_t*, int64_t, int64_t,            \
      NeuronParams<acc_t>);
#define SNNKD_INSTANTIATE_FROM_X(scalar_t, acc_t)                                                               \
  template __global__ void backward_from_x_kernel<scalar_t, acc_t, false>(                                     \
      const scalar_t*, const acc_t*, const scalar_t*, const acc_t*, bool, const acc_t*, scalar_t*, acc_t*,       \
      acc_t*, int, int64_t, NeuronParams<acc_t>);                                                               \
  template __global__ void backward_from_x_kernel<scalar_t, acc_t, true>(                               \
      const scalar_t*, const acc_t*, const scalar_t*, const acc_t*, bool, const acc_t*, scalar_t*, acc_t*,       \
      acc_t*, int, int64_t, NeuronParams<acc_t>);
#define SNNKD_INSTANTIATE(scalar_t, acc_t, VEC)                                                                \
  SNNKD_INSTANTIATE_FORWARD(scalar_t, acc_t, VEC, kSaveH)                                                       \
  SNNKD_INSTANTIATE_FORWARD(scalar_t, acc_t, VEC, kRate)                                                        \
  SNNKD_INSTANTIATE_FORWARD(scalar_t, acc_t, VEC, kLean)                                                        \
  SNNKD_INSTANTIATE_FORWARD(scalar_t, acc_t, VEC, kRecharge)                                                    \
  template __global__ void backward_kernel<scalar_t, acc_t, VEC, false>(                                        \
      const scalar_t*, const acc_t*, const acc_t*, const acc_t*, bool, const acc_t*, scalar_t*, acc_t*, acc_t*, \
      int64_t, int64_t, NeuronParams<acc_t>);                                                                   \
  template __global__ void backward_kernel<scalar_t, acc_t, VEC, true>(                                         \
      const scalar_t*, const acc_t*, const acc_t*, const acc_t*, bool, const acc_t*, scalar_t*, acc_t*, acc_t*, \
      int64_t, int64_t, NeuronParams<acc_t>);

SNNKD_INSTANTIATE(float, float, 1)
SNNKD_INSTANTIATE(float, float, 4)
SNNKD_INSTANTIATE(double, double, 1)
SNNKD_INSTANTIATE(double, double, 4)
SNNKD_INSTANTIATE(__half, float, 1)
SNNKD_INSTANTIATE(__half, float, 4)
SNNKD_INSTANTIATE(__nv_bfloat16, float, 1)
SNNKD_INSTANTIATE(__nv_bfloat16, float, 4)

// The lean pair's backward (H staged in shared memory).
SNNKD_INSTANTIATE_FROM_X(float, float)
SNNKD_INSTANTIATE_FROM_X(double, double)
SNNKD_INSTANTIATE_FROM_X(__half, float)
SNNKD_INSTANTIATE_FROM_X(__nv_bfloat16, float)

}  // namespace lif
}  // namespace snnkd
