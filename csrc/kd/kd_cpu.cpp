// CPU kernels of the fused KD losses (per-timestep KL, TSER, HTA-KL). Parallel over samples b; each
// sample's T student rows are processed against its teacher row with two passes per row (max, then
// sums accumulated in double) and only per-row results are written: the loss [T, B] and the
// statistics [T, B, 5] the backward needs. The backward accumulates a [B, C] teacher's gradient
// over t in a per-thread double buffer of one row. Inputs are read through their strides.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "kd_ops.h"

namespace snnkd {
namespace kd {
namespace {

struct LossParams {
  int loss;
  double temperature, entropy_temperature, entropy_weight, head_threshold;
};

// HTA head of one teacher row: sort classes by (logit descending, index ascending), find where the
// inclusive cumulative probability first reaches the threshold. out = (key_cross, idx_cross, idx_top);
// idx_cross = C (and key_cross = INT32_MIN) when the whole mass stays below it.
template <typename u_t>
void hta_teacher_row(const u_t* u, int64_t u_sc, int64_t C, double inv_tau, double head_threshold,
                     std::vector<int64_t>& order, int32_t* out) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(u[c * u_sc]) * inv_tau);
  double l = 0.0;
  for (int64_t c = 0; c < C; ++c) l += std::exp(static_cast<double>(u[c * u_sc]) * inv_tau - m);
  const double lse = m + std::log(l);
  order.resize(C);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const double za = static_cast<double>(u[a * u_sc]), zb = static_cast<double>(u[b * u_sc]);
    return za > zb || (za == zb && a < b);
  });
  out[kIdxTop] = static_cast<int32_t>(order[0]);
  out[kKeyCross] = std::numeric_limits<int32_t>::min();
  out[kIdxCross] = static_cast<int32_t>(C);
  double cumulative = 0.0;
  for (int64_t k = 0; k < C; ++k) {
    const int64_t c = order[k];
    cumulative += std::exp(static_cast<double>(u[c * u_sc]) * inv_tau - lse);
    if (cumulative >= head_threshold) {
      out[kKeyCross] = float_key(static_cast<float>(u[c * u_sc]));
      out[kIdxCross] = static_cast<int32_t>(c);
      break;
    }
  }
}

