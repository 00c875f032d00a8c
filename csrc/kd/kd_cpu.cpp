// CPU kernels of the fused KD losses (per-timestep KL, TSER, HTA-KL). Parallel over samples b: a
// sample's teacher row is turned once into per-thread buffers of its log-probabilities and
// probabilities (and, for HTA, its head mask), which all T of its student rows then reuse; each student
// row takes two vectorized passes (max; sums, one exp per element; HTA two more for its weights; KL
// and TSER rows of a [B, C] teacher four at a time, interleaved: row_group_sums) and writes only
// per-row results: the loss [T, B] and the statistics [T, B, 5] the backward needs. The
// backward takes one pass per student row (one exp per element) and sums a [B, C] teacher's gradient
// over t in a per-thread row. Arithmetic is in the accumulation type (float, or double for double
// inputs) with fast_exp; the forward's rows are padded to whole vectors and summed in explicit lanes
// (kd_cpu_rows.h: at SNN class counts the per-row costs GCC leaves otherwise dominate).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kd_cpu_rows.h"

namespace snnkd {
namespace kd {
namespace {

struct LossParams {
  double temperature, entropy_temperature, entropy_weight, head_threshold;
};

// The sums of a student row's forward pass against its sample's teacher (p, u = z_t / tau):
// l_s = sum e^{s - m_s}, kl_sum = sum p (u - s), and for TSER qh_s = sum e^{s - m_s} s.
template <typename acc_t>
struct RowSums {
  acc_t z_max, l_s, kl_sum, qh_s;
};

// The KL/TSER forward's two passes (max; sums) over R student rows of one sample against its
// teacher, interleaved: one row's pass at C = 100 is a chain of dependent steps (max, exps, lane
// sums, log) that leaves the core mostly idle; kRowGroup independent chains side by side fill it.
// Each row's sums keep the single-row order (the same lanes, the same steps): the same bits for
// every R. R = 1 serves the rows left over and per-timestep teachers.
constexpr int kRowGroup = 4;

// A student row as whole vectors of kRowLanes logits: the input's own memory up to `full` when it is
// contiguous acc_t, then its last partial vector from `tail`, padded with -inf (as padded_row_buffer);
// other inputs converted into a padded buffer (full = n). Copying a contiguous float row whole cost
// more than the pass over it: kd_rows_forward [16, 512, 1000] took 1.4x as long as [16, 512, 1008],
// which needed no copy.
template <typename acc_t>
struct RowBlocks {
  const acc_t* z = nullptr;
  int64_t full = 0;
  acc_t tail[kRowLanes];
  const acc_t* block(int64_t i) const { return i < full ? z + i : tail; }
};

// Whether load_row_blocks reads a row of T_in in place (else it converts it into its buffer).
template <typename T_in, typename acc_t>
constexpr bool row_blocks_in_place(int64_t stride) {
  return std::is_same<T_in, acc_t>::value && stride == 1;
}

template <typename T_in, typename acc_t>
void load_row_blocks(const T_in* src, int64_t stride, int64_t C, int64_t n, acc_t* buf, RowBlocks<acc_t>& row) {
  if (row_blocks_in_place<T_in, acc_t>(stride)) {
    row.z = reinterpret_cast<const acc_t*>(src);
    row.full = C - C % kRowLanes;
    if (row.full == C) return;  // whole vectors: no tail
#pragma omp simd
    for (int64_t j = 0; j < kRowLanes; ++j) {
      row.tail[j] = row.full + j < C ? row.z[row.full + j] : -std::numeric_limits<acc_t>::infinity();
    }
  } else {
    row.z = row_as_acc(src, stride, C, n, buf);
    row.full = n;
  }
}

// One vector of R rows' max pass (z[r]: the rows' kRowLanes logits at this vector).
template <int R, typename acc_t>
inline void group_max_step(const acc_t* const (&z)[R], acc_t (&max_lanes)[R][kRowLanes]) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int j = 0; j < kRowLanes; ++j) max_lanes[r][j] = max_of(max_lanes[r][j], z[r][j]);
  }
}

// One vector of R rows' sums pass (z[r] as above; p and u at the same classes); STORE_E: also the
// exps e^{s - m_s} into e[r] (the precomputed gradient's, see forward_kernel).
template <int LOSS, int R, bool STORE_E, typename acc_t>
inline void group_sums_step(const acc_t* const (&z)[R], const acc_t* p, const acc_t* u, acc_t inv_tau,
                            const acc_t (&m_s)[R], acc_t (&l_lanes)[R][kRowLanes], acc_t (&kl_lanes)[R][kRowLanes],
                            acc_t (&qh_lanes)[R][kRowLanes], acc_t* const (&e)[R]) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int j = 0; j < kRowLanes; ++j) {
      const acc_t s = z[r][j] * inv_tau;
      const acc_t e_s = fast_exp(s - m_s[r]);
      if (STORE_E) e[r][j] = e_s;
      l_lanes[r][j] += e_s;
      kl_lanes[r][j] += xmul(p[j], u[j] - s);
      if (LOSS == kTSER) qh_lanes[r][j] += xmul(e_s, s);
    }
  }
}

