// exp, log and cos for the kernels' inner loops. On the device: CUDA's own functions. On the host,
// libm calls are opaque and stop the compiler from vectorizing a loop, so float uses branch-free
// Cephes-style versions the compiler does vectorize (range reduction, short polynomial, exponent by
// bit arithmetic; max error ~2 ulp, the class of CUDA's expf/logf/cosf). double keeps libm.
// fast_exp: -inf -> 0, NaN stays NaN, arguments above ~88 saturate (the kernels pass x <= 0 or
// surrogate arguments). fast_log: 0 -> -inf, x < 0 or NaN -> NaN, +inf -> +inf.
// cos_2pi(u) = cos(2 pi u) and sin_2pi(u) = sin(2 pi u) for u in [0, 1] (the Box-Muller angle of the
// noise generator).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "hd.h"

namespace snnkd {

// a * b + c, rounded once where the CPU has FMA: the build's -ffp-contract=off keeps a plain a * b + c
// at two roundings (the neuron charge must round like torch's eager ops); these polynomials need
// no such thing, and one FMA is one instruction where a multiply and an add are two (x86 with FMA3,
// every AArch64 CPU).
template <typename T>
SNNKD_HD T fmadd(T a, T b, T c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  using std::fma;  // float stays float
  return fma(a, b, c);
#else
  return a * b + c;
#endif
}

SNNKD_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Only the top is clamped: below -87.3 the select at the end returns 0 whatever the steps between
  // computed (-inf's NaN included), so a clamp there bought nothing -- and GCC 12 compiled the two
  // clamps to four compares, two blends and two moves (it may use minps/maxps only under
  // -ffinite-math-only): the loop of exps 0.30 -> 0.27 ns per element with it gone, the same bits
  // (AVX-512, one thread). The clamp lets a NaN x through (it compares false), and every step below
  // keeps it NaN: no select for it at the end.
  const float clamped = x > 88.3f ? 88.3f : x;
  // n = round(x / ln2) with the 1.5 * 2^23 trick (round to nearest, no call): shifted holds n in its
  // low mantissa bits, which give the exponent below without a float -> int conversion
  const float shifted = fmadd(clamped, 1.44269504088896341f, 12582912.0f);
  const float n = shifted - 12582912.0f;
  // r = x - n ln2 in two parts (n * 0.693359375 is exact: the constant has 9 significant bits)
  const float r = fmadd(n, 2.12194440e-4f, fmadd(n, -0.693359375f, clamped));
  float poly = 1.9875691500e-4f;
  poly = fmadd(poly, r, 1.3981999507e-3f);
  poly = fmadd(poly, r, 8.3334519073e-3f);
  poly = fmadd(poly, r, 4.1665795894e-2f);
  poly = fmadd(poly, r, 1.6666665459e-1f);
  poly = fmadd(poly, r, 5.0000001201e-1f);
  const float e_r = fmadd(poly * r, r, r) + 1.0f;
  // 2^n: (n + 127) << 23, with n = bits(shifted) - bits(1.5 * 2^23) (n in [-126, 127] for the x the
  // select below keeps)
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : e_r * scale;  // -inf -> 0; NaN compares false, and e_r is NaN
#endif
}

SNNKD_HD double fast_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

SNNKD_HD float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  // x = m * 2^e with m in [sqrt(1/2), sqrt(2)): the mantissa with the exponent of 0.5, folded
  int32_t e = ((bits >> 23) & 0xff) - 126;
  const int32_t mant_bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mant_bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  m = small ? (m + m) - 1.0f : m - 1.0f;
  const float z = m * m;
  float poly = 7.0376836292e-2f;
  poly = fmadd(poly, m, -1.1514610310e-1f);
  poly = fmadd(poly, m, 1.1676998740e-1f);
  poly = fmadd(poly, m, -1.2420140846e-1f);
  poly = fmadd(poly, m, 1.4249322787e-1f);
  poly = fmadd(poly, m, -1.6668057665e-1f);
  poly = fmadd(poly, m, 2.0000714765e-1f);
  poly = fmadd(poly, m, -2.4999993993e-1f);
  poly = fmadd(poly, m, 3.3333331174e-1f);
  const float fe = static_cast<float>(e);
  float y = fmadd(-0.5f, z, fmadd(fe, -2.12194440e-4f, poly * m * z));
  y = fmadd(fe, 0.693359375f, m + y);
  // subnormal inputs are not reduced exactly (none reach here: the kernels log sums >= 1e-38)
  y = x == 0.0f ? -INFINITY : y;
  y = x < 0.0f ? NAN : y;
  y = x == INFINITY ? INFINITY : y;
  return x != x ? x : y;
#endif
}

SNNKD_HD double fast_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// The host's reduction for cos_2pi and sin_2pi: 2 pi u = pi/2 * q + pi/2 * f with the quadrant
// q = round(4u) and |f| <= 1/2, and cos/sin of the small angle pi/2 * f by Cephes' minimax
// polynomials on [-pi/4, pi/4].
struct QuarterTurns {
  float cos_a, sin_a;
  int32_t quadrant;  // q mod 4
};

SNNKD_HD QuarterTurns quarter_turns(float u) {
  const float q = (u * 4.0f + 12582912.0f) - 12582912.0f;  // round to nearest (needs -ffp-contract=off)
  const float a = (u * 4.0f - q) * 1.57079632679489662f;
  const float a2 = a * a;
  const float cos_poly = fmadd(fmadd(2.443315711809948e-5f, a2, -1.388731625493765e-3f), a2, 4.166664568298827e-2f);
  const float cos_a = fmadd(cos_poly * a2, a2, fmadd(-0.5f, a2, 1.0f));
  const float sin_poly = fmadd(fmadd(-1.9515295891e-4f, a2, 8.3321608736e-3f), a2, -1.6666654611e-1f);
  const float sin_a = fmadd(sin_poly * a2, a, a);
  return {cos_a, sin_a, static_cast<int32_t>(q) & 3};
}

SNNKD_HD float cos_2pi(float u) {
#if defined(__CUDA_ARCH__)
  return cosf(6.283185307179586f * u);
#else
  const QuarterTurns t = quarter_turns(u);
  return t.quadrant == 0 ? t.cos_a : (t.quadrant == 1 ? -t.sin_a : (t.quadrant == 2 ? -t.cos_a : t.sin_a));
#endif
}

SNNKD_HD float sin_2pi(float u) {
#if defined(__CUDA_ARCH__)
  return sinf(6.283185307179586f * u);
#else
  const QuarterTurns t = quarter_turns(u);
  return t.quadrant == 0 ? t.sin_a : (t.quadrant == 1 ? t.cos_a : (t.quadrant == 2 ? -t.sin_a : -t.cos_a));
#endif
}

}  // namespace snnkd
