// CPU-side row helpers shared by the KD-loss kernels (kd_cpu.cpp, nld_cpu.cpp): reading a row of
// logits in the accumulation type and a sample's teacher row (log-probabilities, probabilities and,
// for HTA, its head), computed once and reused for the sample's T student rows.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kd_ops.h"

#if defined(__AVX512F__)
// GCC 12 warns (-Wmaybe-uninitialized) inside its own AVX-512 intrinsics (their _mm512_undefined_*)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#if defined(__GNUC__)
#define SNNKD_NOINLINE __attribute__((noinline))
#else
#define SNNKD_NOINLINE
#endif

namespace snnkd {
namespace kd {

// Padded rows and lane reductions: the row loops' shape, for two costs GCC leaves in them.
// - The remainder of a vectorized loop (C mod 16 elements with AVX-512) stays scalar, and at SNN
//   class counts it is most of the work: at C = 10 the whole row, at C = 100 four scalar exps beside
//   six vector iterations. Every row therefore runs its loops over padded_width(C) entries, a
//   multiple of kRowLanes, the padding holding neutral values: logit -inf, hence probability 0, which
//   adds nothing to any row sum (every product with a probability goes through xmul: 0 * inf is 0).
// - `omp simd reduction` spills the vector of partial sums and adds its 16 lanes one by one (~60
//   cycles of dependent adds per accumulator and row: more than the whole vector loop at C = 10).
//   The loops keep kRowLanes partial results per accumulator instead (lane j takes the elements
//   c = j mod kRowLanes: an outer loop over blocks, an `omp simd` loop over the lanes) and combine
//   them in log2(kRowLanes) halving steps (lane_sum, lane_max).
// Written as plain nested loops on local pointers: through lambdas capturing by reference GCC
// vectorized some of them and not others. Measured on one row loop of the KL forward (AVX-512):
// C = 10: 91 -> 24 ns, C = 100: 137 -> 69 ns, C = 1000: 667 -> 565 ns.
constexpr int64_t kRowLanes = 16;  // floats per AVX-512 vector (a multiple of the doubles per vector)

inline int64_t padded_width(int64_t C) { return (C + kRowLanes - 1) / kRowLanes * kRowLanes; }

template <typename acc_t>
inline acc_t lane_sum(acc_t (&v)[kRowLanes]) {
  for (int w = kRowLanes / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int j = 0; j < w; ++j) v[j] += v[j + w];
  }
  return v[0];
}

// a > b ? a : b maps onto vmaxps. A NaN may or may not survive a max; the row sums that follow the
// max propagate it either way.
template <typename acc_t>
inline acc_t max_of(acc_t a, acc_t b) {
  return a > b ? a : b;
}

template <typename acc_t>
inline acc_t lane_max(acc_t (&v)[kRowLanes]) {
  for (int w = kRowLanes / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int j = 0; j < w; ++j) v[j] = max_of(v[j], v[j + w]);
  }
  return v[0];
}

// Maximum of x[0, n) (-inf for n = 0; see max_of for NaN); n need not be padded.
template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  acc_t lanes[kRowLanes];
  for (int j = 0; j < kRowLanes; ++j) lanes[j] = -std::numeric_limits<acc_t>::infinity();
  const int64_t full = n - n % kRowLanes;
  for (int64_t i = 0; i < full; i += kRowLanes) {
#pragma omp simd
    for (int j = 0; j < kRowLanes; ++j) lanes[j] = max_of(lanes[j], x[i + j]);
  }
  for (int64_t c = full; c < n; ++c) lanes[c - full] = max_of(lanes[c - full], x[c]);
  return lane_max(lanes);
}

// out[c] = e^{x[c] * scale - m} for c in [0, n). Not inlined: inlined into the large HTA forward,
// GCC 12 left this loop scalar ("control flow in loop"), on its own it vectorizes.
template <typename acc_t>
SNNKD_NOINLINE void scaled_exp_row(const acc_t* x, int64_t n, acc_t scale, acc_t m, acc_t* out) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = fast_exp(x[c] * scale - m);
}