// STORE_E: the exps of classes [0, C - C % kRowLanes) into e_rows[r], those of the last partial vector
// into e_tails[r] (kRowLanes entries: e_rows[r] may be the gradient's row, which ends at C).
template <int LOSS, int R, bool STORE_E, typename acc_t>
void row_group_sums(const RowBlocks<acc_t> (&rows)[R], int64_t n, int64_t C, acc_t inv_tau, const acc_t* p,
                    const acc_t* u, RowSums<acc_t> (&out)[R], acc_t* const (&e_rows)[R],
                    acc_t* const (&e_tails)[R]) {
  const int64_t full = rows[0].full;  // the same for every row of a group (one layout)
  acc_t max_lanes[R][kRowLanes];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kRowLanes; ++j) max_lanes[r][j] = -std::numeric_limits<acc_t>::infinity();
  }
  const acc_t* z[R];
  for (int64_t i = 0; i < full; i += kRowLanes) {
    for (int r = 0; r < R; ++r) z[r] = rows[r].z + i;
    group_max_step<R>(z, max_lanes);
  }
  if (full < n) {
    for (int r = 0; r < R; ++r) z[r] = rows[r].tail;
    group_max_step<R>(z, max_lanes);
  }
  acc_t m_s[R];
  for (int r = 0; r < R; ++r) {
    out[r].z_max = lane_max(max_lanes[r]);
    m_s[r] = out[r].z_max * inv_tau;
  }
  acc_t l_lanes[R][kRowLanes] = {}, kl_lanes[R][kRowLanes] = {}, qh_lanes[R][kRowLanes] = {};
  acc_t* e[R];
  for (int64_t i = 0; i < full; i += kRowLanes) {
    for (int r = 0; r < R; ++r) {
      z[r] = rows[r].z + i;
      e[r] = !STORE_E ? nullptr : i + kRowLanes <= C ? e_rows[r] + i : e_tails[r];
    }
    group_sums_step<LOSS, R, STORE_E>(z, p + i, u + i, inv_tau, m_s, l_lanes, kl_lanes, qh_lanes, e);
  }
  if (full < n) {
    for (int r = 0; r < R; ++r) {
      z[r] = rows[r].tail;
      e[r] = STORE_E ? e_tails[r] : nullptr;
    }
    group_sums_step<LOSS, R, STORE_E>(z, p + full, u + full, inv_tau, m_s, l_lanes, kl_lanes, qh_lanes, e);
  }
  for (int r = 0; r < R; ++r) {
    out[r].l_s = lane_sum(l_lanes[r]);
    out[r].kl_sum = lane_sum(kl_lanes[r]);
    out[r].qh_s = LOSS == kTSER ? lane_sum(qh_lanes[r]) : acc_t(0);
  }
}

// A student row's gradient at grad_rows = row_weight from its forward, into out[0, C): q = e * inv_l_s
// from the sums pass's exps e = e^{s - m_s} (no exp of its own) -- classes [0, C - C % kRowLanes) in
// e_main, which may be `out` itself (each class read before it is written), the rest in e_tail --, the
// teacher's p and u = z_u / tau as the forward loaded them, the row statistics r. kd_math.h's
// per-element formulas; TSER only with the entropy's softmax the KL's (tau_H = tau). Not inlined, so
// that the forward kernel's own loops stay as GCC vectorized them (a first version with the gradient
// loop inlined left the HTA forward 2.7x slower).
template <int LOSS, typename acc_t>
SNNKD_NOINLINE void gradient_row_from_exps(const acc_t* z, const acc_t* e_main, const acc_t* e_tail, int64_t C,
                                           const acc_t* p, const acc_t* u, const RowStats<acc_t>& r, acc_t inv_l_s,
                                           acc_t inv_tau, acc_t tau, acc_t entropy_weight, acc_t row_weight,
                                           acc_t* out) {
  const acc_t lse_s = r.lse_s, lse_u = r.lse_u;
  auto grad = [=](acc_t z_c, acc_t e_c, int64_t c) {
    const acc_t q = e_c * inv_l_s;
    const acc_t log_q = z_c * inv_tau - lse_s;
    acc_t g = grad_student_kl<acc_t>(LOSS, log_q, q, u[c] - lse_u, p[c], r, tau);
    if (LOSS == kTSER) g += grad_student_entropy<acc_t>(log_q, q, r, inv_tau, entropy_weight);
    return row_weight * g;
  };
  const int64_t full = C - C % kRowLanes;
#pragma omp simd
  for (int64_t c = 0; c < full; ++c) out[c] = grad(z[c], e_main[c], c);
  for (int64_t c = full; c < C; ++c) out[c] = grad(z[c], e_tail[c - full], c);
}

