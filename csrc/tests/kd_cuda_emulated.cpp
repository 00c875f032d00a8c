// The CUDA KD-loss row kernels of csrc/kd/kd_cuda_kernels.cuh (HTA's teacher head, the KL / TSER /
// HTA-KL forward and backward, NLD's forward, row sums, backward and noise) run on the host under
// csrc/tests/cuda_emulation/ (each thread a fiber, barriers as on the device), behind a C interface
// that tests/test_cuda_emulated.py loads with ctypes and compares with the CPU ops. Student and
// teacher dtypes in the pairs of kDtypePairs (the 16-bit ones as c10::BFloat16 / c10::Half, the
// extension's types), contiguous, the teacher [Tt, B, C] with Tt = T or 1 ([B, C]: a t stride of 0);
// the launch geometry of csrc/kd/kd_cuda.cu and nld_cuda.cu (one block per row forward, one thread per (b, c)
// backward). Rows, statistics and the row gradient are in the pair's accumulation dtype.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cuda_emulation.h"  // the CUDA keywords as plain C++, before the kernels
#include "kd/kd_cuda_kernels.cuh"

namespace {

using namespace snnkd::kd;
using namespace snnkd::kd::cuda;

// HTA's teacher head alone into keys [rows, 3]: splits <= 1 one block per row of head_threads
// threads (hta_teacher_kernel), else the split head's launches for that many slices asked for
// (hta_head_slice; kd_cuda.cu asks for hta_head_splits). Returns the slices launched (1: one block
// per row).
template <typename u_t>
int64_t hta_head(const u_t* u, bool per_t, int64_t Tn, int64_t B, int64_t C, double temperature,
                 double head_threshold, int head_threads, int64_t splits, int32_t* keys) {
  const Strides us{per_t ? B * C : 0, C, 1};
  const int64_t rows = (per_t ? Tn : 1) * B;
  if (splits > 1) {
    const HtaSplit split = hta_split(rows, C, splits);
    const HtaSplitScratch layout = hta_split_scratch(split.rows, split.slices);
    // filled with 0xff (NaN doubles, -1 integers): a slot read before any block wrote it shows
    std::vector<std::max_align_t> scratch(layout.bytes / sizeof(std::max_align_t) + 1);
    std::memset(scratch.data(), 0xff, scratch.size() * sizeof(std::max_align_t));
    const auto launch = [](auto kernel, int64_t blocks, auto... args) {
      cuda_emulation::launch_cooperative<kThreads>(blocks, kernel, args...);
    };
    hta_split_head(launch, u, us, B, C, split, 1.0 / temperature, head_threshold,
                   reinterpret_cast<unsigned char*>(scratch.data()), keys);
    return split.slices;
  }
  if (head_threads == kHtaWideThreads) {
    cuda_emulation::launch_cooperative<kHtaWideThreads>(rows, hta_teacher_kernel<u_t, kHtaWideThreads>, u, us, B, C,
                                                        1.0 / temperature, head_threshold, keys);
  } else {
    cuda_emulation::launch_cooperative<kThreads>(rows, hta_teacher_kernel<u_t, kThreads>, u, us, B, C,
                                                 1.0 / temperature, head_threshold, keys);
  }
  return 1;
}

// kd_cuda.cu's choice of classes per access (allow_packed = false: one); returns the number used.
// The HTA head one block per row, of head_threads (kThreads or kHtaWideThreads: kd_cuda.cu picks by
// hta_head_threads; its split form is tested alone, emu_hta_head).
// grad_s (kd_cuda.cu's kd_rows_forward_student_grad_cuda): kd_forward_student_grad_kernel, which also
// writes the student's gradient [T, B, C] at a row gradient of grad_weight.
template <typename s_t, typename u_t, int LOSS>
int forward(const s_t* s, const u_t* u, bool per_t, int64_t Tn, int64_t B, int64_t C, double temperature,
            double entropy_temperature, double entropy_weight, double head_threshold, acc_type_t<s_t, u_t>* rows,
            acc_type_t<s_t, u_t>* stats, int32_t* keys, bool allow_packed, int head_threads,
            s_t* grad_s = nullptr, double grad_weight = 0.0) {
  using acc_t = acc_type_t<s_t, u_t>;
  const Strides ss{B * C, C, 1}, us{per_t ? B * C : 0, C, 1};
  if (LOSS == kHTA) hta_head(u, per_t, Tn, B, C, temperature, head_threshold, head_threads, 1, keys);
  constexpr int kVec = kd_forward_pack<s_t, u_t>();
  const bool packed = allow_packed && kd_rows_packable(kVec, s, sizeof(s_t), ss, u, sizeof(u_t), us, C);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
  const acc_t inv_tau_h = static_cast<acc_t>(1.0 / entropy_temperature);
  const acc_t tau_sq = static_cast<acc_t>(temperature * temperature);
  const int32_t* hta_keys = LOSS == kHTA ? static_cast<const int32_t*>(keys) : nullptr;
  const auto launch = [&](auto kernel, auto... grad_args) {  // the gradient-forming kernel takes three more
    cuda_emulation::launch_cooperative<kThreads>(Tn * B, kernel, s, ss, u, us, per_t, B, C, inv_tau, inv_tau_h, tau_sq,
                                                 static_cast<acc_t>(entropy_weight), hta_keys, rows, stats,
                                                 grad_args...);
  };
  if (grad_s != nullptr) {
    launch(packed ? kd_forward_student_grad_kernel<s_t, u_t, LOSS, kVec>
                  : kd_forward_student_grad_kernel<s_t, u_t, LOSS, 1>,
           static_cast<acc_t>(temperature), static_cast<acc_t>(grad_weight), grad_s);
  } else {
    launch(packed ? kd_forward_kernel<s_t, u_t, LOSS, kVec> : kd_forward_kernel<s_t, u_t, LOSS, 1>);
  }
  return packed ? kVec : 1;
}

// kd_cuda.cu's choice of classes per thread (allow_packed = false: one, whatever the rows allow);
// returns the number it launched with.
template <typename s_t, typename u_t, int LOSS>
int backward(const acc_type_t<s_t, u_t>* grad_rows, const s_t* s, const u_t* u, bool per_t, int64_t Tn, int64_t B,
             int64_t C, const acc_type_t<s_t, u_t>* stats, double temperature, double entropy_temperature,
             double entropy_weight, s_t* grad_s, u_t* grad_u, bool allow_packed) {
  using acc_t = acc_type_t<s_t, u_t>;
  const Strides ss{B * C, C, 1}, us{per_t ? B * C : 0, C, 1};
  constexpr int kVec = kd_rows_pack<s_t, u_t>();
  const bool packed = allow_packed && kd_rows_packable(kVec, s, sizeof(s_t), ss, u, sizeof(u_t), us, C);
  const int vec = packed ? kVec : 1;
  const auto kernel = packed ? kd_backward_kernel<s_t, u_t, LOSS, kVec> : kd_backward_kernel<s_t, u_t, LOSS, 1>;
  cuda_emulation::launch<kThreads>((B * C / vec + kThreads - 1) / kThreads, kernel, grad_rows, s, ss, u, us, per_t,
                                   Tn, B, C, stats, static_cast<acc_t>(1.0 / temperature),
                                   static_cast<acc_t>(temperature), static_cast<acc_t>(1.0 / entropy_temperature),
                                   static_cast<acc_t>(entropy_weight), grad_s, grad_u);
  return vec;
}

// grad_s: nld_forward_student_grad_kernel, which also writes the student's gradient [T, B, C] at a row
// gradient of grad_weight.
template <typename s_t, typename u_t>
void nld_forward(const s_t* s, const u_t* u, bool per_t, int64_t Tn, int64_t B, int64_t C, const int64_t* seed,
                 const NldParams<acc_type_t<s_t, u_t>>& P, double temperature, acc_type_t<s_t, u_t>* rows,
                 acc_type_t<s_t, u_t>* stats, s_t* grad_s = nullptr, double grad_weight = 0.0) {
  using acc_t = acc_type_t<s_t, u_t>;
  const Strides ss{B * C, C, 1}, us{per_t ? B * C : 0, C, 1};
  const acc_t tau_sq = static_cast<acc_t>(temperature * temperature);
  const auto launch = [&](auto kernel, auto... grad_args) {  // the gradient-forming kernel takes two more
    cuda_emulation::launch_cooperative<kThreads>(Tn * B, kernel, s, ss, u, us, B, C, seed, P, tau_sq, rows, stats,
                                                 grad_args...);
  };
  if (grad_s != nullptr) {
    launch(nld_forward_student_grad_kernel<s_t, u_t>, static_cast<acc_t>(grad_weight), grad_s);
  } else {
    launch(nld_forward_kernel<s_t, u_t>);
  }
}

template <typename s_t, typename u_t>
void nld_backward(const acc_type_t<s_t, u_t>* grad_rows, const s_t* s, const u_t* u, bool per_t, int64_t Tn,
                  int64_t B, int64_t C, const int64_t* seed, const NldParams<acc_type_t<s_t, u_t>>& P,
                  const acc_type_t<s_t, u_t>* stats, s_t* grad_s, u_t* grad_u) {
  using acc_t = acc_type_t<s_t, u_t>;
  const Strides ss{B * C, C, 1}, us{per_t ? B * C : 0, C, 1};
  std::vector<acc_t> sums(P.additive ? 0 : Tn * B * kNldSums);
  if (!P.additive) {
    cuda_emulation::launch_cooperative<kThreads>(Tn * B, nld_row_sums_kernel<s_t, u_t>, s, ss, u, us, B, C, seed, P,
                                                 stats, sums.data());
  }
  cuda_emulation::launch<kThreads>((B * nld_quads(C) + kThreads - 1) / kThreads, nld_backward_kernel<s_t, u_t>,
                                   grad_rows, s, ss, u, us, per_t, Tn, B, C, seed, P, stats,
                                   P.additive ? static_cast<const acc_t*>(nullptr) : sums.data(), grad_s, grad_u);
}

// A (student, teacher) dtype pair and its accumulation dtype.
template <typename S, typename U>
struct DtypePair {
  using student = S;
  using teacher = U;
  using acc = acc_type_t<S, U>;
};

// The pairs by index: tests/test_cuda_emulated.py's KD_DTYPE_PAIRS.
template <typename F>
bool with_dtype_pair(int pair, F&& f) {
  switch (pair) {
    case 0: f(DtypePair<float, float>{}); return true;
    case 1: f(DtypePair<double, double>{}); return true;
    case 2: f(DtypePair<c10::BFloat16, float>{}); return true;  // an AMP student, a float32 teacher
    case 3: f(DtypePair<c10::BFloat16, c10::BFloat16>{}); return true;
    case 4: f(DtypePair<c10::Half, c10::Half>{}); return true;
    default: return false;
  }
}

// noise_std < 0: the adaptive scale.
template <typename A>
NldParams<A> nld_params(double temperature, double noise_weight, double noise_std, int additive) {
  return make_nld_params<A>(temperature, noise_weight, noise_std < 0 ? 0.0 : noise_std, noise_std < 0, additive != 0);
}

}  // namespace