// A buffer of padded_width(C) entries whose entries from C on hold -inf: the padding of a row of C
// logits (row_as_acc writes only [0, C)).
template <typename acc_t>
std::vector<acc_t> padded_row_buffer(int64_t C) {
  return std::vector<acc_t>(padded_width(C), -std::numeric_limits<acc_t>::infinity());
}

// A row of C logits as acc_t over n >= C entries (n = C, or padded_width(C) with buf a
// padded_row_buffer): the input itself when it already is (contiguous, same type) and needs no
// padding, else converted into buf.
template <typename T_in, typename acc_t>
const acc_t* row_as_acc(const T_in* src, int64_t stride, int64_t C, int64_t n, acc_t* buf) {
  if (std::is_same<T_in, acc_t>::value && stride == 1 && n == C) return reinterpret_cast<const acc_t*>(src);
  if (stride == 1 && n % kRowLanes == 0) {
    // whole blocks, the last one completed with the padding by a masked load: every store is full
    // width, so the row loops' full-width loads right after are forwarded from the store buffer (after
    // a memcpy's narrower stores they stalled: ~12% of a 10-class row's forward)
    const acc_t pad = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < n; i += kRowLanes) {
#pragma omp simd
      for (int j = 0; j < kRowLanes; ++j) buf[i + j] = i + j < C ? static_cast<acc_t>(src[i + j]) : pad;
    }
  } else if (stride == 1) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(src[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(src[c * stride]);
  }
  return buf;
}

// out[c] = f(z[c], c) for c in [0, C), f a pure function of its arguments: the whole vectors in one
// `omp simd` loop, then the last kRowLanes classes as one more whole vector, recomputing the few the
// first loop already wrote (the same values: same inputs, same operations). GCC 12 leaves an omp simd
// loop's remainder below 8 lanes scalar: at C = 100 the 4 classes left over took a backward row ~30
// cycles with one exp each, more than a whole 16-lane block.
template <typename acc_t, typename out_t, typename F>
inline void row_map(const acc_t* z, int64_t C, out_t* out, F&& f) {
  const int64_t full = C - C % kRowLanes;
#pragma omp simd
  for (int64_t c = 0; c < full; ++c) out[c] = static_cast<out_t>(f(z[c], c));
  if (full == C) return;
  if (C < kRowLanes) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<out_t>(f(z[c], c));
    return;
  }
  const int64_t last = C - kRowLanes;
#pragma omp simd
  for (int64_t j = 0; j < kRowLanes; ++j) out[last + j] = static_cast<out_t>(f(z[last + j], last + j));
}

// Order-preserving integer image of a teacher logit, the key the HTA head is selected by: float_key of
// its float32 value for float inputs (the keys the GPU kernels store; 32 bits, so that the head's
// passes over the keys compare 16 per AVX-512 vector rather than 8), the double's own bits for
// double (as kd_cuda_kernels.cuh's sort_key).
inline int32_t sort_key(float x) { return float_key(x); }
inline int64_t sort_key(double x) {
  const double canonical = x + 0.0;
  int64_t bits;
  std::memcpy(&bits, &canonical, sizeof(bits));
  return bits < 0 ? (bits ^ 0x7FFFFFFFFFFFFFFFLL) : bits;
}

// One row's teacher gradient grad(c) (the teacher requires grad): into row_out, the row of a
// [T, B, C] teacher's gradient, or added to `sum`, the sample's row summed over t for a [B, C]
// teacher (written out by the caller once the sample's rows are done: a fixed order).
template <typename u_t, typename acc_t, typename Grad>
inline void add_teacher_grad_row(bool teacher_per_t, u_t* row_out, acc_t* sum, int64_t C, Grad grad) {
  if (teacher_per_t) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) row_out[c] = static_cast<u_t>(grad(c));
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sum[c] += grad(c);
  }
}

