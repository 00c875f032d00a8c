// Unit test of the host-side noise generator and KD per-element math (csrc/common/philox.h,
// csrc/kd/kd_math.h): Philox4x32-10 against the Random123 known-answer vector, the batched
// (AVX-512 where compiled for it) row fill against the per-class draw -- across a wrap of the counter's
// low word, which no test through the Python ops can reach -- and the split gradient helpers
// against the logit-level ones the CUDA kernels call, and the host's fast_exp / fast_log
// (csrc/common/fast_math.h) against libm in double: their error over the whole range (measured: 1.4
// ulp at most; bound: 2.5 ulp), their special values, and the vectorized loops against the scalar
// calls, bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "common/fast_math.h"
#include "common/philox.h"
#include "kd/kd_math.h"
#include "tests/expect.h"

using namespace snnkd;

static void test_philox_known_answer() {
  // Random123 kat_vectors: philox4x32 10, counter 0, key 0
  uint32_t out[4];
  philox4x32_10(0, 0, out);
  const uint32_t expected[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  for (int i = 0; i < 4; ++i) EXPECT(out[i] == expected[i], "word %d: %08x != %08x", i, out[i], expected[i]);
}

static void test_row_fill_matches_single_draws() {
  const uint64_t seeds[] = {0ull, 7ull, 0x123456789abcdefull};
  const uint64_t bases[] = {0ull, 3ull, (1ull << 32) - 5, (1ull << 32) - 16, (5ull << 32) - 1};
  for (uint64_t seed : seeds) {
    for (uint64_t base : bases) {
      // rows of C classes around the 64-class (16-draw) blocks and partial last draws
      for (int64_t C : {1, 3, 4, 5, 15, 63, 64, 65, 130}) {
        std::vector<float> filled(C);
        nld_eps_row(seed, base, C, filled.data());
        for (int64_t c = 0; c < C; ++c) {
          const float single = nld_eps(seed, base, c);
          EXPECT(filled[c] == single, "seed %llu base %llu C %lld c %lld: %.9g != %.9g", (unsigned long long)seed,
                 (unsigned long long)base, (long long)C, (long long)c, filled[c], single);
        }
      }
    }
  }
}

// The four normals of a draw are Box-Muller's cos and sin of both word pairs (tl.randn4x), here
// against libm in double.
static void test_randn4x_is_box_muller_of_both_pairs() {
  for (uint64_t counter : {0ull, 1ull, 12345ull, (1ull << 33) + 7}) {
    uint32_t words[4];
    philox4x32_10(99, counter, words);
    float normals[4];
    philox_randn4x(99, counter, normals);
    for (int pair = 0; pair < 2; ++pair) {
      const double u1 = std::max(1.0e-7, static_cast<double>(uint_to_uniform(words[2 * pair])));
      const double u2 = static_cast<double>(uint_to_uniform(words[2 * pair + 1]));
      const double radius = std::sqrt(-2.0 * std::log(u1)), angle = 6.283185307179586 * u2;
      const double expected[2] = {radius * std::cos(angle), radius * std::sin(angle)};
      for (int k = 0; k < 2; ++k) {
        const double got = normals[2 * pair + k];
        EXPECT(std::fabs(got - expected[k]) <= 2e-6 * (1.0 + std::fabs(expected[k])),
               "counter %llu normal %d: %.9g != %.9g", (unsigned long long)counter, 2 * pair + k, got, expected[k]);
      }
    }
  }
}

static void test_gradient_split() {
  using namespace snnkd::kd;
  const RowStats<double> r{0.7, -0.2, 0.3, 0.4, 0.25};
  const double inv_tau = 1.0 / 2.5, tau = 2.5, inv_tau_h = 1.0 / 1.5, w = 0.3;
  for (int loss : {kKL, kTSER, kHTA}) {
    for (double zs : {-3.0, 0.0, 1.25}) {
      for (double zu : {-1.0, 0.5, 2.0}) {
        const double log_q = zs * inv_tau - r.lse_s, log_p = zu * inv_tau - r.lse_u;
        double split = grad_student_kl(loss, log_q, std::exp(log_q), log_p, std::exp(log_p), r, tau);
        if (loss == kTSER) {
          const double log_qh = zs * inv_tau_h - r.aux0;
          split += grad_student_entropy(log_qh, std::exp(log_qh), r, inv_tau_h, w);
        }
        const double whole = grad_student(loss, zs, zu, r, inv_tau, tau, inv_tau_h, w);
        EXPECT(std::fabs(split - whole) <= 1e-15 * (1 + std::fabs(whole)), "student loss %d: %.17g != %.17g", loss,
               split, whole);
        const double teacher_split =
            grad_teacher_kl(loss, log_q, std::exp(log_q), log_p, std::exp(log_p), r, tau);
        const double teacher_whole = grad_teacher(loss, zs, zu, r, inv_tau, tau);
        EXPECT(std::fabs(teacher_split - teacher_whole) <= 1e-15 * (1 + std::fabs(teacher_whole)),
               "teacher loss %d: %.17g != %.17g", loss, teacher_split, teacher_whole);
      }
    }
  }
  // xlogy: a zero probability drops an infinite log, a NaN one poisons
  EXPECT(xmul(0.0, -std::numeric_limits<double>::infinity()) == 0.0, "xmul(0, -inf)");
  EXPECT(std::isnan(xmul(std::nan(""), 1.0)), "xmul(NaN, 1)");
}

// fast_exp and fast_log, the host's vectorizable exp and log (csrc/common/fast_math.h): relative error
// against libm in double over a dense sweep of their range, special values, and the omp simd loop (what
// the kernels compile) against scalar calls, bit for bit.
static void test_fast_exp_and_log() {
  const int64_t n = 1 << 21;
  std::vector<float> x(n), vec(n);
  // exp: [-87.3, 88.3], the range it computes (below it returns 0, above it saturates)
  for (int64_t i = 0; i < n; ++i) x[i] = -87.3f + (88.3f + 87.3f) * float(i) / float(n - 1);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) vec[i] = fast_exp(x[i]);
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float scalar = fast_exp(x[i]);
    EXPECT(std::memcmp(&scalar, &vec[i], sizeof(float)) == 0, "fast_exp(%a): scalar %a, vectorized %a", x[i], scalar,
           vec[i]);
    const double exact = std::exp(double(x[i]));
    if (exact >= double(std::numeric_limits<float>::min())) worst = std::max(worst, std::fabs(scalar - exact) / exact);
  }
  EXPECT(worst <= 1.5e-7, "fast_exp: worst relative error %.3g (normal results)", worst);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT(fast_exp(-inf) == 0.0f, "fast_exp(-inf) = %a", fast_exp(-inf));
  EXPECT(fast_exp(-88.0f) == 0.0f, "fast_exp(-88) = %a (below the range: 0)", fast_exp(-88.0f));
  EXPECT(fast_exp(0.0f) == 1.0f, "fast_exp(0) = %a", fast_exp(0.0f));
  EXPECT(std::isnan(fast_exp(std::nanf(""))), "fast_exp(NaN) = %a", fast_exp(std::nanf("")));
  EXPECT(fast_exp(inf) == fast_exp(88.3f) && std::isfinite(fast_exp(inf)), "fast_exp(inf) = %a", fast_exp(inf));
  EXPECT(fast_exp(1e30f) == fast_exp(88.3f), "fast_exp(1e30) = %a", fast_exp(1e30f));
  // NaN through the vectorized loop too (its clamp is a max-like select), and arguments far below the
  // range, whose unclamped steps compute garbage (NaN for -inf) that the final select must replace by 0
  float special[8] = {std::nanf(""), -inf, inf, 0.0f, -1e30f, -87.31f, -3e38f, -std::nanf("")}, special_out[8];