// grad_s (nullptr: none): also the student's gradient at grad_rows = row_weight ([T, B, C], contiguous,
// in the accumulation type), each row from the exps of its sums pass while they are in cache
// (gradient_row_from_exps): the eager path's precomputed gradient (kd_rows_forward_student_grad_cpu).
// Not for TSER at tau_H != tau (the entropy's softmax would need its own exps).
template <int LOSS, typename s_t, typename u_t, typename acc_t>
void forward_kernel(const s_t* S, Strides ss, const u_t* U, Strides us, bool teacher_per_t, int64_t T, int64_t B,
                    int64_t C, const LossParams& lp, acc_t* rows, acc_t* stats, int32_t* hta_keys, acc_t* grad_s,
                    acc_t row_weight) {
  const acc_t inv_tau = acc_t(1.0 / lp.temperature), inv_tau_h = acc_t(1.0 / lp.entropy_temperature);
  const acc_t tau = acc_t(lp.temperature), tau_sq = acc_t(lp.temperature * lp.temperature);
  const acc_t entropy_weight = acc_t(lp.entropy_weight);
  // TSER at its default entropy temperature tau_H = tau: the entropy reuses the KL's softmax
  const bool entropy_shares_softmax = lp.entropy_temperature == lp.temperature;
  at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
    TeacherRow<acc_t> teacher(C, LOSS == kHTA, TeacherUse::kUAndP);
    const int64_t n = teacher.n;  // the loops' width: C, or C padded to whole vectors (kd_cpu_rows.h)
    // student rows as acc_t where the input is not (kd_cpu_rows.h, row_as_acc): kRowGroup of them at a
    // time for KL/TSER
    const bool rows_in_place = row_blocks_in_place<s_t, acc_t>(ss.c);
    std::vector<std::vector<acc_t>> row_bufs(LOSS == kHTA ? 1 : kRowGroup,
                                             rows_in_place ? std::vector<acc_t>() : padded_row_buffer<acc_t>(C));
    std::vector<acc_t> e_buf(LOSS == kHTA ? n : 0);
    const acc_t* u = teacher.u.data();
    const acc_t* p = teacher.p.data();
    acc_t* e_s_row = e_buf.data();
    // row (t, b)'s gradient from its exps (after finish_row stored its statistics); the KL/TSER rows
    // keep theirs in the gradient's row itself, but for the last partial vector (grad_e_tails)
    acc_t grad_e_tails[kRowGroup][kRowLanes];
    auto gradient_row = [&](int64_t t, int64_t b, const acc_t* z, const acc_t* e_main, const acc_t* e_tail,
                            acc_t l_s) {
      const int64_t row = t * B + b;
      const acc_t* stat = stats + row * kNumStats;
      const RowStats<acc_t> r{stat[kLseS], stat[kLseU], stat[kKlF], stat[kAux0], stat[kAux1]};
      gradient_row_from_exps<LOSS>(z, e_main, e_tail, C, p, u, r, acc_t(1) / l_s, inv_tau, tau, entropy_weight,
                                   row_weight, grad_s + row * C);
    };

    // The rest of row (t, b) from its sums (and, for TSER at tau_H != tau and HTA, its logits z):
    // the loss and the statistics the backward needs.
    auto finish_row = [&](int64_t t, int64_t b, const RowBlocks<acc_t>& z_row, const RowSums<acc_t>& sums,
                          acc_t rev_sum) {
      const acc_t m_s = sums.z_max * inv_tau, l_s = sums.l_s;
      acc_t qh_s = sums.qh_s, l_h = 0;
      // lse_s - lse_u as (m_s - max_u) + log(l_s / sum_u): when q ~ p (a small KL) the two
      // log-sum-exps nearly cancel, and the log of their ratio keeps the digits they would lose.
      // lse_s itself is then lse_u + lse_gap: one log per row, not two, for one more rounding.
      const acc_t lse_gap = (m_s - teacher.max_u) + std::log(l_s / teacher.sum_u);
      const acc_t lse_s = teacher.lse_u + lse_gap;
      const acc_t kl_f = sums.kl_sum + lse_gap;
      acc_t loss = tau_sq * kl_f, aux0 = 0, aux1 = 0;
      if (LOSS == kTSER) {
        acc_t lse_h = lse_s;
        if (entropy_shares_softmax) {
          l_h = l_s;
        } else {
          const acc_t m_h = sums.z_max * inv_tau_h;
          acc_t lh_lanes[kRowLanes] = {}, qhh_lanes[kRowLanes] = {};
          for (int64_t i = 0; i < n; i += kRowLanes) {
            const acc_t* z = z_row.block(i);
#pragma omp simd
            for (int j = 0; j < kRowLanes; ++j) {
              const acc_t s_h = z[j] * inv_tau_h;
              const acc_t e_h = fast_exp(s_h - m_h);
              lh_lanes[j] += e_h;
              qhh_lanes[j] += xmul(e_h, s_h);
            }
          }
          l_h = lane_sum(lh_lanes);
          qh_s = lane_sum(qhh_lanes);
          lse_h = m_h + std::log(l_h);
        }
        const acc_t entropy = lse_h - qh_s / l_h;
        loss -= entropy_weight * entropy;
        aux0 = lse_h;
        aux1 = entropy;
      } else if (LOSS == kHTA) {
        const acc_t kl_r = rev_sum / l_s - lse_gap;
        const acc_t inv_l_s = acc_t(1) / l_s;
        const acc_t* head = teacher.head.data();
        acc_t head_lanes[kRowLanes] = {}, all_lanes[kRowLanes] = {};
        for (int64_t i = 0; i < n; i += kRowLanes) {
#pragma omp simd
          for (int j = 0; j < kRowLanes; ++j) {
            const int64_t c = i + j;
            const acc_t gap = std::fabs(p[c] - e_s_row[c] * inv_l_s);
            all_lanes[j] += gap;
            head_lanes[j] += head[c] != acc_t(0) ? gap : acc_t(0);
          }
        }
        const acc_t gap_head = lane_sum(head_lanes), gap_all = lane_sum(all_lanes);
        const acc_t w_head = gap_all > 0 ? gap_head / gap_all : acc_t(0.5);
        loss = tau_sq * (w_head * kl_f + (1 - w_head) * kl_r);
        aux0 = w_head;
        aux1 = kl_r;
      }
      const int64_t row = t * B + b;
      rows[row] = loss;
      acc_t* stat = stats + row * kNumStats;
      stat[kLseS] = lse_s;
      stat[kLseU] = teacher.lse_u;
      stat[kKlF] = kl_f;
      stat[kAux0] = aux0;
      stat[kAux1] = aux1;
    };

    // KL/TSER rows t0 .. t0 + R - 1 of sample b against the loaded teacher
    auto kl_rows = [&](int64_t b, int64_t t0, auto rows) {
      constexpr int R = decltype(rows)::value;
      RowBlocks<acc_t> z[R];
      for (int r = 0; r < R; ++r) load_row_blocks(S + (t0 + r) * ss.t + b * ss.b, ss.c, C, n, row_bufs[r].data(), z[r]);
      RowSums<acc_t> sums[R];
      acc_t* e[R];
      acc_t* e_tail[R];
      for (int r = 0; r < R; ++r) {
        e[r] = grad_s != nullptr ? grad_s + ((t0 + r) * B + b) * C : nullptr;
        e_tail[r] = grad_e_tails[r];
      }
      if (grad_s != nullptr) {
        row_group_sums<LOSS, R, true>(z, n, C, inv_tau, p, u, sums, e, e_tail);
      } else {
        row_group_sums<LOSS, R, false>(z, n, C, inv_tau, p, u, sums, e, e_tail);
      }
      for (int r = 0; r < R; ++r) finish_row(t0 + r, b, z[r], sums[r], acc_t(0));
      if (grad_s != nullptr) {
        for (int r = 0; r < R; ++r) gradient_row(t0 + r, b, z[r].z, e[r], e_tail[r], sums[r].l_s);
      }
    };

    for (int64_t b = b_begin; b < b_end; ++b) {
      if (LOSS != kHTA) {
        // a [B, C] teacher's rows kRowGroup at a time, the rest (and per-timestep teachers') one by one
        if (!teacher_per_t) teacher.load(U + b * us.b, us.c, C, inv_tau, false);
        for (int64_t t = 0; t < T;) {
          if (teacher_per_t) {
            teacher.load(U + t * us.t + b * us.b, us.c, C, inv_tau, false);
          } else if (t + kRowGroup <= T) {
            kl_rows(b, t, std::integral_constant<int, kRowGroup>{});
            t += kRowGroup;
            continue;
          }
          kl_rows(b, t, std::integral_constant<int, 1>{});
          ++t;
        }
        continue;
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t tt = teacher_per_t ? t : 0;
        if (t == 0 || teacher_per_t) {
          teacher.load(U + tt * us.t + b * us.b, us.c, C, inv_tau, true);
          teacher.select_head(C, lp.head_threshold, hta_keys + (tt * B + b) * kHtaNum);
        }
        RowBlocks<acc_t> z_row;  // in place up to z_row.full, then its padded tail (as the KL rows)
        load_row_blocks(S + t * ss.t + b * ss.b, ss.c, C, n, row_bufs[0].data(), z_row);
        const int64_t full = z_row.full;
        const acc_t max_full = row_max(z_row.z, full);
        RowSums<acc_t> sums{full < n ? max_of(max_full, row_max(z_row.tail, kRowLanes)) : max_full, 0, 0, 0};
        // HTA keeps e^{s - m} for its weights: stored by a function of its own, since inside this
        // function GCC vectorized neither the reduction loop with that store nor a loop of its own.
        // l_s = sum e^{s - m}; kl_sum = sum p (u - s), KL(p||q) = kl_sum + lse_s - lse_u (the
        // multiplicands stay small: sum p (log p - s) would scale p's rounding by |log p|); a zero
        // probability adds nothing (xlogy)
        const acc_t m_s = sums.z_max * inv_tau;
        scaled_exp_row(z_row.z, full, inv_tau, m_s, e_s_row);
        if (full < n) scaled_exp_row(z_row.tail, kRowLanes, inv_tau, m_s, e_s_row + full);
        acc_t l_lanes[kRowLanes] = {}, kl_lanes[kRowLanes] = {}, rev_lanes[kRowLanes] = {};
        for (int64_t i = 0; i < n; i += kRowLanes) {
          const acc_t* z = z_row.block(i);
#pragma omp simd
          for (int j = 0; j < kRowLanes; ++j) {
            const int64_t c = i + j;
            const acc_t s = z[j] * inv_tau;
            const acc_t e_s = e_s_row[c];
            l_lanes[j] += e_s;
            kl_lanes[j] += xmul(p[c], u[c] - s);
            rev_lanes[j] += xmul(e_s, s - u[c]);
          }
        }
        sums.l_s = lane_sum(l_lanes);
        sums.kl_sum = lane_sum(kl_lanes);
        finish_row(t, b, z_row, sums, lane_sum(rev_lanes));
        if (grad_s != nullptr) gradient_row(t, b, z_row.z, e_s_row, e_s_row + (C - C % kRowLanes), sums.l_s);
      }
    }
  });
}