// The item of items[0, n) at which the inclusive cumulative mass, in the order `before` sorts them,
// first reaches threshold (the caller has checked that the total does): a range of the order known to
// hold it is halved with nth_element, keeping the mass before the range, and the last <= 64 items are
// sorted and scanned. O(n) expected, where sorting would be O(n log n).
template <typename Item, typename Before, typename MassOf>
Item crossing_item(Item* items, int64_t n, double threshold, Before before, MassOf mass_of) {
  int64_t lo = 0, hi = n;
  double mass_before = 0.0;
  while (hi - lo > 64) {
    const int64_t mid = lo + (hi - lo) / 2;
    std::nth_element(items + lo, items + mid, items + hi, before);
    double left = 0.0;
    for (int64_t i = lo; i < mid; ++i) left += mass_of(items[i]);
    if (mass_before + left >= threshold) {
      hi = mid;
    } else {
      mass_before += left;
      lo = mid;
    }
  }
  std::sort(items + lo, items + hi, before);
  for (int64_t i = lo; i < hi; ++i) {
    mass_before += mass_of(items[i]);
    if (mass_before >= threshold) return items[i];
  }
  return items[hi - 1];  // reached only through rounding between the two summation orders
}

// Which of a TeacherRow's rows a kernel reads, so that only those are allocated (at C = 128,000 each
// is 0.5 MB per thread, beside a gradient the CPU KD forward may already hold): the KD forward u and p
// (load() without log_p), NLD's forward all three, the backwards log_p and p (load_from_lse()).
enum class TeacherUse { kUAndP, kAll, kLogPAndP };

// The radix selection's bucket of a 32-bit HTA key: the byte at `shift` of its unsigned image (the
// sign bit flipped: the same order).
inline uint32_t key_digit(int32_t key, int shift) {
  return ((static_cast<uint32_t>(key) ^ 0x80000000u) >> shift) & 0xFFu;
}

// Bit j set where count[j] != 0, for 64 counts: which buckets of a radix histogram are occupied.
inline uint64_t occupied_buckets(const int32_t* count) {
#if defined(__AVX512F__)
  uint64_t bits = 0;
  for (int q = 0; q < 4; ++q) {
    const __m512i v = _mm512_loadu_si512(count + 16 * q);
    bits |= static_cast<uint64_t>(_mm512_test_epi32_mask(v, v)) << (16 * q);
  }
  return bits;
#else
  uint64_t bits = 0;
  for (int j = 0; j < 64; ++j) bits |= static_cast<uint64_t>(count[j] != 0) << j;
  return bits;
#endif
}

// The classes c in [0, C) whose unsigned key has `digit` in its byte at `shift`, in class order, into
// out; returns their number, n. Branch-free: a scalar loop writes every class and advances by the
// test (~2.2 cycles per class, the HTA head's largest pass after its histogram); with AVX-512 16
// classes at a time, compressed in a register (vpcompressd's memory form is microcoded on Zen 4) and
// stored whole, the next store starting where the kept ones end. out needs room for n + 16 entries:
// the scalar loop writes one past the last kept class, the vector loop a whole vector from there.
#pragma GCC diagnostic push  // GCC 12 warns inside its intrinsics (the include above); off where they inline
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline int64_t compact_classes_by_digit(const int32_t* key, int64_t C, int shift, uint32_t digit, int32_t* out) {
  int64_t kept = 0, c = 0;
#if defined(__AVX512F__)
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i flip = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i byte = _mm512_set1_epi32(0xFF);
  const __m512i wanted = _mm512_set1_epi32(static_cast<int>(digit));
  const __m512i shifts = _mm512_set1_epi32(shift);
  for (; c + 16 <= C; c += 16) {
    const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(key + c), flip);  // key_digit, 16 at a time
    const __mmask16 in = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_srlv_epi32(u, shifts), byte), wanted);
    const __m512i classes = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c)), lane);
    _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(in, classes));
    kept += __builtin_popcount(static_cast<unsigned>(in));
  }
#endif
  for (; c < C; ++c) {
    out[kept] = static_cast<int32_t>(c);
    kept += key_digit(key[c], shift) == digit ? 1 : 0;
  }
  return kept;
}
#pragma GCC diagnostic pop

