// Counter-based Gaussian noise, compatible with Triton's tl.randn (Philox4x32-10, then Box-Muller on
// the first two words): the CPU and CUDA kernels draw the same eps for a (seed, offset) as the
// Triton kernels do, up to the last bits of log/cos (fast_math.h's on the host). Used by the NLD loss,
// which regenerates its noise in the backward instead of storing it.
#pragma once

#include <cmath>
#include <cstdint>

#include "fast_math.h"
#include "hd.h"

namespace snnkd {

SNNKD_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

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
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mulhi32(0xCD9E8D57u, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, old_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old_c2;
    c3 = 0xD2511F53u * old_c0;
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

// One standard-normal float for (seed, offset), as tl.randn(seed, offset).
SNNKD_HD float philox_randn(uint64_t seed, uint64_t offset) {
  uint32_t r[4];
  philox4x32_10(seed, offset, r);
  float u1 = uint_to_uniform(r[0]);
  const float u2 = uint_to_uniform(r[1]);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float radius = std::sqrt(-2.0f * fast_log(u1));
  return radius * cos_2pi(u2);  // cos(2 pi u2): the loop over elements vectorizes on the host
}

}  // namespace snnkd
