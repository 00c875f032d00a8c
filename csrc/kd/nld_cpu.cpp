// CPU kernels of CKDSNN's noise-smoothed logits distillation (NLD). The formulas of
// snnkd_fast/kd/nld_triton.py (see its docstring), arranged for the CPU: one sample per task, its
// teacher's softmax computed once for its T rows (kd_cpu_rows.h); per row, the student logits and
// the row's noise eps (regenerated from the seed with csrc/common/philox.h's nld_eps_row, the eps the
// Triton and CUDA kernels draw) go into per-thread buffers of one row -- nothing of [T, B, C] is
// stored -- and every pass over them is a vectorized loop in the accumulation type (float, or double
// for double inputs; the forward's row sums in explicit lanes over padded rows, kd_cpu_rows.h). The
// mixture is formed in the linear domain, with a log-domain fallback for the rows where that would
// underflow (mixture_underflows).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/philox.h"
#include "kd_cpu_rows.h"

namespace snnkd {
namespace kd {
namespace {

constexpr int kNldStats = 6;  // mean, scale, lse_q, lse_r, lse_p, kl

template <typename acc_t>
inline acc_t logaddexp(acc_t a, acc_t b) {
  const acc_t m = std::max(a, b);
  const acc_t r = m + fast_log(fast_exp(a - m) + fast_exp(b - m));
  return m == -std::numeric_limits<acc_t>::infinity() ? m : r;
}

// The row sums below run over a padded row (width a multiple of kRowLanes, kd_cpu_rows.h) in explicit
// lanes: at SNN class counts the per-row cost of `omp simd reduction` dominated.

// Sum of x[0, width) (width: padded).
template <typename acc_t>
acc_t lane_row_sum(const acc_t* x, int64_t width) {
  acc_t lanes[kRowLanes] = {};
  for (int64_t i = 0; i < width; i += kRowLanes) {
#pragma omp simd
    for (int j = 0; j < kRowLanes; ++j) lanes[j] += x[i + j];
  }
  return lane_sum(lanes);
}

// Sum of e^{x[c] - m} over a padded row, each term stored in e (m = max x; the caller forms the
// log-sum-exp).
template <typename acc_t>
acc_t exp_sum(const acc_t* x, int64_t width, acc_t m, acc_t* e) {
  acc_t lanes[kRowLanes] = {};
  for (int64_t i = 0; i < width; i += kRowLanes) {
#pragma omp simd
    for (int j = 0; j < kRowLanes; ++j) {
      e[i + j] = fast_exp(x[i + j] - m);
      lanes[j] += e[i + j];
    }
  }
  return lane_sum(lanes);
}

// p / p_s, 0 where p = 0 (whatever p_s). Written as a division by a selected denominator, not as a
// selected division: GCC does not if-convert a conditional division (it might trap), which left the
// loops containing it scalar ("control flow in loop").
template <typename acc_t>
inline acc_t safe_ratio(acc_t p, acc_t p_s) {
  return p / (p != acc_t(0) ? p_s : acc_t(1));
}

// One student row's working buffers: its logits z, noise eps, scaled (noisy) logits x and noise
// logits n, and e^{x - max x}, e^{n - max n} (the forward's softmax numerators; the backward keeps q
// and r there). Each holds width = padded_width(C) entries; the loops write only [0, C) of z, eps,
// x and n, whose padding stays neutral: z = eps = 0, x = n = -inf (so e_x = e_n = 0 there).
// with_p_s: a row for the mixture p_s of its own (the forward that also forms the gradient, which
// needs e_x after p_s; the plain forward writes p_s over e_x).
template <typename acc_t>
struct NldRow {
  int64_t C, width;
  std::vector<acc_t> z, eps, x, n, e_x, e_n, p_s;
  explicit NldRow(int64_t C_, bool with_p_s = false)
      : C(C_),
        width(padded_width(C_)),
        z(width),
        eps(width),
        x(padded_row_buffer<acc_t>(C_)),
        n(padded_row_buffer<acc_t>(C_)),
        e_x(width),
        e_n(width),
        p_s(with_p_s ? width : 0) {}