// Few classes (lane_rows_pay): the rows of kLaneRows samples side by side, one per vector lane.
// A row of 10 or 100 logits leaves the row kernel above with per-row work the row cannot amortise --
// the lane reductions (max, sums), a log and a division, the padding of the last vector -- a
// dependent chain of ~200 cycles per row at C = 10. Here a block of samples is transposed into
// [C][kLaneRows] buffers (the conversion to acc_t and any strides absorbed by that copy), so every
// per-row step runs for kLaneRows rows at once in a plain vector loop over the lanes, and the loops
// over the classes are sequences of whole-vector operations. KL and TSER (HTA selects a head per
// teacher row: the row kernel). Same formulas as forward_kernel; the sums run over classes in order
// (the row kernel sums in lanes), so the two agree to rounding, not bit for bit.
constexpr int64_t kLaneRows = kRowLanes;
// Where lane rows pay, measured (forward op, [4, 128, C], 2 threads, row kernel -> lane rows): C = 10
// 25 -> 11 us, 16: 15 -> 14, 20-28: 25-27 -> 16-20, 32: 17 -> 21, 40: 32 -> 25, 64: 22 -> 34, 100:
// 38 -> 50 (the scalar transposition into the block grows with C; the row kernel is at its best
// when C is a whole number of vectors: no padded copy of the row).
inline bool lane_rows_pay(int64_t C) { return C <= kLaneRows || (C < 3 * kLaneRows && C % kRowLanes != 0); }

