// CPU kernels of CKDSNN's noise-smoothed logits distillation (NLD). Same passes and formulas as
// snnkd_fast/kd/nld_triton.py (see its docstring); the noise is regenerated from (seed, row*C + c)
// with csrc/common/philox.h, so it is the eps the Triton kernels draw. Sums are in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/philox.h"
#include "kd_ops.h"

namespace snnkd {
namespace kd {
namespace {

constexpr int kNldStats = 6;  // mean, scale, lse_q, lse_r, lse_p, kl

struct NldParams {
  double inv_tau, tau, w, log_w, log_1mw, noise_std;
  bool adaptive, additive;
};

NldParams make_params(double temperature, double noise_weight, double noise_std, bool adaptive, bool additive) {
  const double w = 1.0 - noise_weight;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  return {1.0 / temperature, temperature, w, w > 0 ? std::log(w) : neg_inf,
          noise_weight > 0 ? std::log(noise_weight) : neg_inf, noise_std, adaptive, additive};
}

double logaddexp(double a, double b) {
  const double m = std::max(a, b);
  if (m == -std::numeric_limits<double>::infinity()) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// log-sum-exp of f(c) over c in [0, C)
template <typename F>
double lse_of(int64_t C, F f) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < C; ++c) m = std::max(m, f(c));
  if (m == -std::numeric_limits<double>::infinity()) return m;
  double l = 0;
  for (int64_t c = 0; c < C; ++c) l += std::exp(f(c) - m);
  return m + std::log(l);
}

template <typename s_t, typename u_t, typename acc_t>
void forward_kernel(const s_t* S, const u_t* U, uint64_t seed, const RowLayout& L, const NldParams& P, acc_t* rows,
                    acc_t* stats) {
  at::parallel_for(0, L.T * L.B, 1, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t t = r / L.B, b = r % L.B, C = L.C;
      const s_t* s = S + t * L.s.t + b * L.s.b;
      const u_t* u = U + t * L.u.t + b * L.u.b;
      const uint64_t base = static_cast<uint64_t>(r) * C;
      auto z = [&](int64_t c) { return static_cast<double>(s[c * L.s.c]); };
      auto eps = [&](int64_t c) { return static_cast<double>(philox_randn(seed, base + c)); };
      double mean = 0;
      for (int64_t c = 0; c < C; ++c) mean += z(c);
      mean /= C;
      double m2 = 0;
      for (int64_t c = 0; c < C; ++c) m2 += (z(c) - mean) * (z(c) - mean);
      const double scale = P.adaptive ? (C > 1 ? m2 / (C - 1) : 0.0) : P.noise_std;
      const double lse_p = lse_of(C, [&](int64_t c) { return static_cast<double>(u[c * L.u.c]) * P.inv_tau; });
      double lse_q, lse_r = 0;
      if (P.additive) {
        lse_q = lse_of(C, [&](int64_t c) { return (z(c) + P.noise_std * eps(c)) * P.inv_tau; });
      } else {
        lse_q = lse_of(C, [&](int64_t c) { return z(c) * P.inv_tau; });
        lse_r = lse_of(C, [&](int64_t c) { return (mean + eps(c) * scale) * P.inv_tau; });
      }
      double kl = 0;
      for (int64_t c = 0; c < C; ++c) {
        const double log_p = static_cast<double>(u[c * L.u.c]) * P.inv_tau - lse_p;
        const double e = eps(c);
        const double log_ps = P.additive ? (z(c) + P.noise_std * e) * P.inv_tau - lse_q
                                         : logaddexp(P.log_w + z(c) * P.inv_tau - lse_q,
                                                     P.log_1mw + (mean + e * scale) * P.inv_tau - lse_r);
        const double p = std::exp(log_p);
        if (p != 0) kl += p * (log_p - log_ps);  // != 0, not > 0: a NaN p (NaN/+inf logit) makes the row NaN
      }
      rows[r] = static_cast<acc_t>(P.tau * P.tau * kl);
      acc_t* stat = stats + r * kNldStats;
      const double values[kNldStats] = {mean, scale, lse_q, lse_r, lse_p, kl};
      for (int k = 0; k < kNldStats; ++k) stat[k] = static_cast<acc_t>(values[k]);
    }
  });
}

