// CPU kernels of CKDSNN's noise-smoothed logits distillation (NLD). Same passes and formulas as
// snnkd_fast/kd/nld_triton.py (see its docstring). Per row, the student and teacher logits and the
// row's noise eps (regenerated from (seed, row*C + c) with csrc/common/philox.h, the eps the Triton
// kernels draw) go into per-thread buffers of one row -- nothing of [T, B, C] is stored -- and every
// pass over them is an omp-simd loop in the accumulation type (float, or double for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/philox.h"
#include "kd_ops.h"

namespace snnkd {
namespace kd {
namespace {

constexpr int kNldStats = 6;  // mean, scale, lse_q, lse_r, lse_p, kl

template <typename acc_t>
struct NldParams {
  acc_t inv_tau, tau, w, log_w, log_1mw, noise_std;
  bool adaptive, additive;
};

template <typename acc_t>
NldParams<acc_t> make_params(double temperature, double noise_weight, double noise_std, bool adaptive, bool additive) {
  const double w = 1.0 - noise_weight;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  return {acc_t(1.0 / temperature), acc_t(temperature), acc_t(w), acc_t(w > 0 ? std::log(w) : neg_inf),
          acc_t(noise_weight > 0 ? std::log(noise_weight) : neg_inf), acc_t(noise_std), adaptive, additive};
}

template <typename acc_t>
inline acc_t logaddexp(acc_t a, acc_t b) {
  const acc_t m = std::max(a, b);
  const acc_t r = m + fast_log(fast_exp(a - m) + fast_exp(b - m));
  return m == -std::numeric_limits<acc_t>::infinity() ? m : r;
}

// log-sum-exp of x[c] over c in [0, C)
template <typename acc_t>
acc_t lse_of(const acc_t* x, int64_t C) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) m = std::max(m, x[c]);
  acc_t l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t c = 0; c < C; ++c) l += fast_exp(x[c] - m);
  return m == -std::numeric_limits<acc_t>::infinity() ? m : m + std::log(l);
}

// One row's working buffers: logits, noise, and the log of the student's (noisy) distribution parts.
template <typename acc_t>
struct NldRow {
  std::vector<acc_t> z, zt, eps, x, n;
  explicit NldRow(int64_t C) : z(C), zt(C), eps(C), x(C), n(C) {}

  template <typename s_t, typename u_t>
  void load(const s_t* s, int64_t s_c, const u_t* u, int64_t u_c, uint64_t seed, uint64_t base, int64_t C) {
    for (int64_t c = 0; c < C; ++c) z[c] = static_cast<acc_t>(s[c * s_c]);
    for (int64_t c = 0; c < C; ++c) zt[c] = static_cast<acc_t>(u[c * u_c]);
    acc_t* e = eps.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) e[c] = static_cast<acc_t>(philox_randn(seed, base + static_cast<uint64_t>(c)));
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

template <typename s_t, typename u_t, typename acc_t>
void forward_kernel(const s_t* S, const u_t* U, uint64_t seed, const RowLayout& L, const NldParams<acc_t>& P,
                    acc_t* rows, acc_t* stats) {
  at::parallel_for(0, L.T * L.B, 1, [&](int64_t r_begin, int64_t r_end) {
    const int64_t C = L.C;
    NldRow<acc_t> row(C);
    std::vector<acc_t> teacher_scaled(C);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t t = r / L.B, b = r % L.B;
      row.load(S + t * L.s.t + b * L.s.b, L.s.c, U + t * L.u.t + b * L.u.b, L.u.c, seed, static_cast<uint64_t>(r) * C,
               C);
      const acc_t *z = row.z.data(), *zt = row.zt.data(), *x = row.x.data(), *n = row.n.data();
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += z[c];
      const acc_t mean = sum / acc_t(C);
      acc_t m2 = 0;
#pragma omp simd reduction(+ : m2)
      for (int64_t c = 0; c < C; ++c) m2 += (z[c] - mean) * (z[c] - mean);
      const acc_t scale = P.adaptive ? (C > 1 ? m2 / acc_t(C - 1) : acc_t(0)) : P.noise_std;
      row.student_logits(P, mean, scale, C);
      acc_t* ts = teacher_scaled.data();
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) ts[c] = zt[c] * P.inv_tau;
      const acc_t lse_p = lse_of(ts, C);
      const acc_t lse_q = lse_of(x, C);
      const acc_t lse_r = P.additive ? acc_t(0) : lse_of(n, C);
      acc_t kl = 0;
#pragma omp simd reduction(+ : kl)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t log_p = ts[c] - lse_p;
        const acc_t log_ps = P.additive ? x[c] - lse_q : logaddexp(P.log_w + x[c] - lse_q, P.log_1mw + n[c] - lse_r);
        const acc_t p = fast_exp(log_p);
        kl += p != acc_t(0) ? p * (log_p - log_ps) : acc_t(0);  // != 0: a NaN p (NaN/+inf logit) poisons the row
      }
      rows[r] = P.tau * P.tau * kl;
      acc_t* stat = stats + r * kNldStats;
      stat[0] = mean;
      stat[1] = scale;
      stat[2] = lse_q;
      stat[3] = lse_r;
      stat[4] = lse_p;
      stat[5] = kl;
    }
  });
}