template <typename s_t, typename u_t, typename acc_t>
void forward_kernel(const s_t* S, Strides ss, const u_t* U, Strides us, bool teacher_per_t, int64_t T, int64_t B,
                    int64_t C, const LossParams& lp, acc_t* rows, acc_t* stats, int32_t* hta_keys) {
  const double inv_tau = 1.0 / lp.temperature, inv_tau_h = 1.0 / lp.entropy_temperature;
  const double tau_sq = lp.temperature * lp.temperature;
  const int64_t teacher_rows = teacher_per_t ? T : 1;
  at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<int64_t> order;
    for (int64_t b = b_begin; b < b_end; ++b) {
      if (lp.loss == kHTA) {
        for (int64_t tt = 0; tt < teacher_rows; ++tt) {
          hta_teacher_row(U + tt * us.t + b * us.b, us.c, C, inv_tau, lp.head_threshold, order,
                          hta_keys + (tt * B + b) * kHtaNum);
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const s_t* s = S + t * ss.t + b * ss.b;
        const int64_t tt = teacher_per_t ? t : 0;
        const u_t* u = U + tt * us.t + b * us.b;
        double m_s = -std::numeric_limits<double>::infinity(), m_u = m_s, m_h = m_s;
        for (int64_t c = 0; c < C; ++c) {
          const double zs = static_cast<double>(s[c * ss.c]);
          m_s = std::max(m_s, zs * inv_tau);
          m_h = std::max(m_h, zs * inv_tau_h);
          m_u = std::max(m_u, static_cast<double>(u[c * us.c]) * inv_tau);
        }
        // Sums relative to the maxima; a -inf class contributes 0 (its factor e^{x - m} is 0).
        double l_s = 0, l_u = 0, l_h = 0, pu_diff = 0, qs_diff = 0, qh_s = 0;
        for (int64_t c = 0; c < C; ++c) {
          const double zs = static_cast<double>(s[c * ss.c]);
          const double sv = zs * inv_tau, uv = static_cast<double>(u[c * us.c]) * inv_tau;
          const double e_s = std::exp(sv - m_s), e_u = std::exp(uv - m_u);
          l_s += e_s;
          l_u += e_u;
          pu_diff += xmul(e_u, uv - sv);
          if (lp.loss == kHTA) qs_diff += xmul(e_s, sv - uv);
          if (lp.loss == kTSER) {
            const double sh = zs * inv_tau_h, e_h = std::exp(sh - m_h);
            l_h += e_h;
            qh_s += xmul(e_h, sh);
          }
        }
        const double lse_s = m_s + std::log(l_s), lse_u = m_u + std::log(l_u);
        const double kl_f = pu_diff / l_u - lse_u + lse_s;
        double loss = tau_sq * kl_f, aux0 = 0, aux1 = 0;
        if (lp.loss == kTSER) {
          const double lse_h = m_h + std::log(l_h);
          const double entropy = lse_h - qh_s / l_h;
          loss -= lp.entropy_weight * entropy;
          aux0 = lse_h;
          aux1 = entropy;
        } else if (lp.loss == kHTA) {
          const double kl_r = qs_diff / l_s - lse_s + lse_u;
          const int32_t* hta = hta_keys + (tt * B + b) * kHtaNum;
          const int64_t cross = hta[kIdxCross];
          const double z_cross = cross < C ? static_cast<double>(u[cross * us.c]) : 0.0;
          double gap_head = 0, gap_all = 0;
          for (int64_t c = 0; c < C; ++c) {
            const double z = static_cast<double>(u[c * us.c]);
            const double gap = std::fabs(std::exp(z * inv_tau - lse_u) -
                                         std::exp(static_cast<double>(s[c * ss.c]) * inv_tau - lse_s));
            const bool head = cross >= C || z > z_cross || (z == z_cross && c < cross) || c == hta[kIdxTop];
            gap_all += gap;
            if (head) gap_head += gap;
          }
          const double w_head = gap_all > 0 ? gap_head / gap_all : 0.5;
          loss = tau_sq * (w_head * kl_f + (1 - w_head) * kl_r);
          aux0 = w_head;
          aux1 = kl_r;
        }
        const int64_t row = t * B + b;
        rows[row] = static_cast<acc_t>(loss);
        acc_t* stat = stats + row * kNumStats;
        stat[kLseS] = static_cast<acc_t>(lse_s);
        stat[kLseU] = static_cast<acc_t>(lse_u);
        stat[kKlF] = static_cast<acc_t>(kl_f);
        stat[kAux0] = static_cast<acc_t>(aux0);
        stat[kAux1] = static_cast<acc_t>(aux1);
      }
    }
  });
}