template <typename s_t, typename u_t, typename acc_t>
void backward_kernel(const acc_t* grad_rows, const s_t* S, const u_t* U, uint64_t seed, const acc_t* stats,
                     const RowLayout& L, const NldParams& P, s_t* grad_s, u_t* grad_u, bool teacher_per_t) {
  // One sample per task, its T rows in order: a [B, C] teacher's gradient is summed over t in a
  // double buffer (deterministic).
  at::parallel_for(0, L.B, 1, [&](int64_t b_begin, int64_t b_end) {
    const int64_t C = L.C;
    std::vector<double> teacher_sum(grad_u && !teacher_per_t ? C : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(teacher_sum.begin(), teacher_sum.end(), 0.0);
      for (int64_t t = 0; t < L.T; ++t) {
        const int64_t r = t * L.B + b;
        const s_t* s = S + t * L.s.t + b * L.s.b;
        const u_t* u = U + t * L.u.t + b * L.u.b;
        const uint64_t base = static_cast<uint64_t>(r) * C;
        const acc_t* stat = stats + r * kNldStats;
        const double mean = stat[0], scale = stat[1], lse_q = stat[2], lse_r = stat[3], lse_p = stat[4], kl = stat[5];
        const double g_row = static_cast<double>(grad_rows[r]);
        auto z = [&](int64_t c) { return static_cast<double>(s[c * L.s.c]); };
        auto log_ps_of = [&](int64_t c, double e) {
          return P.additive ? (z(c) + P.noise_std * e) * P.inv_tau - lse_q
                            : logaddexp(P.log_w + z(c) * P.inv_tau - lse_q,
                                        P.log_1mw + (mean + e * scale) * P.inv_tau - lse_r);
        };
        // Products with A = p_t / p_s are formed in the log domain with their weight folded in: w q A and
        // (1 - w) r A are at most p_t, whereas q * exp(log A) is 0 * inf = NaN once q underflows.
        double sum_wqa = 0, sum_mra = 0, sum_mrae = 0, sum_re = 0;
        if (!P.additive) {
          for (int64_t c = 0; c < C; ++c) {
            const double e = philox_randn(seed, base + c);
            const double log_q = z(c) * P.inv_tau - lse_q, log_r = (mean + e * scale) * P.inv_tau - lse_r;
            const double log_a = static_cast<double>(u[c * L.u.c]) * P.inv_tau - lse_p -
                                 logaddexp(P.log_w + log_q, P.log_1mw + log_r);
            const double mra = std::exp(P.log_1mw + log_r + log_a);
            sum_wqa += std::exp(P.log_w + log_q + log_a);
            sum_mra += mra;
            sum_mrae += mra * e;
            sum_re += std::exp(log_r) * e;
          }
        }
        const double sum_g_eps = -P.tau * (sum_mrae - sum_mra * sum_re);
        const double var_coef = C > 1 ? 2.0 / (C - 1) : 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const double e = philox_randn(seed, base + c);
          const double log_p = static_cast<double>(u[c * L.u.c]) * P.inv_tau - lse_p;
          const double p = std::exp(log_p);
          const double log_ps = log_ps_of(c, e);
          double g_s;
          if (P.additive) {
            g_s = P.tau * (std::exp(log_ps) - p);
          } else {
            const double log_q = z(c) * P.inv_tau - lse_q;
            // -w tau q (A - sum q A), written as -tau (w q A - q sum w q A)
            g_s = -P.tau * (std::exp(P.log_w + log_q + log_p - log_ps) - std::exp(log_q) * sum_wqa);
            if (P.adaptive) g_s += var_coef * sum_g_eps * (z(c) - mean);
          }
          grad_s[r * C + c] = static_cast<s_t>(g_s * g_row);
          if (grad_u) {
            const double g_u = p > 0 ? P.tau * g_row * p * (log_p - log_ps - kl) : 0.0;
            if (teacher_per_t) grad_u[r * C + c] = static_cast<u_t>(g_u);
            else teacher_sum[c] += g_u;
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
  const NldParams P = make_params(temperature, noise_weight, noise_std, adaptive, additive);
  const uint64_t s = read_seed(seed);
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_nld_forward_cpu", [&] {
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
  const NldParams P = make_params(temperature, noise_weight, noise_std, adaptive, additive);
  const uint64_t s = read_seed(seed);
  TORCH_CHECK(stats.scalar_type() == acc_dtype(student, teacher),
              "snnkd_fast::nld_rows_backward: stats must be in the inputs' accumulation dtype");
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_nld_backward_cpu", [&] {
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
