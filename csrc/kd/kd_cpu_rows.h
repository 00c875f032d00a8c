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

namespace snnkd {
namespace kd {

// A row of C logits as acc_t: the input itself when it already is (contiguous, same type), else
// converted into buf.
template <typename T_in, typename acc_t>
const acc_t* row_as_acc(const T_in* src, int64_t stride, int64_t C, acc_t* buf) {
  if (std::is_same<T_in, acc_t>::value && stride == 1) return reinterpret_cast<const acc_t*>(src);
  if (stride == 1) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(src[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(src[c * stride]);
  }
  return buf;
}

// Order-preserving int64 image of a teacher logit, the key the HTA head is selected by: float_key of
// its float32 value for float inputs (the keys the GPU kernels store), the double's own bits for
// double (as kd_cuda_kernels.cuh's sort_key).
inline int64_t sort_key(float x) { return float_key(x); }
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

// One sample's teacher row at temperature tau, computed once for its T student rows: u = z_u / tau,
// log_p and p (log_softmax and softmax of u), and for HTA the sort keys of the logits and the head mask.
template <typename acc_t>
struct TeacherRow {
  std::vector<acc_t> buf, u, log_p, p;
  std::vector<int64_t> keys;
  std::vector<int32_t> order;
  std::vector<int64_t> packed;
  std::vector<uint8_t> head;
  const acc_t* z = nullptr;  // the logits of the last row loaded: the input itself or buf
  acc_t lse_u = 0;
  acc_t max_u = 0, sum_u = 0;  // lse_u = max_u + log(sum_u)

  TeacherRow(int64_t C, bool hta) : buf(C), u(C), log_p(C), p(C), keys(hta ? C : 0), order(hta ? C : 0), head(hta ? C : 0) {}

  template <typename u_t>
  void load(const u_t* src, int64_t stride, int64_t C, acc_t inv_tau, bool hta) {
    const acc_t* zr = row_as_acc(src, stride, C, buf.data());
    z = zr;
    acc_t* up = u.data();
    acc_t* lp = log_p.data();
    acc_t* pp = p.data();
    const acc_t m = row_max(zr, C) * inv_tau;  // rounding is monotone: max(z) / tau = max(z / tau)
    acc_t l = 0;
#pragma omp simd reduction(+ : l)
    for (int64_t c = 0; c < C; ++c) {
      up[c] = zr[c] * inv_tau;
      l += fast_exp(up[c] - m);
    }
    lse_u = m + std::log(l);
    max_u = m;
    sum_u = l;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      lp[c] = up[c] - lse_u;
      pp[c] = fast_exp(lp[c]);
    }
    if (hta) {
      for (int64_t c = 0; c < C; ++c) keys[c] = sort_key(zr[c]);
    }
  }

  // HTA head: classes ordered by (logit descending, index ascending); the head is the prefix whose
  // inclusive cumulative probability stays below the threshold, plus the top-1 class. The crossing
  // class (the first whose inclusive cumulative reaches the threshold) is found by selection, not
  // by sorting: halve a range of the order known to hold it with nth_element, keeping the mass
  // before it, then sort the last <= 64 (O(C) expected; a confident teacher's top-1 alone can
  // cross). Writes the mask and (key_cross, idx_cross, idx_top); idx_cross = C and key_cross =
  // INT32_MIN when the whole mass stays below the threshold (every class is head).
  void select_head(int64_t C, double threshold, int32_t* out) {
    const int64_t* key = keys.data();
    const acc_t* pp = p.data();
    int32_t top = 0;
    for (int32_t c = 1; c < C; ++c) top = key[c] > key[top] ? c : top;
    double total = 0.0;
    for (int64_t c = 0; c < C; ++c) total += static_cast<double>(pp[c]);
    int64_t cross = C;  // class index of the crossing class, C for none
    if (static_cast<double>(pp[top]) >= threshold) {
      cross = top;
    } else if (total >= threshold) {
      if (std::is_same<acc_t, float>::value) {
        // float keys fit 32 bits: (key, index) packed into one int64 whose descending order is the
        // class order, so selection compares plain integers (no indirection through key[])
        packed.resize(C);
        for (int64_t c = 0; c < C; ++c) packed[c] = key[c] * (int64_t(1) << 32) + (int64_t(0xFFFFFFFF) - c);
        auto class_of = [](int64_t v) { return int64_t(0xFFFFFFFF) - (v & int64_t(0xFFFFFFFF)); };
        const int64_t item = crossing_item(packed.data(), C, threshold, std::greater<int64_t>(),
                                           [&](int64_t v) { return static_cast<double>(pp[class_of(v)]); });
        cross = class_of(item);
      } else {
        order.resize(C);
        std::iota(order.begin(), order.end(), 0);
        auto before = [key](int32_t a, int32_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); };
        cross = crossing_item(order.data(), C, threshold, before,
                              [&](int32_t c) { return static_cast<double>(pp[c]); });
      }
    }
    const int64_t key_cross = cross == C ? std::numeric_limits<int64_t>::min() : key[cross];
    uint8_t* h = head.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      h[c] = (key[c] > key_cross || (key[c] == key_cross && c < cross) || c == top) ? 1 : 0;
    }
    out[kIdxTop] = top;
    out[kIdxCross] = static_cast<int32_t>(cross);
    out[kKeyCross] = cross == C ? std::numeric_limits<int32_t>::min() : float_key(static_cast<float>(z[cross]));
  }
};

}  // namespace kd
}  // namespace snnkd