// The backward's (op, [4, 128, C], 2 threads): C = 10 15 -> 10 us (T = 16: 27 -> 21), 16: 12 -> 12,
// 20: 17 -> 13, 32: 13 -> 16, 40: 15 -> 20, 100: 28 -> 37 (its row kernel reads unpadded rows).
inline bool lane_rows_pay_backward(int64_t C) { return C < 2 * kLaneRows; }

// dst[c * kLaneRows + r] = src row (b0 + r)'s logit c, as acc_t; rows from `rows` on are zero.
template <typename T_in, typename acc_t>
inline void load_lane_block(const T_in* src, int64_t stride_b, int64_t stride_c, int64_t rows, int64_t C,
                            acc_t* dst) {
  for (int64_t r = 0; r < kLaneRows; ++r) {
    if (r < rows) {
      const T_in* row = src + r * stride_b;
      for (int64_t c = 0; c < C; ++c) dst[c * kLaneRows + r] = static_cast<acc_t>(row[c * stride_c]);
    } else {
      for (int64_t c = 0; c < C; ++c) dst[c * kLaneRows + r] = acc_t(0);
    }
  }
}

// out[r] = max over the classes of a block's lane r (see max_of for NaN).
template <typename acc_t>
inline void lane_rows_max(const acc_t* x, int64_t C, acc_t* out) {
#pragma omp simd
  for (int64_t r = 0; r < kLaneRows; ++r) out[r] = x[r];
  for (int64_t c = 1; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < kLaneRows; ++r) out[r] = max_of(out[r], x[c * kLaneRows + r]);
  }
}

template <int LOSS, typename s_t, typename u_t, typename acc_t>
void forward_kernel_lane_rows(const s_t* S, Strides ss, const u_t* U, Strides us, bool teacher_per_t, int64_t T,
                              int64_t B, int64_t C, const LossParams& lp, acc_t* rows, acc_t* stats) {
  static_assert(LOSS != kHTA, "HTA takes the row kernel");
  constexpr int64_t L = kLaneRows;
  const acc_t inv_tau = acc_t(1.0 / lp.temperature), inv_tau_h = acc_t(1.0 / lp.entropy_temperature);
  const acc_t tau_sq = acc_t(lp.temperature * lp.temperature), entropy_weight = acc_t(lp.entropy_weight);
  const bool entropy_shares_softmax = lp.entropy_temperature == lp.temperature;
  const int64_t num_blocks = (B + L - 1) / L;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    // [C][L] each: the teacher's u = z/tau and p, the student block's logits
    std::vector<acc_t> u_buf(C * L), p_buf(C * L), z_buf(C * L);
    acc_t* u = u_buf.data();
    acc_t* p = p_buf.data();
    acc_t* z = z_buf.data();
    acc_t max_u[L], sum_u[L], lse_u[L];
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t b0 = block * L;
      const int64_t nb = std::min(L, B - b0);
      for (int64_t t = 0; t < T; ++t) {
        if (t == 0 || teacher_per_t) {
          load_lane_block(U + (teacher_per_t ? t : 0) * us.t + b0 * us.b, us.b, us.c, nb, C, u);
          acc_t m[L], l[L];
          lane_rows_max(u, C, m);
#pragma omp simd
          for (int64_t r = 0; r < L; ++r) {
            m[r] *= inv_tau;  // rounding is monotone: max(z) / tau = max(z / tau)
            l[r] = acc_t(0);
          }
          for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
            for (int64_t r = 0; r < L; ++r) {
              u[c * L + r] *= inv_tau;
              l[r] += fast_exp(u[c * L + r] - m[r]);
            }
          }
#pragma omp simd
          for (int64_t r = 0; r < L; ++r) {
            max_u[r] = m[r];
            sum_u[r] = l[r];
            lse_u[r] = m[r] + fast_log(l[r]);
          }
          for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
            for (int64_t r = 0; r < L; ++r) p[c * L + r] = fast_exp(u[c * L + r] - lse_u[r]);
          }
        }
        load_lane_block(S + t * ss.t + b0 * ss.b, ss.b, ss.c, nb, C, z);
        acc_t z_max[L], m_s[L], l_s[L], kl_sum[L], qh_s[L];
        lane_rows_max(z, C, z_max);
