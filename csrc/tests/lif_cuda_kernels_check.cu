// Instantiates every CUDA neuron kernel for every input type without torch headers, so that
// tests/test_cuda_build.py can check in seconds that the device code compiles (for sm_80 and sm_90)
// on a machine with nvcc and no GPU. The CMake build compiles the real extension file too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lif/lif_cuda_kernels.cuh"

namespace snnkd {
namespace lif {

#define SNNKD_INSTANTIATE(scalar_t, acc_t, VEC)                                                                \
  template __global__ void forward_kernel<scalar_t, acc_t, VEC, false>(                                         \
      const scalar_t*, const acc_t*, const acc_t*, scalar_t*, acc_t*, acc_t*, int64_t, int64_t,                 \
      NeuronParams<acc_t>);                                                                                     \
  template __global__ void forward_kernel<scalar_t, acc_t, VEC, true>(                                          \
      const scalar_t*, const acc_t*, const acc_t*, scalar_t*, acc_t*, acc_t*, int64_t, int64_t,                 \
      NeuronParams<acc_t>);                                                                                     \
  template __global__ void backward_kernel<scalar_t, acc_t, VEC, false>(                                        \
      const scalar_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*, scalar_t*, acc_t*, acc_t*,       \
      int64_t, int64_t, NeuronParams<acc_t>);                                                                   \
  template __global__ void backward_kernel<scalar_t, acc_t, VEC, true>(                                         \
      const scalar_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*, scalar_t*, acc_t*, acc_t*,       \
      int64_t, int64_t, NeuronParams<acc_t>);

SNNKD_INSTANTIATE(float, float, 1)
SNNKD_INSTANTIATE(float, float, 4)
SNNKD_INSTANTIATE(double, double, 1)
SNNKD_INSTANTIATE(double, double, 4)
SNNKD_INSTANTIATE(__half, float, 1)
SNNKD_INSTANTIATE(__half, float, 4)
SNNKD_INSTANTIATE(__nv_bfloat16, float, 1)
SNNKD_INSTANTIATE(__nv_bfloat16, float, 4)

}  // namespace lif
}  // namespace snnkd
