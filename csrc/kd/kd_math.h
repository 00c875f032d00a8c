// Per-element math of the fused KD losses, shared by the CPU kernels (kd_cpu.cpp) and the C++ unit
// test; the Triton kernels (snnkd_fast/kd/triton.py) keep their own copy, and both are tested
// against snnkd_fast/kd/reference.py. Ids and layouts mirror snnkd_fast/kd/params.py.
//
// Notation per row: s = z_s / tau, u = z_t / tau, q = softmax(s), p = softmax(u); gradients are
// w.r.t. the logits z (hence the factor tau = tau^2 / tau) for one row's loss l; the caller scales
// them by dL/dl. Zero probabilities contribute nothing (xlogy semantics): -inf logits are exact.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/fast_math.h"
#include "common/hd.h"

namespace snnkd {
namespace kd {

// Unqualified calls below pick the overload of the argument's type (float stays float); CUDA
// provides the same std:: overloads in device code.
using std::exp;
using std::fabs;
using std::log;

enum LossKind : int { kKL = 0, kTSER = 1, kHTA = 2 };

// f(std::integral_constant<int, LOSS>{}) for a runtime loss id, so that each kernel is instantiated
// per loss with no branch on it inside. Host code (the CPU kernels, the CUDA launchers, the CUDA
// emulation test); the callers check the id first (kKL .. kHTA): any other id is taken as kHTA.
template <typename F>
inline void with_loss_kind(int64_t loss, F&& f) {
  switch (loss) {
    case kKL: f(std::integral_constant<int, kKL>{}); break;
    case kTSER: f(std::integral_constant<int, kTSER>{}); break;
    default: f(std::integral_constant<int, kHTA>{}); break;
  }
}

// The accumulation type of a student/teacher element-type pair: double if either is double.
template <typename s_t, typename u_t>
using acc_type_t =
    typename std::conditional<std::is_same<s_t, double>::value || std::is_same<u_t, double>::value, double,
                              float>::type;

// Element strides of a [T, B, C] tensor (t = 0 for a [B, C] teacher broadcast over time).
struct Strides {
  int64_t t, b, c;
};
enum Stat : int { kLseS = 0, kLseU = 1, kKlF = 2, kAux0 = 3, kAux1 = 4, kNumStats = 5 };
enum HtaField : int { kKeyCross = 0, kIdxCross = 1, kIdxTop = 2, kHtaNum = 3 };

// Order-preserving int32 image of a float32 logit (+0.0 folds -0.0 into +0.0 so equal logits tie).
SNNKD_HD int32_t float_key(float x) {
  const float canonical = x + 0.0f;
  int32_t bits;
  std::memcpy(&bits, &canonical, sizeof(bits));
  return bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
}

// HTA head membership of class c given the teacher row's (key_cross, idx_cross, idx_top).
SNNKD_HD bool hta_is_head(int32_t key, int64_t c, int32_t key_cross, int32_t idx_cross, int32_t idx_top) {
  return key > key_cross || (key == key_cross && c < idx_cross) || c == idx_top;
}

// x * y with x = 0 giving 0 whatever y is (xlogy semantics: 0 * -inf = 0); a NaN x stays NaN, so a
// NaN/+inf logit poisons its row.
template <typename acc_t>
SNNKD_HD acc_t xmul(acc_t x, acc_t y) {
  return x != acc_t(0) ? x * y : acc_t(0);
}

// Row-level scalars the per-element gradients need (from the saved statistics).
template <typename acc_t>
struct RowStats {
  acc_t lse_s, lse_u, kl_f, aux0, aux1;
};

// d l / d z_s of the KL part for one element, from the student's and teacher's log-probabilities
// and probabilities (kernels that cache the teacher's row pass them in; grad_student derives them).
template <typename acc_t>
SNNKD_HD acc_t grad_student_kl(int loss, acc_t log_q, acc_t q, acc_t log_p, acc_t p, const RowStats<acc_t>& r,
                               acc_t tau) {
  acc_t g;
  if (loss == kHTA) {
    // w_head (q - p) + w_tail q (log q - log p - KL(q||p)); the weights are detached.
    const acc_t w_head = r.aux0;
    g = w_head * (q - p) + (acc_t(1) - w_head) * xmul(q, log_q - log_p - r.aux1);
  } else {
    g = q - p;
  }
  return g * tau;
}

// TSER's entropy term of d l / d z_s: -lambda dH/dz = (lambda / tau_H) q_H (log q_H + H), from the
// log-probability and probability at the entropy temperature tau_H.
template <typename acc_t>
SNNKD_HD acc_t grad_student_entropy(acc_t log_qh, acc_t qh, const RowStats<acc_t>& r, acc_t inv_tau_h,
                                    acc_t entropy_weight) {
  return entropy_weight * inv_tau_h * xmul(qh, log_qh + r.aux1);
}

// d l / d z_s for one element. tau: temperature; inv_tau_h, entropy_weight: TSER's entropy term.
template <typename acc_t>
SNNKD_HD acc_t grad_student(int loss, acc_t z_s, acc_t z_u, const RowStats<acc_t>& r, acc_t inv_tau,
                            acc_t tau, acc_t inv_tau_h, acc_t entropy_weight) {
  const acc_t log_q = z_s * inv_tau - r.lse_s;
  const acc_t log_p = z_u * inv_tau - r.lse_u;
  acc_t g = grad_student_kl(loss, log_q, fast_exp(log_q), log_p, fast_exp(log_p), r, tau);
  if (loss == kTSER) {
    const acc_t log_qh = z_s * inv_tau_h - r.aux0;
    g += grad_student_entropy(log_qh, fast_exp(log_qh), r, inv_tau_h, entropy_weight);
  }
  return g;
}

// d l / d z_t for one element (the teacher requires grad in data-free KD), from the log-probabilities
// and probabilities.
template <typename acc_t>
SNNKD_HD acc_t grad_teacher_kl(int loss, acc_t log_q, acc_t q, acc_t log_p, acc_t p, const RowStats<acc_t>& r,
                               acc_t tau) {
  acc_t g = xmul(p, log_p - log_q - r.kl_f);  // forward KL: p (log p - log q - KL(p||q))
  if (loss == kHTA) g = r.aux0 * g + (acc_t(1) - r.aux0) * (p - q);  // reverse KL: p - q
  return g * tau;
}

// d l / d z_t for one element from the logits.
template <typename acc_t>
SNNKD_HD acc_t grad_teacher(int loss, acc_t z_s, acc_t z_u, const RowStats<acc_t>& r, acc_t inv_tau, acc_t tau) {
  const acc_t log_q = z_s * inv_tau - r.lse_s;
  const acc_t log_p = z_u * inv_tau - r.lse_u;
  return grad_teacher_kl(loss, log_q, loss == kHTA ? fast_exp(log_q) : acc_t(0), log_p, fast_exp(log_p), r, tau);
}

// NLD's scalar configuration in the accumulation type (the formulas are in
// snnkd_fast/kd/nld_triton.py's docstring): the CPU (nld_cpu.cpp) and CUDA kernels build it alike.
template <typename acc_t>
struct NldParams {
  // w = 1 - noise_weight (the student's share of the mixture) and noise_weight itself: 1 - w would
  // lose noise_weight's low bits (all of them below 2^-53, or 2^-24 in float)
  acc_t inv_tau, tau, w, noise_weight, log_w, log_1mw, noise_std;
  bool adaptive, additive;
};

template <typename acc_t>
inline NldParams<acc_t> make_nld_params(double temperature, double noise_weight, double noise_std, bool adaptive,
                                        bool additive) {
  const double w = 1.0 - noise_weight;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  return {acc_t(1.0 / temperature), acc_t(temperature), acc_t(w), acc_t(noise_weight),
          acc_t(w > 0 ? std::log(w) : neg_inf), acc_t(noise_weight > 0 ? std::log(noise_weight) : neg_inf),
          acc_t(noise_std), adaptive, additive};
}

}  // namespace kd
}  // namespace snnkd
