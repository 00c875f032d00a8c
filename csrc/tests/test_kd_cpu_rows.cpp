// Unit test of the CPU HTA head's selection (csrc/kd/kd_cpu_rows.h) against its definition: the
// classes ordered by (key descending, index ascending), the crossing class the first whose inclusive
// cumulative probability reaches the threshold, the head the classes before it plus the top-1. CMake
// builds it twice, for this machine (-march=native: the AVX-512 compaction and bucket bitmap where the
// CPU has them) and portably (-march=x86-64: the scalar loops that a laptop without AVX-512 runs, and
// that no Python test reaches on a CI machine with AVX-512). The helpers are also checked one by one
// against plain loops, at lengths that leave a remainder after the 16-class vector blocks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "kd/kd_cpu_rows.h"
#include "tests/expect.h"

using namespace snnkd;
using namespace snnkd::kd;

static void test_key_helpers(std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> any_key(INT32_MIN, INT32_MAX);
  std::uniform_int_distribution<int32_t> few_keys(-3, 3);  // many classes per bucket
  for (const int64_t C : {1, 15, 16, 17, 100, 257, 1000}) {
    for (const bool few : {false, true}) {
      std::vector<int32_t> key(C);
      for (auto& k : key) k = few ? few_keys(rng) << 24 : any_key(rng);
      for (const int shift : {24, 16, 8, 0}) {
        // the digit of a class actually present, and one that may be absent
        for (const uint32_t digit : {key_digit(key[C / 2], shift), 0x7Fu}) {
          std::vector<int32_t> expected;
          for (int64_t c = 0; c < C; ++c) {
            if (((static_cast<uint32_t>(key[c]) ^ 0x80000000u) >> shift & 0xFFu) == digit) expected.push_back(c);
          }
          std::vector<int32_t> out(C + 16, -1);
          const int64_t kept = compact_classes_by_digit(key.data(), C, shift, digit, out.data());
          const bool same = kept == static_cast<int64_t>(expected.size()) &&
                            std::equal(expected.begin(), expected.end(), out.begin());
          EXPECT(same,
                 "compact_classes_by_digit C %lld shift %d digit %u: %lld classes, expected %zu", (long long)C, shift,
                 digit, (long long)kept, expected.size());
        }
      }
    }
  }
  std::uniform_int_distribution<int> coin(0, 3);
  for (int trial = 0; trial < 100; ++trial) {
    int32_t count[64];
    uint64_t expected = 0;
    for (int j = 0; j < 64; ++j) {
      count[j] = coin(rng) == 0 ? coin(rng) + 1 : 0;
      if (count[j] != 0) expected |= uint64_t(1) << j;
    }
    EXPECT(occupied_buckets(count) == expected, "occupied_buckets trial %d", trial);
  }
}

// The head by its definition, from the row's own probabilities (p) and keys, summed in double in
// the class order. Where that sum stays below a threshold that the sum in index order (the total
// select_head checks first) reached -- rounding between the two orders -- the crossing class is the
// last in the order.
static void expected_head(const std::vector<float>& z, const std::vector<float>& p, double threshold, int64_t& cross,
                          int64_t& top) {
  const int64_t C = static_cast<int64_t>(z.size());
  std::vector<int32_t> order(C);
  std::iota(order.begin(), order.end(), 0);
  std::vector<int32_t> key(C);
  for (int64_t c = 0; c < C; ++c) key[c] = sort_key(z[c]);
  std::sort(order.begin(), order.end(),
            [&](int32_t a, int32_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
  top = order[0];
  cross = C;
  double mass = 0.0;
  for (const int32_t c : order) {
    mass += static_cast<double>(p[c]);
    if (mass >= threshold) {
      cross = c;
      return;
    }
  }
  double total = 0.0;
  for (int64_t c = 0; c < C; ++c) total += static_cast<double>(p[c]);
  if (total >= threshold) cross = order[C - 1];
}

static void test_select_head(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small_int(-3, 3);
  const char* kinds[] = {"normal x3", "normal x0.1", "integers in [-3, 3]", "one ulp apart, shuffled"};
  for (const int64_t C : {1, 2, 17, 64, 65, 100, 300, 1000, 1023, 1024, 4099, 64000}) {
    for (int kind = 0; kind < 4; ++kind) {
      std::vector<float> z(C);
      if (kind == 0 || kind == 1) {
        for (auto& v : z) v = normal(rng) * (kind == 0 ? 3.0f : 0.1f);
      } else if (kind == 2) {
        for (auto& v : z) v = static_cast<float>(small_int(rng));
      } else {
        float v = 1.0f;
        for (auto& x : z) {
          x = v;
          v = std::nextafter(v, 2.0f);
        }
        std::shuffle(z.begin(), z.end(), rng);
      }
      TeacherRow<float> probe(C, /*hta=*/true, TeacherUse::kUAndP);
      probe.load(z.data(), 1, C, 1.0f, /*hta=*/true);
      double total = 0.0;  // as select_head sums it
      for (int64_t c = 0; c < C; ++c) total += static_cast<double>(probe.p[c]);
      // the last: a threshold equal to the row's total, which the buckets' sums, in another order,
      // may round below (then the crossing is the last class, from the lowest occupied bucket)
      for (const double threshold : {0.1, 0.5, 0.9, 0.999, total}) {
        TeacherRow<float> row(C, /*hta=*/true, TeacherUse::kUAndP);
        row.load(z.data(), 1, C, 1.0f, /*hta=*/true);
        int32_t out[kHtaNum];
        row.select_head(C, threshold, out);
        const std::vector<float> p(row.p.begin(), row.p.begin() + C);
        int64_t cross = 0, top = 0;
        expected_head(z, p, threshold, cross, top);
        EXPECT(out[kIdxCross] == cross && out[kIdxTop] == top,
               "C %lld, %s, threshold %g: crossing class %d (expected %lld), top %d (expected %lld)", (long long)C,
               kinds[kind], threshold, out[kIdxCross], (long long)cross, out[kIdxTop], (long long)top);
        int64_t wrong = 0;
        const int32_t key_cross = cross == C ? INT32_MIN : sort_key(z[cross]);
        for (int64_t c = 0; c < C; ++c) {
          const int32_t k = sort_key(z[c]);
          const bool head = k > key_cross || (k == key_cross && c < cross) || c == top;
          wrong += (row.head[c] == 1.0f) != head ? 1 : 0;
        }
        EXPECT(wrong == 0, "C %lld, %s, threshold %g: %lld classes' head flag wrong", (long long)C, kinds[kind],
               threshold, (long long)wrong);
      }
    }
  }
}

int main() {
  std::mt19937 rng(20261128);
  test_key_helpers(rng);
  test_select_head(rng);
#if defined(__AVX512F__)
  const char* build = "AVX-512";
#else
  const char* build = "portable (no AVX-512)";
#endif
  if (expect_failures() != 0) {
    std::printf("%d failure(s), %s build\n", expect_failures(), build);
    return 1;
  }
  std::printf("kd_cpu_rows: all checks passed, %s build\n", build);
  return 0;
}