// One sample's teacher row at temperature tau, computed once for its T student rows: u = z_u / tau,
// log_p and p (log_softmax and softmax of u; load() fills the rows `use` allocated, load_from_lse()
// fills [0, C) of log_p and p alone), and for HTA the sort keys of the logits and the head mask. u,
// log_p, p and head hold n = padded_width(C) entries; after load() the padding is u = log_p = -inf,
// p = 0, head = 0.
template <typename acc_t>
struct TeacherRow {
  int64_t n;
  std::vector<acc_t> buf, u, log_p, p;
  using key_t = decltype(sort_key(acc_t()));  // int32_t for float rows, int64_t for double
  std::vector<key_t> keys;
  std::vector<int32_t> order;
  std::vector<int64_t> packed;
  std::vector<int32_t> candidates;  // float HTA's radix selection
  std::vector<acc_t> head;  // 1 or 0 in acc_t: a uint8 mask made GCC vectorize the loop reading it 2 wide
  const acc_t* z = nullptr;  // the logits of the last row loaded: the input itself or buf
  acc_t lse_u = 0;
  acc_t max_u = 0, sum_u = 0;  // lse_u = max_u + log(sum_u)

  // order (double HTA's selection), packed and candidates (float HTA's) are sized when used
  TeacherRow(int64_t C, bool hta, TeacherUse use)
      : n(padded_width(C)),
        buf(padded_row_buffer<acc_t>(C)),
        u(use != TeacherUse::kLogPAndP ? n : 0),
        log_p(use != TeacherUse::kUAndP ? n : 0),
        p(n),
        keys(hta ? C : 0),
        head(hta ? n : 0) {}

