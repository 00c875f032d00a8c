// CPU kernels of the fused KD losses (per-timestep KL, TSER, HTA-KL). Parallel over samples b: a
// sample's teacher row is converted once into a per-thread buffer (with its log-sum-exp and, for
// HTA, its head mask), then each of its T student rows takes two vectorized passes (max; sums) and
// writes only per-row results: the loss [T, B] and the statistics [T, B, 5] the backward needs.
// The backward sums a [B, C] teacher's gradient over t in a per-thread buffer of one row.
// Arithmetic is in the accumulation type (float, or double for double inputs); the loops are
// `omp simd` reductions (lane-wise partial sums) and use fast_exp, so they vectorize.
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
  double temperature, entropy_temperature, entropy_weight, head_threshold;
};

template <typename F>
void with_loss(int64_t loss, F&& f) {
  switch (loss) {
    case kKL: f(std::integral_constant<int, kKL>{}); break;
    case kTSER: f(std::integral_constant<int, kTSER>{}); break;
    default: f(std::integral_constant<int, kHTA>{}); break;
  }
}

// One sample's working rows: the teacher's logits and head mask, the student's logits.
template <typename acc_t>
struct RowBuffers {
  std::vector<acc_t> z_u, z_s;
  std::vector<uint8_t> head;
  std::vector<int64_t> order;
  explicit RowBuffers(int64_t C) : z_u(C), z_s(C), head(C) {}
};

template <typename T_in, typename acc_t>
void load_row(const T_in* src, int64_t stride, int64_t C, acc_t* dst) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(src[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(src[c * stride]);
  }
}

template <typename acc_t>
acc_t log_sum_exp(const acc_t* z, int64_t C, acc_t scale) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) m = std::max(m, z[c] * scale);
  acc_t l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t c = 0; c < C; ++c) l += fast_exp(z[c] * scale - m);
  return m + std::log(l);
}

// HTA head of one teacher row (logits z_u, log-sum-exp lse_u at 1/tau = inv_tau): classes ordered by
// (logit descending, index ascending); the head is the prefix whose inclusive cumulative probability
// stays below the threshold, plus the top-1 class. Only as much of the order as needed is sorted
// (partial sorts of growing length: a confident teacher's head is a few classes). Writes the mask
// and (key_cross, idx_cross, idx_top); idx_cross = C and key_cross = INT32_MIN when the whole mass
// stays below the threshold (every class is head).
template <typename acc_t>
void hta_head(const acc_t* z_u, int64_t C, acc_t inv_tau, acc_t lse_u, double head_threshold,
              std::vector<int64_t>& order, uint8_t* head, int32_t* keys) {
  order.resize(C);
  std::iota(order.begin(), order.end(), 0);
  auto before = [&](int64_t a, int64_t b) { return z_u[a] > z_u[b] || (z_u[a] == z_u[b] && a < b); };
  int64_t cross = C;
  for (int64_t k = std::min<int64_t>(C, 64);; k = std::min<int64_t>(C, 8 * k)) {
    std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
    double cumulative = 0.0;
    for (int64_t i = 0; i < k && cross == C; ++i) {
      cumulative += static_cast<double>(fast_exp(z_u[order[i]] * inv_tau - lse_u));
      if (cumulative >= head_threshold) cross = i;
    }
    if (cross < C || k == C) break;
  }
  std::fill(head, head + C, cross == C ? uint8_t(1) : uint8_t(0));
  for (int64_t i = 0; i < cross && i < C; ++i) head[order[i]] = 1;
  head[order[0]] = 1;
  keys[kIdxTop] = static_cast<int32_t>(order[0]);
  keys[kIdxCross] = static_cast<int32_t>(cross == C ? C : order[cross]);
  keys[kKeyCross] = cross == C ? std::numeric_limits<int32_t>::min() : float_key(static_cast<float>(z_u[order[cross]]));
}