#pragma omp simd
        for (int64_t r = 0; r < L; ++r) {
          m_s[r] = z_max[r] * inv_tau;
          l_s[r] = kl_sum[r] = qh_s[r] = acc_t(0);
        }
        // l_s = sum e^{s - m}; kl_sum = sum p (u - s) (see forward_kernel); TSER: qh_s = sum e^{s - m} s
        for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
          for (int64_t r = 0; r < L; ++r) {
            const acc_t s = z[c * L + r] * inv_tau;
            const acc_t e_s = fast_exp(s - m_s[r]);
            l_s[r] += e_s;
            kl_sum[r] += xmul(p[c * L + r], u[c * L + r] - s);
            if (LOSS == kTSER) qh_s[r] += xmul(e_s, s);
          }
        }
        acc_t loss[L], lse_s[L], kl_f[L], aux0[L], aux1[L];
#pragma omp simd
        for (int64_t r = 0; r < L; ++r) {
          // lse_s - lse_u as (m_s - max_u) + log(l_s / sum_u): see forward_kernel
          const acc_t lse_gap = (m_s[r] - max_u[r]) + fast_log(l_s[r] / sum_u[r]);
          lse_s[r] = lse_u[r] + lse_gap;
          kl_f[r] = kl_sum[r] + lse_gap;
          loss[r] = tau_sq * kl_f[r];
          aux0[r] = aux1[r] = acc_t(0);
        }
        if (LOSS == kTSER) {
          acc_t l_h[L], qhh[L], m_h[L];
          if (entropy_shares_softmax) {
#pragma omp simd
            for (int64_t r = 0; r < L; ++r) {
              l_h[r] = l_s[r];
              qhh[r] = qh_s[r];
              aux0[r] = lse_s[r];  // lse_h
            }
          } else {
#pragma omp simd
            for (int64_t r = 0; r < L; ++r) {
              m_h[r] = z_max[r] * inv_tau_h;
              l_h[r] = qhh[r] = acc_t(0);
            }
            for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
              for (int64_t r = 0; r < L; ++r) {
                const acc_t s_h = z[c * L + r] * inv_tau_h;
                const acc_t e_h = fast_exp(s_h - m_h[r]);
                l_h[r] += e_h;
                qhh[r] += xmul(e_h, s_h);
              }
            }
#pragma omp simd
            for (int64_t r = 0; r < L; ++r) aux0[r] = m_h[r] + fast_log(l_h[r]);
          }
#pragma omp simd
          for (int64_t r = 0; r < L; ++r) {
            const acc_t entropy = aux0[r] - qhh[r] / l_h[r];
            loss[r] -= entropy_weight * entropy;
            aux1[r] = entropy;
          }
        }
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t row = t * B + b0 + r;
          rows[row] = loss[r];
          acc_t* stat = stats + row * kNumStats;
          stat[kLseS] = lse_s[r];
          stat[kLseU] = lse_u[r];
          stat[kKlF] = kl_f[r];
          stat[kAux0] = aux0[r];
          stat[kAux1] = aux1[r];
        }
      }
    }
  });
}

