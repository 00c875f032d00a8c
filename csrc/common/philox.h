// Counter-based Gaussian noise, compatible with Triton's tl.randn4x (Philox4x32-10, then Box-Muller
// on both word pairs, cos and sin: four normals per draw): the CPU and CUDA kernels draw the same eps
// for a (seed, counter) as the Triton kernels do, up to the last bits of log/cos/sin (fast_math.h's
// on the host). Used by the NLD loss, which regenerates its noise in the backward instead of storing
// it: class c of row r gets component c mod 4 of the draw at counter nld_row_counter(r, C) + c / 4
// (nld_eps). Four classes share a draw, so a kernel that draws per quad does a quarter of the Philox
// rounds and half the logs and square roots of one draw per class (tl.randn, which keeps one normal).
#pragma once

#include <cmath>
#include <cstdint>

#include "fast_math.h"
#include "hd.h"

#if !defined(__CUDACC__) && defined(__AVX512F__)
// GCC 12 warns (-Wmaybe-uninitialized) inside its own AVX-512 intrinsics (their _mm512_undefined_*)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace snnkd {

// Philox4x32 with 10 rounds; counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi).
SNNKD_HD void philox4x32_10(uint64_t seed, uint64_t offset, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10  // fully unrolled, so that a loop drawing many offsets vectorizes on the host
#endif
  for (int round = 0; round < 10; ++round) {
    // one 32x32->64 product gives both halves
    const uint64_t prod_a = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t prod_b = static_cast<uint64_t>(0xD2511F53u) * c0;
    c0 = static_cast<uint32_t>(prod_a >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(prod_b >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_a);
    c3 = static_cast<uint32_t>(prod_b);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Uniform [0, 1) from 32 random bits, as Triton's uint_to_uniform_float.
SNNKD_HD float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Box-Muller on two random words, as tl.randn4x's pair_uniform_to_normal: radius from the first,
// angle from the second; both normals (cos and sin).
SNNKD_HD void box_muller(uint32_t bits_radius, uint32_t bits_angle, float& normal_cos, float& normal_sin) {
  float u1 = uint_to_uniform(bits_radius);
  const float u2 = uint_to_uniform(bits_angle);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float radius = std::sqrt(-2.0f * fast_log(u1));
#if defined(__CUDA_ARCH__)
  // cos and sin of pi * (2 u2) (2 u2 is exact) share one reduction, which is exact for an argument in
  // turns: sinf and cosf of 2 pi u2 reduce by 2 pi twice and carry a slow path for large arguments
  // (ptxas, sm_90: ~300 -> ~260 instructions per draw of four normals). The host's cos_2pi/sin_2pi
  // reduce in turns alike; Triton's tl.randn4x takes cos/sin of 2 pi u2 rounded (~4e-7 apart at most, times the radius).
  float cos_a, sin_a;
  sincospif(2.0f * u2, &sin_a, &cos_a);
  normal_cos = radius * cos_a;
  normal_sin = radius * sin_a;
#else
  normal_cos = radius * cos_2pi(u2);  // cos(2 pi u2): loops over elements vectorize on the host
  normal_sin = radius * sin_2pi(u2);
#endif
}

// The four standard normals of tl.randn4x(seed, counter).
SNNKD_HD void philox_randn4x(uint64_t seed, uint64_t counter, float out[4]) {
  uint32_t r[4];
  philox4x32_10(seed, counter, r);
  box_muller(r[0], r[1], out[0], out[1]);
  box_muller(r[2], r[3], out[2], out[3]);
}

// The counter of the first draw of row `row` of C classes: row * ceil(C / 4) (four classes per draw).
SNNKD_HD uint64_t nld_row_counter(int64_t row, int64_t C) {
  return static_cast<uint64_t>(row) * static_cast<uint64_t>((C + 3) / 4);
}

// NLD's eps of class c in the row whose draws start at counter quad_base (= nld_row_counter(row, C)):
// one draw and one Box-Muller pair per class (for kernels that visit classes one at a time).
SNNKD_HD float nld_eps(uint64_t seed, uint64_t quad_base, int64_t c) {
  uint32_t r[4];
  philox4x32_10(seed, quad_base + static_cast<uint64_t>(c >> 2), r);
  const bool second_pair = (c & 2) != 0;
  float normal_cos, normal_sin;
  box_muller(second_pair ? r[2] : r[0], second_pair ? r[3] : r[1], normal_cos, normal_sin);
  return (c & 1) ? normal_sin : normal_cos;
}

#if !defined(__CUDACC__)
// GCC 12 warns (-Wmaybe-uninitialized) inside its AVX-512 intrinsics (their _mm512_undefined_*) where
// they are inlined, so the warning is off for the functions below, not only for the include.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__AVX512F__)
namespace philox_avx512 {
// Both 32-bit halves of x * m for 16 lanes: vpmuludq on the even and the odd lanes, recombined.
// (Left to itself GCC widens the lanes to 64 bits and multiplies with vpmullq, ~3x slower.)
inline void mul_hi_lo(__m512i x, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// The four Philox words for the 16 counters base + [0, 16).
inline void philox_words16(uint64_t seed, uint64_t base, __m512i w[4]) {
  // counters (offset_lo, offset_hi) built in registers (16 scalar stores then a vector load would
  // stall on store forwarding); the high word steps only when the low word wraps inside the block
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const uint32_t base_lo = static_cast<uint32_t>(base), base_hi = static_cast<uint32_t>(base >> 32);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base_lo)), lane);
  const __mmask16 wrapped = _mm512_cmplt_epu32_mask(c0, _mm512_set1_epi32(static_cast<int>(base_lo)));
  __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(base_hi)), wrapped,
                                     _mm512_set1_epi32(static_cast<int>(base_hi)), _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  const __m512i m_a = _mm512_set1_epi64(0xCD9E8D57ll), m_b = _mm512_set1_epi64(0xD2511F53ll);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i hi_a, lo_a, hi_b, lo_b;
    mul_hi_lo(c2, m_a, hi_a, lo_a);
    mul_hi_lo(c0, m_b, hi_b, lo_b);
    // 0x96: a ^ b ^ c
    c0 = _mm512_ternarylogic_epi32(hi_a, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
    c2 = _mm512_ternarylogic_epi32(hi_b, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lo_a;
    c3 = lo_b;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}
}  // namespace philox_avx512
#endif

// out[c] = nld_eps(seed, quad_base, c) for c in [0, C) (identical values): one draw per four classes,
// 16 draws at a time with AVX-512 where the compiler targets it (the last block's surplus draws are
// discarded: scalar draws for the row's remainder cost as much as a vector block).
template <typename out_t>
inline void nld_eps_row(uint64_t seed, uint64_t quad_base, int64_t C, out_t* out) {
  int64_t q = 0;  // draws done
#if defined(__AVX512F__)
  alignas(64) uint32_t words[4][16];
  alignas(64) float normals[4][16];
  for (; 4 * q < C; q += 16) {
    __m512i w[4];
    philox_avx512::philox_words16(seed, quad_base + static_cast<uint64_t>(q), w);
    for (int k = 0; k < 4; ++k) _mm512_store_si512(words[k], w[k]);
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
      box_muller(words[0][j], words[1][j], normals[0][j], normals[1][j]);
      box_muller(words[2][j], words[3][j], normals[2][j], normals[3][j]);
    }
    out_t* o = out + 4 * q;
    if (4 * (q + 16) <= C) {
      for (int j = 0; j < 16; ++j) {
        for (int k = 0; k < 4; ++k) o[4 * j + k] = static_cast<out_t>(normals[k][j]);
      }
    } else {
      for (int64_t i = 0; i < C - 4 * q; ++i) o[i] = static_cast<out_t>(normals[i % 4][i / 4]);
    }
  }
#endif
  for (; 4 * q < C; ++q) {
    float normals4[4];
    philox_randn4x(seed, quad_base + static_cast<uint64_t>(q), normals4);
    for (int64_t k = 0; k < 4 && 4 * q + k < C; ++k) out[4 * q + k] = static_cast<out_t>(normals4[k]);
  }
}
#pragma GCC diagnostic pop
#endif  // !__CUDACC__

}  // namespace snnkd
