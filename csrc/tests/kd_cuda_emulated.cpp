// The CUDA KD-loss row kernels of csrc/kd/kd_cuda_kernels.cuh (HTA's teacher head, the KL / TSER /
// HTA-KL forward and backward, NLD's forward, row sums, backward and noise) run on the host under csrc/tests/cuda_emulation/ (each thread a
// fiber, barriers as on the device), behind a C interface that tests/test_cuda_emulated.py loads
// with ctypes and compares with the CPU ops. float32 and float64 inputs (student and teacher of one
// dtype), contiguous, the teacher [Tt, B, C] with Tt = T or 1 ([B, C]: a t stride of 0); the launch
// geometry of csrc/kd/kd_cuda.cu (one block per row forward, one thread per (b, c) backward).
#include <vector>

#include "cuda_emulation.h"  // first: the CUDA keywords as plain C++
#include "kd/kd_cuda_kernels.cuh"

namespace {

using namespace snnkd::kd;
using namespace snnkd::kd::cuda;

template <typename T, int LOSS>
void forward(const T* s, const T* u, bool per_t, int64_t Tn, int64_t B, int64_t C, double temperature,
             double entropy_temperature, double entropy_weight, double head_threshold, T* rows, T* stats,
             int32_t* keys) {
  const Strides ss{B * C, C, 1}, us{per_t ? B * C : 0, C, 1};
  if (LOSS == kHTA) {
    cuda_emulation::launch_cooperative<kThreads>((per_t ? Tn : 1) * B, hta_teacher_kernel<T>, u, us, B, C,
                                                 1.0 / temperature, head_threshold, keys);
  }
  cuda_emulation::launch_cooperative<kThreads>(
      Tn * B, kd_forward_kernel<T, T, LOSS>, s, ss, u, us, per_t, B, C, static_cast<T>(1.0 / temperature),
      static_cast<T>(1.0 / entropy_temperature), static_cast<T>(temperature * temperature),
      static_cast<T>(entropy_weight), LOSS == kHTA ? static_cast<const int32_t*>(keys) : nullptr, rows, stats);
}

template <typename T, int LOSS>
void backward(const T* grad_rows, const T* s, const T* u, bool per_t, int64_t Tn, int64_t B, int64_t C,
              const T* stats, double temperature, double entropy_temperature, double entropy_weight, T* grad_s,
              T* grad_u) {
  const Strides ss{B * C, C, 1}, us{per_t ? B * C : 0, C, 1};
  cuda_emulation::launch<kThreads>((B * C + kThreads - 1) / kThreads, kd_backward_kernel<T, T, LOSS>, grad_rows, s,
                                   ss, u, us, per_t, Tn, B, C, stats, static_cast<T>(1.0 / temperature),
                                   static_cast<T>(temperature), static_cast<T>(1.0 / entropy_temperature),
                                   static_cast<T>(entropy_weight), grad_s, grad_u);
}

template <typename T>
void nld_forward(const T* s, const T* u, bool per_t, int64_t Tn, int64_t B, int64_t C, const int64_t* seed,
                 const NldParams<T>& P, double temperature, T* rows, T* stats) {
  const Strides ss{B * C, C, 1}, us{per_t ? B * C : 0, C, 1};
  cuda_emulation::launch_cooperative<kThreads>(Tn * B, nld_forward_kernel<T, T>, s, ss, u, us, B, C, seed, P,
                                               static_cast<T>(temperature * temperature), rows, stats);
}

template <typename T>
void nld_backward(const T* grad_rows, const T* s, const T* u, bool per_t, int64_t Tn, int64_t B, int64_t C,
                  const int64_t* seed, const NldParams<T>& P, const T* stats, T* grad_s, T* grad_u) {
  const Strides ss{B * C, C, 1}, us{per_t ? B * C : 0, C, 1};
  std::vector<T> sums(P.additive ? 0 : Tn * B * kNldSums);
  if (!P.additive) {
    cuda_emulation::launch_cooperative<kThreads>(Tn * B, nld_row_sums_kernel<T, T>, s, ss, u, us, B, C, seed, P,
                                                 stats, sums.data());
  }
  cuda_emulation::launch<kThreads>((B * C + kThreads - 1) / kThreads, nld_backward_kernel<T, T>, grad_rows, s, ss, u,
                                   us, per_t, Tn, B, C, seed, P, stats,
                                   P.additive ? static_cast<const T*>(nullptr) : sums.data(), grad_s, grad_u);
}

template <typename T, typename F>
void with_loss(int loss, F&& f) {
  if (loss == kKL) f(std::integral_constant<int, kKL>{});
  else if (loss == kTSER) f(std::integral_constant<int, kTSER>{});
  else f(std::integral_constant<int, kHTA>{});
}

}  // namespace