  // The row's logits, and its noise from `noise` (RowNoise: drawn here, or copied from a block).
  template <typename s_t, typename Noise>
  void load(const s_t* s, int64_t s_c, Noise& noise, int64_t t, int64_t b) {
    for (int64_t c = 0; c < C; ++c) z[c] = static_cast<acc_t>(s[c * s_c]);
    noise.fill(t, b, eps.data());
  }

  // x: the student's (noisy, in additive mode) logits / tau; n: the noise logits / tau (mixture).
  void student_logits(const NldParams<acc_t>& P, acc_t mean, acc_t scale, int64_t C) {
    const acc_t *zp = z.data(), *e = eps.data();
    acc_t *xp = x.data(), *np = n.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      xp[c] = (P.additive ? zp[c] + P.noise_std * e[c] : zp[c]) * P.inv_tau;
      np[c] = (mean + e[c] * scale) * P.inv_tau;
    }
  }
};

// The noise eps of the rows (t, b) a task visits, b in increasing order (each t of a b, in any order).
// A row draws ceil(C/4) Philox draws, at counters nld_row_counter(t * B + b, C) on; nld_eps_row draws
// 16 at a time, so at few classes most of a block went to waste (13 of 16 at C = 10) -- a third of
// the NLD forward's time at 512x10. But the rows (t, b .. b + k) of one timestep have consecutive
// counters, so below kMaxBlockStride one call draws k rows' noise at once, as one long row of k *
// 4 ceil(C/4) values whose row j starts at j * 4 ceil(C/4) (class c of row j: component c mod 4 of
// draw j ceil(C/4) + c / 4, as nld_eps): the same eps, bit for bit, for a block of samples and all T
// steps, held per task (at most kMaxBlockValues). Above kMaxBlockStride each row draws its own.
template <typename acc_t>
class RowNoise {
 public:
  static constexpr int64_t kMaxBlockStride = 64;  // 4 ceil(C/4) below this: C <= 60
  static constexpr int64_t kMaxBlockSamples = 32;
  static constexpr int64_t kMaxBlockValues = 1 << 16;

  RowNoise(uint64_t seed, const RowLayout& L, int64_t b_end)
      : seed_(seed), T_(L.T), B_(L.B), C_(L.C), stride_(4 * ((L.C + 3) / 4)), b_end_(b_end) {
    block_samples_ = std::min(kMaxBlockSamples, kMaxBlockValues / std::max<int64_t>(1, T_ * stride_));
    if (stride_ < kMaxBlockStride && block_samples_ > 1) block_.resize(T_ * block_samples_ * stride_);
  }

  // eps[0, C) of row (t, b)
  void fill(int64_t t, int64_t b, acc_t* eps) {
    if (block_.empty()) {
      nld_eps_row(seed_, nld_row_counter(t * B_ + b, C_), C_, eps);
      return;
    }
    if (b < b0_ || b >= b0_ + nb_) draw_block(b);
    const acc_t* src = block_.data() + (t * nb_ + (b - b0_)) * stride_;
    std::copy(src, src + C_, eps);
  }

 private:
  void draw_block(int64_t b) {
    b0_ = b;
    nb_ = std::min(block_samples_, b_end_ - b);
    for (int64_t t = 0; t < T_; ++t) {
      nld_eps_row(seed_, nld_row_counter(t * B_ + b0_, C_), nb_ * stride_, block_.data() + t * nb_ * stride_);
    }
  }

