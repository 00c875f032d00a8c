// exp for the kernels' inner loops. On the device: CUDA's expf/exp. On the host, std::exp is an
// opaque libm call that stops the compiler from vectorizing a loop, so float uses a branch-free
// Cephes-style expf the compiler does vectorize (range reduction by ln 2, degree-6 polynomial,
// exponent by bit arithmetic; max error ~2 ulp, the same class as CUDA's expf). Exact cases:
// fast_exp(-inf) = 0, NaN stays NaN; arguments above ~88 saturate (the kernels only pass x <= 0
// or surrogate arguments). double keeps std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "hd.h"

namespace snnkd {

SNNKD_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float clamped = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // n = round(x / ln2) with the 1.5 * 2^23 trick (round to nearest, no call; needs -ffp-contract=off)
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float e_r = (poly * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float result = x < -87.3f ? 0.0f : e_r * scale;
  return x != x ? x : result;  // NaN stays NaN
#endif
}

SNNKD_HD double fast_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

}  // namespace snnkd