  // Fills u, p and, where allocated, log_p (the rows of kUAndP or kAll).
  template <typename u_t>
  void load(const u_t* src, int64_t stride, int64_t C, acc_t inv_tau, bool hta) {
    const bool with_log_p = !log_p.empty();
    const acc_t* zr = row_as_acc(src, stride, C, n, buf.data());
    z = zr;
    acc_t* up = u.data();
    acc_t* lp = log_p.data();
    acc_t* pp = p.data();
    const acc_t m = row_max(zr, n) * inv_tau;  // rounding is monotone: max(z) / tau = max(z / tau)
    // The normalizer is summed in double lanes, also for float rows: a float lane adding all its
    // C / 16 terms, where they repeat (a teacher of few distinct logits, e.g. tied integer logits),
    // rounds the same way on every add -- at C = 64,000 l came out ~5e-5 relative off, every p with
    // it, and HTA's head missed the exact one by 3-20 classes where the GPU kernels (a double
    // log-sum-exp) had it. Each float lane takes kLaneChunk terms before it is added into its double
    // lane: converting every term cost the float forwards 5-7% at C >= 1,000 (ab_kernels.py).
    constexpr int64_t kLaneChunk = 16;
    double lanes[kRowLanes] = {};
    for (int64_t i0 = 0; i0 < n; i0 += kLaneChunk * kRowLanes) {
      const int64_t i_end = std::min(n, i0 + kLaneChunk * kRowLanes);
      acc_t chunk[kRowLanes] = {};
      for (int64_t i = i0; i < i_end; i += kRowLanes) {
#pragma omp simd
        for (int j = 0; j < kRowLanes; ++j) {
          up[i + j] = zr[i + j] * inv_tau;
          pp[i + j] = fast_exp(up[i + j] - m);
          chunk[j] += pp[i + j];
        }
      }
#pragma omp simd
      for (int j = 0; j < kRowLanes; ++j) lanes[j] += static_cast<double>(chunk[j]);
    }
    const double l = lane_sum(lanes);
    // a local: GCC did not vectorize the loop below reading the member
    const acc_t lse = static_cast<acc_t>(static_cast<double>(m) + std::log(l));
    lse_u = lse;
    max_u = m;
    sum_u = static_cast<acc_t>(l);
    // p = e^{u - m} / l from the exps above: one exp per class, not two (a second exp(log p) was ~15%
    // of a KL forward at C = 100, T = 4), and closer to the true p -- exp(u - lse) carries lse's
    // rounding, |lse| ulps of it, into every p.
    const acc_t inv_l = static_cast<acc_t>(1.0 / l);
    if (with_log_p) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        lp[c] = up[c] - lse;
        pp[c] *= inv_l;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) pp[c] *= inv_l;
    }
    if (hta) {
      for (int64_t c = 0; c < C; ++c) keys[c] = sort_key(zr[c]);
    }
  }

  // The backward's teacher row, [0, C) of log_p and p: log p = u - lse_u and p = e^{log p}, one pass
  // from the log-sum-exp the forward stored (load() forms it: a max pass, an exp pass and a
  // normalising pass, ~40% of a per-timestep KL backward at C = 100, T = 4). p carries lse_u's
  // rounding here (load()'s e^{u - m} / l does not): well within the gradient's tolerance, and what
  // the lane-rows backward and the CUDA backward compute.
  template <typename u_t>
  void load_from_lse(const u_t* src, int64_t stride, int64_t C, acc_t inv_tau, acc_t lse) {
    const acc_t* zr = row_as_acc(src, stride, C, C, buf.data());
    acc_t* lp = log_p.data();
    acc_t* pp = p.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      lp[c] = zr[c] * inv_tau - lse;
      pp[c] = fast_exp(lp[c]);
    }
  }

  // The first class of the largest key, in kRowLanes lanes (each lane's first maximum, then the
  // smallest index among the lanes holding the maximum): `top = key[c] > key[top] ? c : top` chained
  // every class on the load of key[top].
  static int32_t first_max(const key_t* key, int64_t C) {
    key_t best[kRowLanes] = {}, at[kRowLanes] = {};  // at: class indices, as wide as the keys (one vector)
    const int64_t lanes = std::min<int64_t>(kRowLanes, C);
    for (int64_t j = 0; j < lanes; ++j) {
      best[j] = key[j];
      at[j] = j;
    }
    int64_t c = lanes;
    for (; c + kRowLanes <= C; c += kRowLanes) {
#pragma omp simd
      for (int j = 0; j < kRowLanes; ++j) {
        const bool greater = key[c + j] > best[j];
        best[j] = greater ? key[c + j] : best[j];
        at[j] = greater ? static_cast<key_t>(c + j) : at[j];
      }
    }
    for (int64_t j = 0; c < C; ++c, ++j) {  // the rest, into lanes 0, 1, ... (still in class order per lane)
      if (key[c] > best[j]) {
        best[j] = key[c];
        at[j] = static_cast<key_t>(c);
      }
    }
    key_t top = at[0];
    for (int64_t j = 1; j < lanes; ++j) {
      if (best[j] > key[top] || (best[j] == key[top] && at[j] < top)) top = at[j];
    }
    return static_cast<int32_t>(top);
  }

  // The crossing class for float inputs (32-bit keys), by radix selection: a pass over the candidate
  // classes sums their probabilities (and counts them) in 256 buckets of the key's next 8 bits, from
  // the top; walking the buckets down from the largest finds the one holding the crossing key, whose
  // classes become the candidates, and adds the mass of those above it to mass_above = mass(key above
  // the candidates). At most 64 candidates (or 4 digits, all candidates one key) are sorted in class
  // order (key descending, index ascending) and scanned from mass_above. A histogram pass and a
  // compaction over the row, then passes over ever fewer candidates, where the bisection on the key
  // it replaced read the whole row 8-15 times (C = 1,000-128,000, ~0.7 cycles per class each).
  // HTA forward, T = 1, one thread (AMD EPYC VM, best of 60, alternating builds, the benchmarks'
  // malloc settings): [512, 100] 0.69 -> 0.34 ms, [512, 300] 1.33 -> 1.01-1.08, [128, 1000] 0.71 ->
  // 0.54, [4, 32000] 0.74 -> 0.48, [1, 128000] 0.83 -> 0.52; walking only the occupied buckets (a
  // bitmap) then took [512, 300] from 1.04-1.07 to 0.79-0.80 ms and [512, 100] from 0.35-0.37 to 0.34.
  // What is left of it: at C = 32,000 the first histogram (~2.4 cycles per class); at a few hundred
  // classes the one histogram's chain of adds (four copies from 128 candidates up: 0.79 -> 0.84 ms at
  // [512, 300], slower). Before the bisection, nth_element, whose halving mispredicted a branch per
  // comparison.
  int64_t crossing_by_radix_select(int64_t C, double threshold) {
    static_assert(sizeof(key_t) == 4, "radix selection over 32-bit keys (float rows)");
    const key_t* key = keys.data();
    const acc_t* pp = p.data();
    constexpr int kBuckets = 256;  // key_digit's byte
    // Four interleaved histograms over many candidates: consecutive classes mostly share a bucket, and
    // one histogram chains every add on the previous one's store. One over a few (clearing and
    // merging four cost more than they save below ~1,000).
    constexpr int kCopies = 4;
    constexpr int64_t kFewCandidates = 1024;
    double mass[kCopies][kBuckets];
    int32_t count[kCopies][kBuckets];
    double mass_above = 0.0;
    int64_t num = C;                 // candidates: every class, then candidates[0, num)
    const int32_t* list = nullptr;   // nullptr: every class (index i is class i)
    int32_t* lists[2] = {nullptr, nullptr};  // in `candidates`, sized by the first pass's bucket
    for (int shift = 24, level = 0; shift >= 0 && num > 64; shift -= 8, ++level) {
      const int copies = num < kFewCandidates ? 1 : kCopies;
      std::memset(mass, 0, copies * sizeof(mass[0]));
      std::memset(count, 0, copies * sizeof(count[0]));
      const auto class_at = [list](int64_t i) { return list != nullptr ? static_cast<int64_t>(list[i]) : i; };
      int64_t i = 0;
      for (; copies == kCopies && i + kCopies <= num; i += kCopies) {
        for (int j = 0; j < kCopies; ++j) {
          const int64_t c = class_at(i + j);
          const uint32_t b = key_digit(key[c], shift);
          mass[j][b] += static_cast<double>(pp[c]);
          count[j][b] += 1;
        }
      }
      for (; i < num; ++i) {
        const int64_t c = class_at(i);
        const uint32_t b = key_digit(key[c], shift);
        mass[0][b] += static_cast<double>(pp[c]);
        count[0][b] += 1;
      }
      for (int j = 1; j < copies; ++j) {  // merged into the first, bucket by bucket in a fixed order
        for (int b = 0; b < kBuckets; ++b) {
          mass[0][b] += mass[j][b];
          count[0][b] += count[j][b];
        }
      }
      // the bucket holding the crossing: the first, from the top, whose mass takes mass_above to the
      // threshold; none (rounding between summation orders: the caller's total reached it), the
      // lowest occupied one, whose classes the scan below then runs through. The walk visits only
      // occupied buckets, from a bitmap of them (64 per word, built branch-free): skipping empty ones
      // on their count mispredicted at every gap and was half the selection at a few hundred classes.
      int chosen = -1, lowest = -1;
      int64_t chosen_count = 0, lowest_count = 0;
      double below_lowest = mass_above;
      for (int word = kBuckets / 64 - 1; word >= 0 && chosen < 0; --word) {
        uint64_t occupied = occupied_buckets(count[0] + word * 64);
        while (occupied != 0) {
          const int bit = 63 - __builtin_clzll(occupied);
          occupied &= ~(uint64_t(1) << bit);
          const int b = word * 64 + bit;
          const double m = mass[0][b];
          if (mass_above + m >= threshold) {
            chosen = b;
            chosen_count = count[0][b];
            break;
          }
          lowest = b;
          lowest_count = count[0][b];
          below_lowest = mass_above;
          mass_above += m;
        }
      }
      if (chosen < 0) {
        chosen = lowest;
        chosen_count = lowest_count;
        mass_above = below_lowest;
      }
      if (list == nullptr) {  // two lists of at most this bucket's classes, each with the 16 more
        // entries compaction writes past its last kept class (+1); not 2 C entries: zero-filled at
        // every call of a one-sample batch, they cost more than the selection
        const size_t room = static_cast<size_t>(chosen_count) + 17;
        if (candidates.size() < 2 * room) candidates.resize(2 * room);
        lists[0] = candidates.data();
        lists[1] = candidates.data() + room;
      }
      // its classes, compacted without a branch (every class written, the count advanced by the test)
      int32_t* next = lists[level % 2];
      int64_t kept = 0;
      if (list == nullptr) {
        kept = compact_classes_by_digit(key, C, shift, static_cast<uint32_t>(chosen), next);
      } else {
        for (int64_t k = 0; k < num; ++k) {
          const int64_t c = list[k];
          next[kept] = static_cast<int32_t>(c);
          kept += key_digit(key[c], shift) == static_cast<uint32_t>(chosen) ? 1 : 0;
        }
      }
      list = next;
      num = kept;
    }
    // (key, index) packed into one int64 whose descending order is the class order
    packed.resize(static_cast<size_t>(num));
    for (int64_t k = 0; k < num; ++k) {
      const int64_t c = list != nullptr ? list[k] : k;
      packed[k] = static_cast<int64_t>(key[c]) * (int64_t(1) << 32) + (int64_t(0xFFFFFFFF) - c);
    }
    std::sort(packed.begin(), packed.end(), std::greater<int64_t>());
    int64_t cross = C;
    for (const int64_t v : packed) {
      cross = int64_t(0xFFFFFFFF) - (v & int64_t(0xFFFFFFFF));
      mass_above += static_cast<double>(pp[cross]);
      if (mass_above >= threshold) break;  // else: only through rounding between summation orders
    }
    return cross;
  }

  // HTA head: classes ordered by (logit descending, index ascending); the head is the prefix whose
  // inclusive cumulative probability stays below the threshold, plus the top-1 class. The crossing
  // class (the first whose inclusive cumulative reaches the threshold) is found without sorting: by
  // radix selection on the key for float (crossing_by_radix_select), by selection for double (halve a range
  // of the order known to hold it with nth_element, keeping the mass before it, then sort the last
  // <= 64; O(C) expected). A confident teacher's top-1 alone can cross. Writes the mask and
  // (key_cross, idx_cross, idx_top); idx_cross = C and key_cross = INT32_MIN when the whole mass
  // stays below the threshold (every class is head).
  void select_head(int64_t C, double threshold, int32_t* out) {
    const key_t* key = keys.data();
    const acc_t* pp = p.data();
    const int32_t top = first_max(key, C);
    double total = 0.0;
    for (int64_t c = 0; c < C; ++c) total += static_cast<double>(pp[c]);
    int64_t cross = C;  // class index of the crossing class, C for none
    if (static_cast<double>(pp[top]) >= threshold) {
      cross = top;
    } else if (total >= threshold) {
      if constexpr (std::is_same<acc_t, float>::value) {
        cross = crossing_by_radix_select(C, threshold);
      } else {
        order.resize(C);
        std::iota(order.begin(), order.end(), 0);
        auto before = [key](int32_t a, int32_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); };
        cross = crossing_item(order.data(), C, threshold, before,
                              [&](int32_t c) { return static_cast<double>(pp[c]); });
      }
    }
    // none crossing: every class is head (no key is below the smallest; an equal one has c < C)
    const key_t key_cross = cross == C ? std::numeric_limits<key_t>::min() : key[cross];
    acc_t* h = head.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      h[c] = (key[c] > key_cross || (key[c] == key_cross && c < cross) || c == top) ? acc_t(1) : acc_t(0);
    }
    out[kIdxTop] = top;
    out[kIdxCross] = static_cast<int32_t>(cross);
    out[kKeyCross] = cross == C ? std::numeric_limits<int32_t>::min() : float_key(static_cast<float>(z[cross]));
  }
};

}  // namespace kd
}  // namespace snnkd