  uint64_t seed_;
  int64_t T_, B_, C_, stride_, b_end_;
  int64_t block_samples_, b0_ = 0, nb_ = 0;
  std::vector<acc_t> block_;  // [T][nb_][stride_]
};

// The mixture p_s = w q + (1 - w) r is formed in the linear domain (one log per element instead of
// logaddexp's two exps and a log), which is exact unless a class the teacher gives mass to has p_s
// below the smallest normal number (its log and p / p_s would lose range): such a row -- only logits
// tens of units apart reach it -- is computed again in the log domain (the *_log_domain passes).
template <typename acc_t>
bool mixture_underflows(const acc_t* p, const acc_t* p_s, int64_t C) {
  const acc_t tiny = std::numeric_limits<acc_t>::min();
  int underflow = 0;
#pragma omp simd reduction(| : underflow)
  for (int64_t c = 0; c < C; ++c) underflow |= (p[c] != acc_t(0) && !(p_s[c] >= tiny)) ? 1 : 0;
  return underflow != 0;
}

// sum_c p (log p - log p_s) with log p_s = logaddexp(log w + log q, log(1 - w) + log r)
template <typename acc_t>
acc_t mixture_kl_log_domain(const NldParams<acc_t>& P, const acc_t* log_p, const acc_t* p, const acc_t* x,
                            const acc_t* n, acc_t lse_q, acc_t lse_r, int64_t C) {
  acc_t kl = 0;
#pragma omp simd reduction(+ : kl)
  for (int64_t c = 0; c < C; ++c) {
    kl += xmul(p[c], log_p[c] - logaddexp(P.log_w + x[c] - lse_q, P.log_1mw + n[c] - lse_r));
  }
  return kl;
}

// The mixture's student gradient of one row in the log domain (the rows mixture_underflows flags),
// into gs, and log p_s into log_ps when the teacher's gradient needs it. Products with A = p / p_s
// are formed with their weight folded in: w q A and (1 - w) r A are at most p, whereas q * exp(log A)
// is 0 * inf = NaN once q underflows.
template <typename s_t, typename acc_t>
void backward_row_log_domain(const NldParams<acc_t>& P, const acc_t* log_p, const NldRow<acc_t>& row, acc_t mean,
                             acc_t lse_q, acc_t lse_r, acc_t var_coef, acc_t g_row, s_t* gs, acc_t* log_ps) {
  const int64_t C = row.C;
  const acc_t *z = row.z.data(), *e = row.eps.data(), *x = row.x.data(), *n = row.n.data();
  acc_t sum_wqa = 0, sum_mra = 0, sum_mrae = 0, sum_re = 0;
#pragma omp simd reduction(+ : sum_wqa, sum_mra, sum_mrae, sum_re)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t log_q = x[c] - lse_q, log_r = n[c] - lse_r;
    const acc_t log_a = log_p[c] - logaddexp(P.log_w + log_q, P.log_1mw + log_r);
    const acc_t mra = fast_exp(P.log_1mw + log_r + log_a);
    sum_wqa += fast_exp(P.log_w + log_q + log_a);
    sum_mra += mra;
    sum_mrae += mra * e[c];
    sum_re += fast_exp(log_r) * e[c];
  }
  const acc_t sum_g_eps = -P.tau * (sum_mrae - sum_mra * sum_re);
  const acc_t adaptive_coef = P.adaptive ? var_coef * sum_g_eps : acc_t(0);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t log_q = x[c] - lse_q;
    const acc_t mixture = logaddexp(P.log_w + log_q, P.log_1mw + n[c] - lse_r);
    const acc_t g_s = -P.tau * (fast_exp(P.log_w + log_q + log_p[c] - mixture) - fast_exp(log_q) * sum_wqa) +
                      adaptive_coef * (z[c] - mean);
    gs[c] = static_cast<s_t>(g_s * g_row);
  }
  if (log_ps) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) log_ps[c] = logaddexp(P.log_w + x[c] - lse_q, P.log_1mw + n[c] - lse_r);
  }
}