// The backward in lane rows (see forward_kernel_lane_rows), when the teacher needs no gradient: one
// exp per element as in backward_kernel, the teacher's log-probabilities from its saved log-sum-exp
// (one exp per teacher element and block), the gradient transposed back into the student's rows.
template <int LOSS, typename s_t, typename u_t, typename acc_t>
void backward_kernel_lane_rows(const acc_t* grad_rows, const s_t* S, Strides ss, const u_t* U, Strides us,
                               bool teacher_per_t, int64_t T, int64_t B, int64_t C, const LossParams& lp,
                               const acc_t* stats, s_t* grad_s) {
  constexpr int64_t L = kLaneRows;
  const acc_t inv_tau = acc_t(1.0 / lp.temperature), tau = acc_t(lp.temperature);
  const acc_t inv_tau_h = acc_t(1.0 / lp.entropy_temperature), entropy_weight = acc_t(lp.entropy_weight);
  const bool entropy_shares_softmax = lp.entropy_temperature == lp.temperature;
  const int64_t num_blocks = (B + L - 1) / L;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> log_p_buf(C * L), p_buf(C * L), z_buf(C * L);
    acc_t* log_p = log_p_buf.data();
    acc_t* p = p_buf.data();
    acc_t* z = z_buf.data();  // the student block's logits, then its gradient
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t b0 = block * L;
      const int64_t nb = std::min(L, B - b0);
      for (int64_t t = 0; t < T; ++t) {
        acc_t lse_s[L], lse_u[L], kl_f[L], aux0[L], aux1[L], g_row[L];
        for (int64_t r = 0; r < L; ++r) {
          const int64_t row = t * B + b0 + std::min(r, nb - 1);  // padding lanes repeat the last row
          const acc_t* stat = stats + row * kNumStats;
          lse_s[r] = stat[kLseS];
          lse_u[r] = stat[kLseU];
          kl_f[r] = stat[kKlF];
          aux0[r] = stat[kAux0];
          aux1[r] = stat[kAux1];
          g_row[r] = r < nb ? grad_rows[row] : acc_t(0);
        }
        if (t == 0 || teacher_per_t) {
          load_lane_block(U + (teacher_per_t ? t : 0) * us.t + b0 * us.b, us.b, us.c, nb, C, log_p);
          for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
            for (int64_t r = 0; r < L; ++r) {
              log_p[c * L + r] = log_p[c * L + r] * inv_tau - lse_u[r];
              p[c * L + r] = fast_exp(log_p[c * L + r]);
            }
          }
        }
        load_lane_block(S + t * ss.t + b0 * ss.b, ss.b, ss.c, nb, C, z);
        // TSER's entropy softmax shared with the KL's or not: a compile-time choice, since a branch on
        // it inside the loop kept GCC from vectorizing it (TSER's backward ran 3.7-4.6x KL's at C = 10)
        auto student_gradients = [&](auto shares_softmax) {
          for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
            for (int64_t r = 0; r < L; ++r) {
              const RowStats<acc_t> rs{lse_s[r], lse_u[r], kl_f[r], aux0[r], aux1[r]};
              const acc_t zc = z[c * L + r];
              const acc_t log_q = zc * inv_tau - rs.lse_s;
              const acc_t q = fast_exp(log_q);
              acc_t g = grad_student_kl<acc_t>(LOSS, log_q, q, log_p[c * L + r], p[c * L + r], rs, tau);
              if constexpr (LOSS == kTSER && decltype(shares_softmax)::value) {
                g += grad_student_entropy<acc_t>(log_q, q, rs, inv_tau_h, entropy_weight);
              } else if constexpr (LOSS == kTSER) {
                const acc_t log_qh = zc * inv_tau_h - rs.aux0;
                g += grad_student_entropy<acc_t>(log_qh, fast_exp(log_qh), rs, inv_tau_h, entropy_weight);
              }
              z[c * L + r] = g_row[r] * g;
            }
          }
        };
        if (entropy_shares_softmax) {
          student_gradients(std::true_type{});
        } else {
          student_gradients(std::false_type{});
        }
        for (int64_t r = 0; r < nb; ++r) {
          s_t* gs = grad_s + (t * B + b0 + r) * C;
          for (int64_t c = 0; c < C; ++c) gs[c] = static_cast<s_t>(z[c * L + r]);
        }
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
  const bool entropy_shares_softmax = lp.entropy_temperature == lp.temperature;
  at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
    // No padding here (loops over C): without row reductions the scalar remainder costs less
    // than copying a padded row in and its gradient out (measured at C = 10 and 1000).
    TeacherRow<acc_t> teacher(C, false, TeacherUse::kLogPAndP);
    std::vector<acc_t> s_buf(C);
    std::vector<acc_t> teacher_sum(grad_u && !teacher_per_t ? C : 0);
    const acc_t* log_p = teacher.log_p.data();
    const acc_t* p = teacher.p.data();
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(teacher_sum.begin(), teacher_sum.end(), acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = t * B + b;
        const acc_t* stat = stats + row * kNumStats;
        const RowStats<acc_t> r{stat[kLseS], stat[kLseU], stat[kKlF], stat[kAux0], stat[kAux1]};
        const acc_t g_row = grad_rows[row];
        // the teacher's log-probabilities are recomputed from the stored lse_u (once per teacher row, not per t)
        if (t == 0 || teacher_per_t) {
          teacher.load_from_lse(U + (teacher_per_t ? t : 0) * us.t + b * us.b, us.c, C, inv_tau, r.lse_u);
        }
        const acc_t* z = row_as_acc(S + t * ss.t + b * ss.b, ss.c, C, C, s_buf.data());
        s_t* gs = grad_s + row * C;
        if (LOSS == kTSER && !entropy_shares_softmax) {
          row_map(z, C, gs, [=](acc_t z_c, int64_t c) {
            const acc_t log_q = z_c * inv_tau - r.lse_s, log_qh = z_c * inv_tau_h - r.aux0;
            const acc_t g = grad_student_kl<acc_t>(LOSS, log_q, fast_exp(log_q), log_p[c], p[c], r, tau) +
                            grad_student_entropy<acc_t>(log_qh, fast_exp(log_qh), r, inv_tau_h, entropy_weight);
            return g_row * g;
          });
        } else {
          row_map(z, C, gs, [=](acc_t z_c, int64_t c) {
            const acc_t log_q = z_c * inv_tau - r.lse_s;
            const acc_t q = fast_exp(log_q);
            acc_t g = grad_student_kl<acc_t>(LOSS, log_q, q, log_p[c], p[c], r, tau);
            if (LOSS == kTSER) g += grad_student_entropy<acc_t>(log_q, q, r, inv_tau_h, entropy_weight);
            return g_row * g;
          });
        }
        if (grad_u) {
          auto teacher_grad = [&](int64_t c) {
            const acc_t log_q = z[c] * inv_tau - r.lse_s;
            return g_row * grad_teacher_kl<acc_t>(LOSS, log_q, LOSS == kHTA ? fast_exp(log_q) : acc_t(0), log_p[c],
                                                  p[c], r, tau);
          };
          add_teacher_grad_row(teacher_per_t, teacher_per_t ? grad_u + row * C : nullptr, teacher_sum.data(), C,
                               teacher_grad);
        }
      }
      if (grad_u && !teacher_per_t) {
        for (int64_t c = 0; c < C; ++c) grad_u[b * C + c] = static_cast<u_t>(teacher_sum[c]);
      }
    }
  });
}