extern "C" {

// loss 0 KL, 1 TSER, 2 HTA (kd_math.h). rows [T, B], stats [T, B, 5], keys [Tt, B, 3] (HTA) in the
// layout of snnkd_fast::kd_rows_forward.
// allow_packed 0: one class per access; *vec_used: the classes per access it ran with; head_threads:
// the HTA head's block size (kThreads or kHtaWideThreads).
// grad_s non-null: also the student's gradient [T, B, C] at a row gradient of grad_weight (in the
// student's dtype; kd_forward_student_grad_kernel).
int emu_kd_rows_forward_student_grad(int dtype_pair, int loss, const void* s, const void* u, int per_t, int64_t T,
                                     int64_t B, int64_t C, double temperature, double entropy_temperature,
                                     double entropy_weight, double head_threshold, void* rows, void* stats,
                                     int32_t* keys, int allow_packed, int32_t* vec_used, int head_threads,
                                     void* grad_s, double grad_weight) {
  if (loss < kKL || loss > kHTA || (head_threads != kThreads && head_threads != kHtaWideThreads)) return 1;
  const bool known = with_dtype_pair(dtype_pair, [&](auto pair) {
    using S = typename decltype(pair)::student;
    using U = typename decltype(pair)::teacher;
    using A = typename decltype(pair)::acc;
    with_loss_kind(loss, [&](auto loss_c) {
      *vec_used = forward<S, U, decltype(loss_c)::value>(
          static_cast<const S*>(s), static_cast<const U*>(u), per_t != 0, T, B, C, temperature, entropy_temperature,
          entropy_weight, head_threshold, static_cast<A*>(rows), static_cast<A*>(stats), keys, allow_packed != 0,
          head_threads, static_cast<S*>(grad_s), grad_weight);
    });
  });
  return known ? 0 : 1;
}

int emu_kd_rows_forward(int dtype_pair, int loss, const void* s, const void* u, int per_t, int64_t T, int64_t B,
                        int64_t C, double temperature, double entropy_temperature, double entropy_weight,
                        double head_threshold, void* rows, void* stats, int32_t* keys, int allow_packed,
                        int32_t* vec_used, int head_threads) {
  return emu_kd_rows_forward_student_grad(dtype_pair, loss, s, u, per_t, T, B, C, temperature, entropy_temperature,
                                          entropy_weight, head_threshold, rows, stats, keys, allow_packed, vec_used,
                                          head_threads, nullptr, 0.0);
}

// scale_unless_one_kernel over n elements of grad (grad_dtype 0 float, 1 double, 2 bfloat16, 3 half)
// with one scale (float, or double if scale_double), in a grid of `blocks` blocks.
int emu_scale_unless_one(int grad_dtype, void* grad, int64_t n, const void* scale, int scale_double, int64_t blocks) {
  const auto run = [&](auto* typed) {
    using G = std::remove_pointer_t<decltype(typed)>;
    if (scale_double) {
      cuda_emulation::launch<kThreads>(blocks, scale_unless_one_kernel<G, double>, typed, n,
                                       static_cast<const double*>(scale));
    } else {
      cuda_emulation::launch<kThreads>(blocks, scale_unless_one_kernel<G, float>, typed, n,
                                       static_cast<const float*>(scale));
    }
  };
  switch (grad_dtype) {
    case 0: run(static_cast<float*>(grad)); return 0;
    case 1: run(static_cast<double*>(grad)); return 0;
    case 2: run(static_cast<c10::BFloat16*>(grad)); return 0;
    case 3: run(static_cast<c10::Half*>(grad)); return 0;
    default: return 1;
  }
}

// grad_u null: no teacher gradient. allow_packed 0: one class per thread; *vec_used: the classes
// per thread it ran with.
int emu_kd_rows_backward(int dtype_pair, int loss, const void* grad_rows, const void* s, const void* u, int per_t,
                         int64_t T, int64_t B, int64_t C, const void* stats, double temperature,
                         double entropy_temperature, double entropy_weight, void* grad_s, void* grad_u,
                         int allow_packed, int32_t* vec_used) {
  if (loss < kKL || loss > kHTA) return 1;
  const bool known = with_dtype_pair(dtype_pair, [&](auto pair) {
    using S = typename decltype(pair)::student;
    using U = typename decltype(pair)::teacher;
    using A = typename decltype(pair)::acc;
    with_loss_kind(loss, [&](auto loss_c) {
      *vec_used = backward<S, U, decltype(loss_c)::value>(
          static_cast<const A*>(grad_rows), static_cast<const S*>(s), static_cast<const U*>(u), per_t != 0, T, B, C,
          static_cast<const A*>(stats), temperature, entropy_temperature, entropy_weight, static_cast<S*>(grad_s),
          static_cast<U*>(grad_u), allow_packed != 0);
    });
  });
  return known ? 0 : 1;
}

// NLD: rows [T, B], stats [T, B, 6] as snnkd_fast::nld_rows_forward; noise_std < 0: adaptive. grad_s
// non-null: also the student's gradient at a row gradient of grad_weight (nld_forward_student_grad_kernel).
int emu_nld_rows_forward_student_grad(int dtype_pair, const void* s, const void* u, int per_t, int64_t T, int64_t B,
                                      int64_t C, const int64_t* seed, double temperature, double noise_weight,
                                      double noise_std, int additive, void* rows, void* stats, void* grad_s,
                                      double grad_weight) {
  const bool known = with_dtype_pair(dtype_pair, [&](auto pair) {
    using S = typename decltype(pair)::student;
    using U = typename decltype(pair)::teacher;
    using A = typename decltype(pair)::acc;
    const auto P = nld_params<A>(temperature, noise_weight, noise_std, additive);
    nld_forward<S, U>(static_cast<const S*>(s), static_cast<const U*>(u), per_t != 0, T, B, C, seed, P, temperature,
                      static_cast<A*>(rows), static_cast<A*>(stats), static_cast<S*>(grad_s), grad_weight);
  });
  return known ? 0 : 1;
}

int emu_nld_rows_forward(int dtype_pair, const void* s, const void* u, int per_t, int64_t T, int64_t B, int64_t C,
                         const int64_t* seed, double temperature, double noise_weight, double noise_std, int additive,
                         void* rows, void* stats) {
  return emu_nld_rows_forward_student_grad(dtype_pair, s, u, per_t, T, B, C, seed, temperature, noise_weight,
                                           noise_std, additive, rows, stats, nullptr, 0.0);
}

int emu_nld_rows_backward(int dtype_pair, const void* grad_rows, const void* s, const void* u, int per_t, int64_t T,
                          int64_t B, int64_t C, const int64_t* seed, double temperature, double noise_weight,
                          double noise_std, int additive, const void* stats, void* grad_s, void* grad_u) {
  const bool known = with_dtype_pair(dtype_pair, [&](auto pair) {
    using S = typename decltype(pair)::student;
    using U = typename decltype(pair)::teacher;
    using A = typename decltype(pair)::acc;
    const auto P = nld_params<A>(temperature, noise_weight, noise_std, additive);
    nld_backward<S, U>(static_cast<const A*>(grad_rows), static_cast<const S*>(s), static_cast<const U*>(u),
                       per_t != 0, T, B, C, seed, P, static_cast<const A*>(stats), static_cast<S*>(grad_s),
                       static_cast<U*>(grad_u));
  });
  return known ? 0 : 1;
}

// HTA's teacher head alone (hta_head above), the teacher [Tt, B, C] (per_t) or [B, C] in
// teacher_dtype 0 float, 1 double, 2 bfloat16, 3 half; *slices_used: the slices it launched.
int emu_hta_head(int teacher_dtype, const void* u, int per_t, int64_t T, int64_t B, int64_t C, double temperature,
                 double head_threshold, int head_threads, int64_t splits, int32_t* keys, int64_t* slices_used) {
  if (head_threads != kThreads && head_threads != kHtaWideThreads) return 1;
  const auto run = [&](auto* typed) {
    *slices_used = hta_head(typed, per_t != 0, T, B, C, temperature, head_threshold, head_threads, splits, keys);
  };
  switch (teacher_dtype) {
    case 0: run(static_cast<const float*>(u)); return 0;
    case 1: run(static_cast<const double*>(u)); return 0;
    case 2: run(static_cast<const c10::BFloat16*>(u)); return 0;
    case 3: run(static_cast<const c10::Half*>(u)); return 0;
    default: return 1;
  }
}

// kd_cuda.cu's split head geometry (hta_head_splits, hta_head_slice) and the reads its search
// launches (hta_search_reads: for double logits if is_double, else for the float types').
int64_t emu_hta_head_splits(int64_t rows, int64_t C, int64_t multiprocessors) {
  return hta_head_splits(rows, C, multiprocessors);
}
int64_t emu_hta_head_slice(int64_t C, int64_t splits) { return hta_head_slice(C, splits); }
int emu_hta_search_reads(int is_double) {
  return is_double ? hta_search_reads<double>() : hta_search_reads<float>();
}

// hta_head_threads (kd_cuda.cu's choice of the head's block size).
int emu_hta_head_threads(int64_t rows, int64_t multiprocessors) { return hta_head_threads(rows, multiprocessors); }

// The standard-normal noise of element i of the flattened [rows, C] student (nld_noise_kernel, a
// grid of `blocks` blocks striding over n elements).
int emu_nld_noise(const int64_t* seed, float* out, int64_t n, int64_t C, int64_t blocks) {
  cuda_emulation::launch<kThreads>(blocks, nld_noise_kernel<float>, seed, out, n, C);
  return 0;
}

}  // extern "C"