#pragma omp simd
  for (int i = 0; i < 8; ++i) special_out[i] = fast_exp(special[i]);
  EXPECT(std::isnan(special_out[0]) && special_out[1] == 0.0f && special_out[2] == fast_exp(88.3f) &&
             special_out[3] == 1.0f && special_out[4] == 0.0f && special_out[5] == 0.0f && special_out[6] == 0.0f &&
             std::isnan(special_out[7]),
         "vectorized fast_exp(NaN, -inf, inf, 0, -1e30, -87.31, -3e38, -NaN) = %a %a %a %a %a %a %a %a", special_out[0],
         special_out[1], special_out[2], special_out[3], special_out[4], special_out[5], special_out[6],
         special_out[7]);
  EXPECT(fast_exp(-1e30f) == 0.0f && fast_exp(-87.31f) == 0.0f, "fast_exp(-1e30), fast_exp(-87.31) = %a %a",
         fast_exp(-1e30f), fast_exp(-87.31f));

  // log: normal numbers from 2^-126 to 2^127, geometrically spaced
  for (int64_t i = 0; i < n; ++i) x[i] = std::ldexp(1.0f, -126) * std::pow(2.0f, 253.0f * float(i) / float(n - 1));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) vec[i] = fast_log(x[i]);
  worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float scalar = fast_log(x[i]);
    EXPECT(std::memcmp(&scalar, &vec[i], sizeof(float)) == 0, "fast_log(%a): scalar %a, vectorized %a", x[i], scalar,
           vec[i]);
    const double exact = std::log(double(x[i]));
    // absolute near 1 (log -> 0), relative elsewhere
    worst = std::max(worst, std::fabs(scalar - exact) / std::max(1.0, std::fabs(exact)));
  }
  EXPECT(worst <= 1.5e-7, "fast_log: worst error %.3g", worst);
  EXPECT(fast_log(0.0f) == -inf, "fast_log(0) = %a", fast_log(0.0f));
  EXPECT(fast_log(1.0f) == 0.0f, "fast_log(1) = %a", fast_log(1.0f));
  EXPECT(fast_log(inf) == inf, "fast_log(inf) = %a", fast_log(inf));
  EXPECT(std::isnan(fast_log(-1.0f)), "fast_log(-1) = %a", fast_log(-1.0f));
  EXPECT(std::isnan(fast_log(std::nanf(""))), "fast_log(NaN) = %a", fast_log(std::nanf("")));
}

int main() {
  test_philox_known_answer();
  test_row_fill_matches_single_draws();
  test_randn4x_is_box_muller_of_both_pairs();
  test_gradient_split();
  test_fast_exp_and_log();
  if (expect_failures() != 0) {
    std::printf("%d check(s) failed\n", expect_failures());
    return 1;
  }
  std::printf("kd_math: all checks passed\n");
  return 0;
}