template <typename s_t, typename u_t, typename acc_t>
void backward_kernel(const acc_t* grad_rows, const s_t* S, const u_t* U, uint64_t seed, const acc_t* stats,
                     const RowLayout& L, const NldParams<acc_t>& P, s_t* grad_s, u_t* grad_u, bool teacher_per_t) {
  // One sample per task, its T rows in order: a [B, C] teacher's gradient is summed over t in a
  // buffer of one row (deterministic).
  at::parallel_for(0, L.B, 1, [&](int64_t b_begin, int64_t b_end) {
    const int64_t C = L.C;
    NldRow<acc_t> row(C);
    std::vector<acc_t> teacher_sum(grad_u && !teacher_per_t ? C : 0);
    const acc_t var_coef = C > 1 ? acc_t(2) / acc_t(C - 1) : acc_t(0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(teacher_sum.begin(), teacher_sum.end(), acc_t(0));
      for (int64_t t = 0; t < L.T; ++t) {
        const int64_t r = t * L.B + b;
        row.load(S + t * L.s.t + b * L.s.b, L.s.c, U + t * L.u.t + b * L.u.b, L.u.c, seed,
                 static_cast<uint64_t>(r) * C, C);
        const acc_t* stat = stats + r * kNldStats;
        const acc_t mean = stat[0], scale = stat[1], lse_q = stat[2], lse_r = stat[3], lse_p = stat[4], kl = stat[5];
        const acc_t g_row = grad_rows[r];
        row.student_logits(P, mean, scale, C);
        const acc_t *z = row.z.data(), *zt = row.zt.data(), *e = row.eps.data(), *x = row.x.data(), *n = row.n.data();
        // Products with A = p_t / p_s are formed in the log domain with their weight folded in:
        // w q A and (1 - w) r A are at most p_t, whereas q * exp(log A) is 0 * inf = NaN once q underflows.
        acc_t sum_wqa = 0, sum_mra = 0, sum_mrae = 0, sum_re = 0;
        if (!P.additive) {
#pragma omp simd reduction(+ : sum_wqa, sum_mra, sum_mrae, sum_re)
          for (int64_t c = 0; c < C; ++c) {
            const acc_t log_q = x[c] - lse_q, log_r = n[c] - lse_r;
            const acc_t log_a = zt[c] * P.inv_tau - lse_p - logaddexp(P.log_w + log_q, P.log_1mw + log_r);
            const acc_t mra = fast_exp(P.log_1mw + log_r + log_a);
            sum_wqa += fast_exp(P.log_w + log_q + log_a);
            sum_mra += mra;
            sum_mrae += mra * e[c];
            sum_re += fast_exp(log_r) * e[c];
          }
        }
        const acc_t sum_g_eps = -P.tau * (sum_mrae - sum_mra * sum_re);
        s_t* gs = grad_s + r * C;
        // log p_s in the work buffer x (x is not needed after this), then the student's and the
        // teacher's gradients in separate loops: no store under a condition, so each vectorizes.
        acc_t* log_ps = row.x.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t log_q = x[c] - lse_q;
          const acc_t log_p = zt[c] * P.inv_tau - lse_p;
          const acc_t mixture = logaddexp(P.log_w + log_q, P.log_1mw + n[c] - lse_r);
          // additive: tau (q' - p); mixture: -w tau q (A - sum q A) = -tau (w q A - q sum w q A)
          const acc_t g_s = P.additive ? P.tau * (fast_exp(log_q) - fast_exp(log_p))
                                       : -P.tau * (fast_exp(P.log_w + log_q + log_p - mixture) - fast_exp(log_q) * sum_wqa) +
                                             (P.adaptive ? var_coef * sum_g_eps * (z[c] - mean) : acc_t(0));
          log_ps[c] = P.additive ? log_q : mixture;
          gs[c] = static_cast<s_t>(g_s * g_row);
        }
        if (grad_u) {
          // d/dz_t = tau p (log p - log p_s - KL): into the [T, B, C] output, or summed over t
          auto teacher_grad = [&](int64_t c) {
            const acc_t log_p = zt[c] * P.inv_tau - lse_p;
            const acc_t p = fast_exp(log_p);
            return p > acc_t(0) ? P.tau * g_row * p * (log_p - log_ps[c] - kl) : acc_t(0);
          };
          if (teacher_per_t) {
            u_t* gu = grad_u + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) gu[c] = static_cast<u_t>(teacher_grad(c));
          } else {
            acc_t* sum = teacher_sum.data();
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) sum[c] += teacher_grad(c);
          }
        }
      }
      if (grad_u && !teacher_per_t) {
        for (int64_t c = 0; c < C; ++c) grad_u[b * C + c] = static_cast<u_t>(teacher_sum[c]);
      }
    }
  });
}

uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "snnkd_fast::nld: seed must be one int64");
  return static_cast<uint64_t>(seed.data_ptr<int64_t>()[0]);
}



std::tuple<at::Tensor, at::Tensor> nld_rows_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& seed, double temperature,
                                                        double noise_weight, double noise_std, bool adaptive,
                                                        bool additive) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::nld_rows");
  const auto acc = acc_dtype(student, teacher);
  at::Tensor rows = at::empty({L.T, L.B}, student.options().dtype(acc));
  at::Tensor stats = at::empty({L.T, L.B, kNldStats}, student.options().dtype(acc));
  if (rows.numel() == 0) return {rows, stats};
  const uint64_t s = read_seed(seed);
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_nld_forward_cpu", [&] {
    const auto P = make_params<acc_t>(temperature, noise_weight, noise_std, adaptive, additive);
    forward_kernel<s_t, u_t, acc_t>(student.data_ptr<s_t>(), teacher.data_ptr<u_t>(), s, L, P,
                                    rows.data_ptr<acc_t>(), stats.data_ptr<acc_t>());
  });
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
    const auto P = make_params<acc_t>(temperature, noise_weight, noise_std, adaptive, additive);
    backward_kernel<s_t, u_t, acc_t>(grad_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), teacher.data_ptr<u_t>(),
                                     s, stats.data_ptr<acc_t>(), L, P, grad_student.data_ptr<s_t>(),
                                     teacher_grad ? grad_teacher.data_ptr<u_t>() : nullptr, teacher.dim() == 3);
  });
  return {grad_student, grad_teacher};
}

at::Tensor nld_noise_cpu(const at::Tensor& seed, at::IntArrayRef shape) {
  at::Tensor out = at::empty(shape, seed.options().dtype(at::kFloat));
  const uint64_t s = read_seed(seed);
  float* data = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) data[i] = philox_randn(s, static_cast<uint64_t>(i));
  });
  return out;
}

}  // namespace
}  // namespace kd
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CPU, m) {
  m.impl("nld_rows_forward", &snnkd::kd::nld_rows_forward_cpu);
  m.impl("nld_rows_backward", &snnkd::kd::nld_rows_backward_cpu);
  m.impl("nld_noise", &snnkd::kd::nld_noise_cpu);
}