// The mixture's student gradient of one row in the linear domain, times g_row, into gs: q and r the
// softmaxes of the student's and the noise logits, p_s = w q + (1 - w) r, p the teacher's, eps the
// noise, z the logits and mean their mean (the adaptive scale's term). With A = p / p_s: sum_wqa =
// sum w q A, sum_mra = sum (1-w) r A, sum_mrae = sum (1-w) r A eps, sum_re = sum r eps; then
// d/dz = -tau (w q A - q sum_wqa) (+ the adaptive scale's term). p_s is overwritten with A: the second
// loop reads the first one's quotient instead of dividing again (one vdivps per class fewer: the NLD
// backward 1.28-1.40x faster at C >= 100, ab_nld_ratio.json).
template <typename s_t, typename acc_t>
void mixture_gradient_row(const NldParams<acc_t>& P, const acc_t* p, const acc_t* q, const acc_t* rr,
                          acc_t* p_s, const acc_t* e, const acc_t* z, acc_t mean, acc_t var_coef, acc_t g_row,
                          int64_t C, s_t* gs) {
  // (an omp-simd reduction over C, not lanes over the padded row: with the lane loop here GCC left
  // the gradient loop below scalar, and the backward lost more than it gained)
  acc_t sum_wqa = 0, sum_mra = 0, sum_mrae = 0, sum_re = 0;
  acc_t* ratios = p_s;
#pragma omp simd reduction(+ : sum_wqa, sum_mra, sum_mrae, sum_re)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t ratio = safe_ratio(p[c], p_s[c]);
    ratios[c] = ratio;
    const acc_t mra = P.noise_weight * rr[c] * ratio;
    sum_wqa += P.w * q[c] * ratio;
    sum_mra += mra;
    sum_mrae += mra * e[c];
    sum_re += rr[c] * e[c];
  }
  const acc_t sum_g_eps = -P.tau * (sum_mrae - sum_mra * sum_re);
  const acc_t adaptive_coef = P.adaptive ? var_coef * sum_g_eps : acc_t(0);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t ratio = ratios[c];
    const acc_t g_s = -P.tau * (P.w * q[c] * ratio - q[c] * sum_wqa) + adaptive_coef * (z[c] - mean);
    gs[c] = static_cast<s_t>(g_s * g_row);
  }
}