// The forward op; with student_grad also the student's gradient at grad_rows = row_weight where the
// forward can form it from its own exps (kd_cpu_forms_student_grad; forward_kernel), else undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_impl(
    const at::Tensor& student, const at::Tensor& teacher, int64_t loss, double temperature,
    double entropy_temperature, double entropy_weight, double head_threshold, bool student_grad,
    double row_weight) {
  const RowLayout L = row_layout(student, teacher, "snnkd_fast::kd_rows_forward");
  const Strides ss = L.s, us = L.u;
  const bool per_t = L.teacher_per_t;
  TORCH_CHECK(loss >= kKL && loss <= kHTA, "snnkd_fast::kd_rows_forward: unknown loss id");
  const int64_t T = L.T, B = L.B, C = L.C;
  const at::ScalarType acc = acc_dtype(student, teacher);
  auto acc_options = student.options().dtype(acc);
  at::Tensor rows = at::empty({T, B}, acc_options);
  at::Tensor stats = at::empty({T, B, kNumStats}, acc_options);
  at::Tensor keys = at::empty({loss == kHTA ? (per_t ? T : 1) : 0, B, kHtaNum}, student.options().dtype(at::kInt));
  at::Tensor grad;
  if (rows.numel() == 0) return {rows, stats, keys, grad};
  const bool row_kernel = loss == kHTA || !lane_rows_pay(C);
  if (student_grad && kd_cpu_forms_student_grad(student, teacher, loss, temperature, entropy_temperature)) {
    grad = at::empty(student.sizes(), student.options());
  }
  const LossParams lp{temperature, entropy_temperature, entropy_weight, head_threshold};
  SNNKD_KD_DISPATCH_PAIR(student, teacher, "snnkd_kd_forward_cpu", [&] {
    with_loss_kind(loss, [&](auto loss_kind) {
      constexpr int kind = decltype(loss_kind)::value;
      if constexpr (kind != kHTA) {
        if (!row_kernel) {
          forward_kernel_lane_rows<kind, s_t, u_t, acc_t>(student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us,
                                                          per_t, T, B, C, lp, rows.data_ptr<acc_t>(),
                                                          stats.data_ptr<acc_t>());
          return;
        }
      }
      forward_kernel<kind, s_t, u_t, acc_t>(student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C,
                                            lp, rows.data_ptr<acc_t>(), stats.data_ptr<acc_t>(),
                                            keys.data_ptr<int32_t>(), grad.defined() ? grad.data_ptr<acc_t>() : nullptr,
                                            acc_t(row_weight));
    });
  });
  return {rows, stats, keys, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                   int64_t loss, double temperature,
                                                                   double entropy_temperature, double entropy_weight,
                                                                   double head_threshold) {
  auto [rows, stats, keys, grad] = kd_rows_forward_impl(student, teacher, loss, temperature, entropy_temperature,
                                                        entropy_weight, head_threshold, false, 1.0);
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
    with_loss_kind(loss, [&](auto loss_kind) {
      if (!teacher_grad && lane_rows_pay_backward(C)) {
        backward_kernel_lane_rows<decltype(loss_kind)::value, s_t, u_t, acc_t>(
            grad_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C, lp,
            stats.data_ptr<acc_t>(), grad_student.data_ptr<s_t>());
        return;
      }
      backward_kernel<decltype(loss_kind)::value, s_t, u_t, acc_t>(
          grad_rows.data_ptr<acc_t>(), student.data_ptr<s_t>(), ss, teacher.data_ptr<u_t>(), us, per_t, T, B, C, lp,
          stats.data_ptr<acc_t>(), grad_student.data_ptr<s_t>(),
          teacher_grad ? grad_teacher.data_ptr<u_t>() : nullptr);
    });
  });
  return {grad_student, grad_teacher};
}

}  // namespace

bool kd_cpu_forms_student_grad(const at::Tensor& student, const at::Tensor& teacher, int64_t loss,
                               double temperature, double entropy_temperature) {
  return (loss == kHTA || !lane_rows_pay(student.size(-1))) && student.scalar_type() == acc_dtype(student, teacher) &&
         !(loss == kTSER && entropy_temperature != temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_rows_forward_student_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher, int64_t loss, double temperature,
    double entropy_temperature, double entropy_weight, double head_threshold, double row_weight) {
  RECORD_FUNCTION("snnkd_fast::kd_rows_forward_student_grad", std::vector<c10::IValue>({student, teacher}));
  return kd_rows_forward_impl(student, teacher, loss, temperature, entropy_temperature, entropy_weight,
                              head_threshold, true, row_weight);
}

}  // namespace kd
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CPU, m) {
  m.impl("kd_rows_forward", &snnkd::kd::kd_rows_forward_cpu);
  m.impl("kd_rows_backward", &snnkd::kd::kd_rows_backward_cpu);
}