template <typename s_t, typename u_t, typename acc_t>
void backward_kernel(const acc_t* grad_rows, const s_t* S, Strides ss, const u_t* U, Strides us, bool teacher_per_t,
                     int64_t T, int64_t B, int64_t C, const LossParams& lp, const acc_t* stats, s_t* grad_s,
                     u_t* grad_u) {
  const acc_t inv_tau = acc_t(1.0 / lp.temperature), tau = acc_t(lp.temperature);
  const acc_t inv_tau_h = acc_t(1.0 / lp.entropy_temperature), entropy_weight = acc_t(lp.entropy_weight);
  at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<double> teacher_sum(grad_u && !teacher_per_t ? C : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(teacher_sum.begin(), teacher_sum.end(), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = t * B + b;
        const acc_t* stat = stats + row * kNumStats;
        const RowStats<acc_t> r{stat[kLseS], stat[kLseU], stat[kKlF], stat[kAux0], stat[kAux1]};
        const acc_t g_row = grad_rows[row];
        const s_t* s = S + t * ss.t + b * ss.b;
        const u_t* u = U + (teacher_per_t ? t : 0) * us.t + b * us.b;
        s_t* gs = grad_s + row * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t zs = static_cast<acc_t>(s[c * ss.c]), zu = static_cast<acc_t>(u[c * us.c]);
          gs[c] = static_cast<s_t>(g_row * grad_student<acc_t>(lp.loss, zs, zu, r, inv_tau, tau, inv_tau_h,
                                                               entropy_weight));
          if (grad_u) {
            const acc_t gu = g_row * grad_teacher<acc_t>(lp.loss, zs, zu, r, inv_tau, tau);
            if (teacher_per_t) grad_u[row * C + c] = static_cast<u_t>(gu);
            else teacher_sum[c] += static_cast<double>(gu);
          }
        }
      }
      if (grad_u && !teacher_per_t) {
        for (int64_t c = 0; c < C; ++c) grad_u[b * C + c] = static_cast<u_t>(teacher_sum[c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                   int64_t loss, double temperature,
                                                                   double entropy_temperature, double entropy_weight,
                                                                   double head_threshold) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::kd_rows_forward");
  const Strides ss = L.s, us = L.u;
  const bool per_t = L.teacher_per_t;
  TORCH_CHECK(loss >= kKL && loss <= kHTA, "snnkd_fast::kd_rows_forward: unknown loss id");
  const int64_t T = L.T, B = L.B, C = L.C;
  auto acc_options = student.options().dtype(acc_dtype(student, teacher));
  at::Tensor rows = at::empty({T, B}, acc_options);
  at::Tensor stats = at::empty({T, B, kNumStats}, acc_options);
  at::Tensor keys = at::empty({loss == kHTA ? (per_t ? T : 1) : 0, B, kHtaNum}, student.options().dtype(at::kInt));
  if (rows.numel() == 0) return {rows, stats, keys};
  const LossParams lp{static_cast<int>(loss), temperature, entropy_temperature, entropy_weight, head_threshold};
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_forward_cpu", [&] {
    forward_kernel<s_t, u_t, acc_t>(student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C, lp,
                                    rows.data_ptr<acc_t>(), stats.data_ptr<acc_t>(), keys.data_ptr<int32_t>());
  });
  return {rows, stats, keys};
}

std::tuple<at::Tensor, at::Tensor> kd_rows_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& student,
                                                        const at::Tensor& teacher, const at::Tensor& stats,
                                                        const at::Tensor& keys, int64_t loss, double temperature,
                                                        double entropy_temperature, double entropy_weight,
                                                        bool teacher_grad) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::kd_rows_backward");
  const Strides ss = L.s, us = L.u;
  const bool per_t = L.teacher_per_t;
  TORCH_CHECK(loss >= kKL && loss <= kHTA, "snnkd_fast::kd_rows_backward: unknown loss id");
  const int64_t T = L.T, B = L.B, C = L.C;
  TORCH_CHECK(grad_rows.is_contiguous() && grad_rows.numel() == T * B && stats.is_contiguous() &&
                  stats.numel() == T * B * kNumStats && grad_rows.scalar_type() == stats.scalar_type(),
              "snnkd_fast::kd_rows_backward: grad_rows [T, B] and stats [T, B, 5] must be contiguous, one dtype");
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty(teacher.sizes(), teacher.options())
                                         : at::empty({0}, teacher.options());
  if (grad_student.numel() == 0) {
    grad_teacher.zero_();
    return {grad_student, grad_teacher};
  }
  const LossParams lp{static_cast<int>(loss), temperature, entropy_temperature, entropy_weight, 0.5};
  TORCH_CHECK(stats.scalar_type() == acc_dtype(student, teacher),
              "snnkd_fast::kd_rows_backward: stats must be in the inputs' accumulation dtype");
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_backward_cpu", [&] {
    backward_kernel<s_t, u_t, acc_t>(grad_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), ss,
                                     teacher.data_ptr<u_t>(), us, per_t, T, B, C, lp, stats.data_ptr<acc_t>(),
                                     grad_student.data_ptr<s_t>(), teacher_grad ? grad_teacher.data_ptr<u_t>() : nullptr);
  });
  return {grad_student, grad_teacher};
}

}  // namespace
}  // namespace kd
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CPU, m) {
  m.impl("kd_rows_forward", &snnkd::kd::kd_rows_forward_cpu);
  m.impl("kd_rows_backward", &snnkd::kd::kd_rows_backward_cpu);
}