// grad_s (nullptr: none): also the student's gradient at grad_rows = row_weight ([T, B, C], contiguous,
// in the accumulation type), each row from the softmax numerators of its forward while the row is in
// the thread's buffers -- the eager path's precomputed gradient (nld_rows_forward_student_grad_cpu),
// sparing the backward its second Philox draw and exps.
template <typename s_t, typename u_t, typename acc_t>
void forward_kernel(const s_t* S, const u_t* U, uint64_t seed, const RowLayout& L, const NldParams<acc_t>& P,
                    acc_t* rows, acc_t* stats, acc_t* grad_s, acc_t row_weight) {
  // One sample per task, its T rows in order: the teacher's softmax is computed once per sample.
  at::parallel_for(0, L.B, 1, [&](int64_t b_begin, int64_t b_end) {
    const int64_t C = L.C;
    NldRow<acc_t> row(C, grad_s != nullptr);
    RowNoise<acc_t> noise(seed, L, b_end);
    TeacherRow<acc_t> teacher(C, false, TeacherUse::kAll);
    const acc_t *log_p = teacher.log_p.data(), *p = teacher.p.data();
    const acc_t var_coef = C > 1 ? acc_t(2) / acc_t(C - 1) : acc_t(0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      for (int64_t t = 0; t < L.T; ++t) {
        const int64_t r = t * L.B + b;
        if (t == 0 || L.teacher_per_t) teacher.load(U + t * L.u.t + b * L.u.b, L.u.c, C, P.inv_tau, false);
        row.load(S + t * L.s.t + b * L.s.b, L.s.c, noise, t, b);
        const acc_t *z = row.z.data(), *x = row.x.data(), *n = row.n.data();
        const int64_t width = row.width;
        const acc_t mean = lane_row_sum(z, width) / acc_t(C);
        acc_t m2_lanes[kRowLanes] = {};
        for (int64_t i = 0; i < width; i += kRowLanes) {
#pragma omp simd
          for (int j = 0; j < kRowLanes; ++j) {
            const acc_t d = i + j < C ? z[i + j] - mean : acc_t(0);  // the padding is not a class
            m2_lanes[j] += d * d;
          }
        }
        const acc_t m2 = lane_sum(m2_lanes);
        const acc_t scale = P.adaptive ? (C > 1 ? m2 / acc_t(C - 1) : acc_t(0)) : P.noise_std;
        row.student_logits(P, mean, scale, C);
        acc_t* e_x = row.e_x.data();
        acc_t* e_n = row.e_n.data();
        const acc_t m_x = row_max(x, width);
        const acc_t l_x = exp_sum(x, width, m_x, e_x);
        const acc_t lse_q = m_x + std::log(l_x);
        acc_t lse_r = 0, kl = 0;
        if (P.additive) {
          // log p - log p_s = (u - x) + (lse_q - lse_u): small multiplicands (see kd_cpu.cpp)
          const acc_t* u = teacher.u.data();
          const acc_t lse_diff = lse_q - teacher.lse_u;
          acc_t kl_lanes[kRowLanes] = {};
          for (int64_t i = 0; i < width; i += kRowLanes) {
#pragma omp simd
            for (int j = 0; j < kRowLanes; ++j) kl_lanes[j] += xmul(p[i + j], (u[i + j] - x[i + j]) + lse_diff);
          }
          kl = lane_sum(kl_lanes);
          if (grad_s != nullptr) {  // tau (q - p), q = softmax of the noisy logits
            const acc_t inv_l_x = acc_t(1) / l_x;
            acc_t* gs = grad_s + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) gs[c] = row_weight * P.tau * (e_x[c] * inv_l_x - p[c]);
          }
        } else {
          const acc_t m_n = row_max(n, width);
          const acc_t l_n = exp_sum(n, width, m_n, e_n);
          lse_r = m_n + std::log(l_n);
          const acc_t a = P.w / l_x, a_n = P.noise_weight / l_n;
          // p_s = w q + (1 - w) r (0 in the padding), over e_x unless the gradient needs e_x after it
          acc_t* p_s = grad_s != nullptr ? row.p_s.data() : e_x;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) p_s[c] = a * e_x[c] + a_n * e_n[c];
          const bool underflows = mixture_underflows(p, p_s, C);
          if (underflows) {
            kl = mixture_kl_log_domain(P, log_p, p, x, n, lse_q, lse_r, C);
          } else {
            acc_t kl_lanes[kRowLanes] = {};
            for (int64_t i = 0; i < width; i += kRowLanes) {
#pragma omp simd
              for (int j = 0; j < kRowLanes; ++j) kl_lanes[j] += xmul(p[i + j], log_p[i + j] - fast_log(p_s[i + j]));
            }
            kl = lane_sum(kl_lanes);
          }
          if (grad_s != nullptr && underflows) {
            backward_row_log_domain(P, log_p, row, mean, lse_q, lse_r, var_coef, row_weight, grad_s + r * C,
                                    static_cast<acc_t*>(nullptr));
          } else if (grad_s != nullptr) {
            const acc_t inv_l_x = acc_t(1) / l_x, inv_l_n = acc_t(1) / l_n;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) {  // the softmaxes q and r, in place of their numerators
              e_x[c] *= inv_l_x;
              e_n[c] *= inv_l_n;
            }
            mixture_gradient_row(P, p, e_x, e_n, p_s, row.eps.data(), z, mean, var_coef, row_weight, C,
                                 grad_s + r * C);
          }
        }
        rows[r] = P.tau * P.tau * kl;
        acc_t* stat = stats + r * kNldStats;
        stat[0] = mean;
        stat[1] = scale;
        stat[2] = lse_q;
        stat[3] = lse_r;
        stat[4] = teacher.lse_u;
        stat[5] = kl;
      }
    }
  });
}