extern "C" {

// dtype 0 float32, 1 float64; loss 0 KL, 1 TSER, 2 HTA (kd_math.h). rows [T, B], stats [T, B, 5],
// keys [Tt, B, 3] (HTA) in the layout of snnkd_fast::kd_rows_forward.
int emu_kd_rows_forward(int dtype, int loss, const void* s, const void* u, int per_t, int64_t T, int64_t B, int64_t C,
                        double temperature, double entropy_temperature, double entropy_weight, double head_threshold,
                        void* rows, void* stats, int32_t* keys) {
  if (loss < kKL || loss > kHTA) return 1;
  auto run = [&](auto tag) {
    using V = decltype(tag);
    with_loss<V>(loss, [&](auto loss_c) {
      forward<V, decltype(loss_c)::value>(static_cast<const V*>(s), static_cast<const V*>(u), per_t != 0, T, B, C,
                                          temperature, entropy_temperature, entropy_weight, head_threshold,
                                          static_cast<V*>(rows), static_cast<V*>(stats), keys);
    });
  };
  if (dtype == 0) run(float{});
  else run(double{});
  return 0;
}

// grad_u null: no teacher gradient.
// NLD: rows [T, B], stats [T, B, 6] as snnkd_fast::nld_rows_forward; noise_std < 0: adaptive.
int emu_nld_rows_forward(int dtype, const void* s, const void* u, int per_t, int64_t T, int64_t B, int64_t C,
                         const int64_t* seed, double temperature, double noise_weight, double noise_std, int additive,
                         void* rows, void* stats) {
  auto run = [&](auto tag) {
    using V = decltype(tag);
    const auto P = make_nld_params<V>(temperature, noise_weight, noise_std < 0 ? 0.0 : noise_std, noise_std < 0,
                                      additive != 0);
    nld_forward<V>(static_cast<const V*>(s), static_cast<const V*>(u), per_t != 0, T, B, C, seed, P, temperature,
                   static_cast<V*>(rows), static_cast<V*>(stats));
  };
  if (dtype == 0) run(float{});
  else run(double{});
  return 0;
}

int emu_nld_rows_backward(int dtype, const void* grad_rows, const void* s, const void* u, int per_t, int64_t T,
                          int64_t B, int64_t C, const int64_t* seed, double temperature, double noise_weight,
                          double noise_std, int additive, const void* stats, void* grad_s, void* grad_u) {
  auto run = [&](auto tag) {
    using V = decltype(tag);
    const auto P = make_nld_params<V>(temperature, noise_weight, noise_std < 0 ? 0.0 : noise_std, noise_std < 0,
                                      additive != 0);
    nld_backward<V>(static_cast<const V*>(grad_rows), static_cast<const V*>(s), static_cast<const V*>(u), per_t != 0,
                    T, B, C, seed, P, static_cast<const V*>(stats), static_cast<V*>(grad_s), static_cast<V*>(grad_u));
  };
  if (dtype == 0) run(float{});
  else run(double{});
  return 0;
}

// The standard-normal noise of element i of the flattened [rows, C] student (nld_noise_kernel, a
// grid of `blocks` blocks striding over n elements).
int emu_nld_noise(const int64_t* seed, float* out, int64_t n, int64_t C, int64_t blocks) {
  cuda_emulation::launch<kThreads>(blocks, nld_noise_kernel<float>, seed, out, n, C);
  return 0;
}

int emu_kd_rows_backward(int dtype, int loss, const void* grad_rows, const void* s, const void* u, int per_t,
                         int64_t T, int64_t B, int64_t C, const void* stats, double temperature,
                         double entropy_temperature, double entropy_weight, void* grad_s, void* grad_u) {
  if (loss < kKL || loss > kHTA) return 1;
  auto run = [&](auto tag) {
    using V = decltype(tag);
    with_loss<V>(loss, [&](auto loss_c) {
      backward<V, decltype(loss_c)::value>(static_cast<const V*>(grad_rows), static_cast<const V*>(s),
                                           static_cast<const V*>(u), per_t != 0, T, B, C,
                                           static_cast<const V*>(stats), temperature, entropy_temperature,
                                           entropy_weight, static_cast<V*>(grad_s), static_cast<V*>(grad_u));
    });
  };
  if (dtype == 0) run(float{});
  else run(double{});
  return 0;
}

}  // extern "C"