template <int LOSS, typename s_t, typename u_t, typename acc_t>
void forward_kernel(const s_t* S, Strides ss, const u_t* U, Strides us, bool teacher_per_t, int64_t T, int64_t B,
                    int64_t C, const LossParams& lp, acc_t* rows, acc_t* stats, int32_t* hta_keys) {
  const acc_t inv_tau = acc_t(1.0 / lp.temperature), inv_tau_h = acc_t(1.0 / lp.entropy_temperature);
  const acc_t tau_sq = acc_t(lp.temperature * lp.temperature), entropy_weight = acc_t(lp.entropy_weight);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
    RowBuffers<acc_t> buf(C);
    acc_t* z_u = buf.z_u.data();
    acc_t* z_s = buf.z_s.data();
    const uint8_t* head = buf.head.data();
    for (int64_t b = b_begin; b < b_end; ++b) {
      acc_t lse_u = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t tt = teacher_per_t ? t : 0;
        if (t == 0 || teacher_per_t) {  // the teacher's row: converted, normalised and masked once
          load_row(U + tt * us.t + b * us.b, us.c, C, z_u);
          lse_u = log_sum_exp(z_u, C, inv_tau);
          if (LOSS == kHTA) {
            hta_head(z_u, C, inv_tau, lse_u, lp.head_threshold, buf.order, buf.head.data(),
                     hta_keys + (tt * B + b) * kHtaNum);
          }
        }
        load_row(S + t * ss.t + b * ss.b, ss.c, C, z_s);
        acc_t m_s = neg_inf, m_h = neg_inf;
#pragma omp simd reduction(max : m_s, m_h)
        for (int64_t c = 0; c < C; ++c) {
          m_s = std::max(m_s, z_s[c] * inv_tau);
          m_h = std::max(m_h, z_s[c] * inv_tau_h);
        }
        // sum p (u - s) with p already normalised; a zero probability adds nothing (xlogy)
        acc_t l_s = 0, pu_diff = 0, qs_diff = 0, l_h = 0, qh_s = 0;
#pragma omp simd reduction(+ : l_s, pu_diff, qs_diff, l_h, qh_s)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t s = z_s[c] * inv_tau, u = z_u[c] * inv_tau;
          const acc_t e_s = fast_exp(s - m_s);
          const acc_t p = fast_exp(u - lse_u);
          l_s += e_s;
          pu_diff += xmul(p, u - s);
          if (LOSS == kHTA) qs_diff += xmul(e_s, s - u);
          if (LOSS == kTSER) {
            const acc_t s_h = z_s[c] * inv_tau_h;
            const acc_t e_h = fast_exp(s_h - m_h);
            l_h += e_h;
            qh_s += xmul(e_h, s_h);
          }
        }
        const acc_t lse_s = m_s + std::log(l_s);
        const acc_t kl_f = pu_diff - lse_u + lse_s;
        acc_t loss = tau_sq * kl_f, aux0 = 0, aux1 = 0;
        if (LOSS == kTSER) {
          const acc_t lse_h = m_h + std::log(l_h);
          const acc_t entropy = lse_h - qh_s / l_h;
          loss -= entropy_weight * entropy;
          aux0 = lse_h;
          aux1 = entropy;
        } else if (LOSS == kHTA) {
          const acc_t kl_r = qs_diff / l_s - lse_s + lse_u;
          acc_t gap_head = 0, gap_all = 0;
#pragma omp simd reduction(+ : gap_head, gap_all)
          for (int64_t c = 0; c < C; ++c) {
            const acc_t gap = std::fabs(fast_exp(z_u[c] * inv_tau - lse_u) - fast_exp(z_s[c] * inv_tau - lse_s));
            gap_all += gap;
            gap_head += head[c] ? gap : acc_t(0);
          }
          const acc_t w_head = gap_all > 0 ? gap_head / gap_all : acc_t(0.5);
          loss = tau_sq * (w_head * kl_f + (1 - w_head) * kl_r);
          aux0 = w_head;
          aux1 = kl_r;
        }
        const int64_t row = t * B + b;
        rows[row] = loss;
        acc_t* stat = stats + row * kNumStats;
        stat[kLseS] = lse_s;
        stat[kLseU] = lse_u;
        stat[kKlF] = kl_f;
        stat[kAux0] = aux0;
        stat[kAux1] = aux1;
      }
    }
  });
}

template <int LOSS, typename s_t, typename u_t, typename acc_t>
void backward_kernel(const acc_t* grad_rows, const s_t* S, Strides ss, const u_t* U, Strides us, bool teacher_per_t,
                     int64_t T, int64_t B, int64_t C, const LossParams& lp, const acc_t* stats, s_t* grad_s,
                     u_t* grad_u) {
  const acc_t inv_tau = acc_t(1.0 / lp.temperature), tau = acc_t(lp.temperature);
  const acc_t inv_tau_h = acc_t(1.0 / lp.entropy_temperature), entropy_weight = acc_t(lp.entropy_weight);
  at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
    RowBuffers<acc_t> buf(C);
    acc_t* z_u = buf.z_u.data();
    acc_t* z_s = buf.z_s.data();
    std::vector<acc_t> teacher_sum(grad_u && !teacher_per_t ? C : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(teacher_sum.begin(), teacher_sum.end(), acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = t * B + b;
        const acc_t* stat = stats + row * kNumStats;
        const RowStats<acc_t> r{stat[kLseS], stat[kLseU], stat[kKlF], stat[kAux0], stat[kAux1]};
        const acc_t g_row = grad_rows[row];
        if (t == 0 || teacher_per_t) load_row(U + (teacher_per_t ? t : 0) * us.t + b * us.b, us.c, C, z_u);
        load_row(S + t * ss.t + b * ss.b, ss.c, C, z_s);
        s_t* gs = grad_s + row * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          gs[c] = static_cast<s_t>(g_row * grad_student<acc_t>(LOSS, z_s[c], z_u[c], r, inv_tau, tau, inv_tau_h,
                                                               entropy_weight));
        }
        if (grad_u && teacher_per_t) {
          u_t* gu = grad_u + row * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gu[c] = static_cast<u_t>(g_row * grad_teacher<acc_t>(LOSS, z_s[c], z_u[c], r, inv_tau, tau));
        } else if (grad_u) {
          acc_t* sum = teacher_sum.data();
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) sum[c] += g_row * grad_teacher<acc_t>(LOSS, z_s[c], z_u[c], r, inv_tau, tau);
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
  const LossParams lp{temperature, entropy_temperature, entropy_weight, head_threshold};
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_forward_cpu", [&] {
    with_loss(loss, [&](auto loss_kind) {
      forward_kernel<decltype(loss_kind)::value, s_t, u_t, acc_t>(
          student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C, lp, rows.data_ptr<acc_t>(),
          stats.data_ptr<acc_t>(), keys.data_ptr<int32_t>());
    });
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
  const LossParams lp{temperature, entropy_temperature, entropy_weight, 0.5};
  TORCH_CHECK(stats.scalar_type() == acc_dtype(student, teacher),
              "snnkd_fast::kd_rows_backward: stats must be in the inputs' accumulation dtype");
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_backward_cpu", [&] {
    with_loss(loss, [&](auto loss_kind) {
      backward_kernel<decltype(loss_kind)::value, s_t, u_t, acc_t>(
          grad_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C, lp,
          stats.data_ptr<acc_t>(), grad_student.data_ptr<s_t>(),
          teacher_grad ? grad_teacher.data_ptr<u_t>() : nullptr);
    });
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