template <typename s_t, typename u_t, typename acc_t>
void backward_kernel(const acc_t* grad_rows, const s_t* S, const u_t* U, uint64_t seed, const acc_t* stats,
                     const RowLayout& L, const NldParams<acc_t>& P, s_t* grad_s, u_t* grad_u) {
  // One sample per task, its T rows in order: the teacher's softmax is computed once per sample and
  // a [B, C] teacher's gradient is summed over t in a buffer of one row (deterministic).
  at::parallel_for(0, L.B, 1, [&](int64_t b_begin, int64_t b_end) {
    const int64_t C = L.C;
    NldRow<acc_t> row(C);
    RowNoise<acc_t> noise(seed, L, b_end);
    TeacherRow<acc_t> teacher(C, false, TeacherUse::kLogPAndP);
    const acc_t *log_p = teacher.log_p.data(), *p = teacher.p.data();
    std::vector<acc_t> teacher_sum(grad_u && !L.teacher_per_t ? C : 0);
    std::vector<acc_t> log_ps_buf(grad_u ? C : 0);
    const acc_t var_coef = C > 1 ? acc_t(2) / acc_t(C - 1) : acc_t(0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(teacher_sum.begin(), teacher_sum.end(), acc_t(0));
      for (int64_t t = 0; t < L.T; ++t) {
        const int64_t r = t * L.B + b;
        const acc_t* stat = stats + r * kNldStats;
        // the teacher's log p and p from the forward's lse_p (stat[4]): one pass, not load()'s three
        if (t == 0 || L.teacher_per_t) teacher.load_from_lse(U + t * L.u.t + b * L.u.b, L.u.c, C, P.inv_tau, stat[4]);
        row.load(S + t * L.s.t + b * L.s.b, L.s.c, noise, t, b);
        const acc_t mean = stat[0], scale = stat[1], lse_q = stat[2], lse_r = stat[3], kl = stat[5];
        const acc_t g_row = grad_rows[r];
        row.student_logits(P, mean, scale, C);
        const acc_t *z = row.z.data(), *e = row.eps.data(), *x = row.x.data(), *n = row.n.data();
        acc_t* q = row.e_x.data();
        acc_t* rr = row.e_n.data();
        s_t* gs = grad_s + r * C;
        acc_t* log_ps = log_ps_buf.data();
        if (P.additive) {
          // tau (q - p), q = softmax of the noisy logits
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            q[c] = fast_exp(x[c] - lse_q);
            gs[c] = static_cast<s_t>(g_row * P.tau * (q[c] - p[c]));
          }
          if (grad_u) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) log_ps[c] = x[c] - lse_q;
          }
        } else {
          // q, r and p_s into the row's buffers, then mixture_gradient_row
          acc_t* p_s = row.x.data();  // x is not needed once q is formed
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            q[c] = fast_exp(x[c] - lse_q);
            rr[c] = fast_exp(n[c] - lse_r);
            p_s[c] = P.w * q[c] + P.noise_weight * rr[c];
          }
          if (mixture_underflows(p, p_s, C)) {
            row.student_logits(P, mean, scale, C);  // x again: the log-domain pass needs it
            backward_row_log_domain(P, log_p, row, mean, lse_q, lse_r, var_coef, g_row, gs, grad_u ? log_ps : nullptr);
          } else {
            if (grad_u) {  // before mixture_gradient_row, which overwrites p_s
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) log_ps[c] = fast_log(p_s[c]);
            }
            mixture_gradient_row(P, p, q, rr, p_s, e, z, mean, var_coef, g_row, C, gs);
          }
        }
        if (grad_u) {
          // d/dz_t = tau p (log p - log p_s - KL): into the [T, B, C] output, or summed over t
          auto teacher_grad = [&](int64_t c) { return P.tau * g_row * xmul(p[c], log_p[c] - log_ps[c] - kl); };
          add_teacher_grad_row(L.teacher_per_t, L.teacher_per_t ? grad_u + r * C : nullptr, teacher_sum.data(), C,
                               teacher_grad);
        }
      }
      if (grad_u && !L.teacher_per_t) {
        for (int64_t c = 0; c < C; ++c) grad_u[b * C + c] = static_cast<u_t>(teacher_sum[c]);
      }
    }
  });
}

uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "snnkd_fast::nld: seed must be one int64");
  return static_cast<uint64_t>(seed.data_ptr<int64_t>()[0]);
}



// The forward op; with student_grad (a student in the accumulation dtype) also the student's gradient
// at grad_rows = row_weight (forward_kernel), else an undefined one.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nld_rows_forward_impl(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& seed, double temperature,
    double noise_weight, double noise_std, bool adaptive, bool additive, bool student_grad, double row_weight) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::nld_rows");
  const auto acc = acc_dtype(student, teacher);
  at::Tensor rows = at::empty({L.T, L.B}, student.options().dtype(acc));
  at::Tensor stats = at::empty({L.T, L.B, kNldStats}, student.options().dtype(acc));
  at::Tensor grad;
  if (rows.numel() == 0) return {rows, stats, grad};
  if (student_grad && nld_cpu_forms_student_grad(student, teacher)) grad = at::empty(student.sizes(), student.options());
  const uint64_t s = read_seed(seed);
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_nld_forward_cpu", [&] {
    const auto P = make_nld_params<acc_t>(temperature, noise_weight, noise_std, adaptive, additive);
    forward_kernel<s_t, u_t, acc_t>(student.data_ptr<s_t>(), teacher.data_ptr<u_t>(), s, L, P,
                                    rows.data_ptr<acc_t>(), stats.data_ptr<acc_t>(),
                                    grad.defined() ? grad.data_ptr<acc_t>() : nullptr, acc_t(row_weight));
  });
  return {rows, stats, grad};
}

std::tuple<at::Tensor, at::Tensor> nld_rows_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& seed, double temperature,
                                                        double noise_weight, double noise_std, bool adaptive,
                                                        bool additive) {
  auto [rows, stats, grad] = nld_rows_forward_impl(student, teacher, seed, temperature, noise_weight, noise_std,
                                                   adaptive, additive, false, 1.0);
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> nld_rows_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& seed,
                                                         const at::Tensor& stats, double temperature,
                                                         double noise_weight, double noise_std, bool adaptive,
                                                         bool additive, bool teacher_grad) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::nld_rows");
  TORCH_CHECK(grad_rows.is_contiguous() && stats.is_contiguous() && grad_rows.numel() == L.T * L.B &&
                  stats.numel() == L.T * L.B * kNldStats && grad_rows.scalar_type() == stats.scalar_type(),
              "snnkd_fast::nld_rows_backward: grad_rows [T, B] and stats [T, B, 6] must be contiguous, one dtype");
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty(teacher.sizes(), teacher.options()) : at::empty({0}, teacher.options());
  if (grad_student.numel() == 0) {
    grad_teacher.zero_();
    return {grad_student, grad_teacher};
  }
  const uint64_t s = read_seed(seed);
  TORCH_CHECK(stats.scalar_type() == acc_dtype(student, teacher),
              "snnkd_fast::nld_rows_backward: stats must be in the inputs' accumulation dtype");
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_nld_backward_cpu", [&] {
    const auto P = make_nld_params<acc_t>(temperature, noise_weight, noise_std, adaptive, additive);
    backward_kernel<s_t, u_t, acc_t>(grad_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), teacher.data_ptr<u_t>(),
                                     s, stats.data_ptr<acc_t>(), L, P, grad_student.data_ptr<s_t>(),
                                     teacher_grad ? grad_teacher.data_ptr<u_t>() : nullptr);
  });
  return {grad_student, grad_teacher};
}

at::Tensor nld_noise_cpu(const at::Tensor& seed, at::IntArrayRef shape) {
  at::Tensor out = at::empty(shape, seed.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const uint64_t s = read_seed(seed);
  const int64_t C = shape.empty() ? 1 : shape.back();  // a 0-d shape: one row of one class
  const int64_t rows = out.numel() / C;
  float* data = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) nld_eps_row(s, nld_row_counter(r, C), C, data + r * C);
  });
  return out;
}

}  // namespace

bool nld_cpu_forms_student_grad(const at::Tensor& student, const at::Tensor& teacher) {
  return student.scalar_type() == acc_dtype(student, teacher);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nld_rows_forward_student_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& seed, double temperature,
    double noise_weight, double noise_std, bool adaptive, bool additive, double row_weight) {
  RECORD_FUNCTION("snnkd_fast::nld_rows_forward_student_grad", std::vector<c10::IValue>({student, teacher}));
  return nld_rows_forward_impl(student, teacher, seed, temperature, noise_weight, noise_std, adaptive, additive,
                               true, row_weight);
}

}  // namespace kd
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CPU, m) {
  m.impl("nld_rows_forward", &snnkd::kd::nld_rows_forward_cpu);
  m.impl("nld_rows_backward", &snnkd::kd::nld_rows_backward_cpu);
  m.impl("nld_noise", &snnkd::kd::nld_noise_cpu);
}
