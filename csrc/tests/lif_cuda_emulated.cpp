// The CUDA neuron kernels of csrc/lif/lif_cuda_kernels.cuh run on the host (cuda_emulation/), behind
// a C interface that tests/test_cuda_emulated.py loads with ctypes: the kernels' indexing, modes,
// vector widths, staged backward and one-value v_init are checked on a machine without a GPU,
// against the CPU ops (the same per-element math of lif_math.h). float32 and float64 (scalar_t =
// acc_t); the launch geometry is the launchers' (csrc/lif/lif_cuda.cu).
//   g++ -std=c++17 -O2 -ffp-contract=off -shared -fPIC -I csrc/tests/cuda_emulation -I csrc
//       csrc/tests/lif_cuda_emulated.cpp -o liblif_cuda_emulated.so
#include <type_traits>
#include <vector>

#include "cuda_emulation.h"  // first: the CUDA keywords as plain C++
#include "lif/lif_cuda_kernels.cuh"

namespace {

using namespace snnkd::lif;

// scalars: neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate, alpha
template <typename acc_t>
NeuronParams<acc_t> params_of(const double* s) {
  const ScalarArgs a{static_cast<int64_t>(s[0]), s[1], s[2] != 0, s[3], s[4], s[5] != 0, s[6] != 0,
                     static_cast<int64_t>(s[7]), s[8]};
  return make_params<acc_t>(a, acc_t(0));
}

int64_t blocks_for(int64_t N, int vec) { return (N / vec + kThreads - 1) / kThreads; }

template <typename T, int VEC>
void forward(int mode, const T* x, const T* v_init, bool one_v_init, const T* decay, T* spikes, T* v_final, T* out,
             int64_t T_, int64_t N, const NeuronParams<T>& p) {
  const int64_t blocks = blocks_for(N, VEC);
  auto run = [&](auto mode) {
    cuda_emulation::launch<kThreads>(blocks, forward_kernel<T, T, VEC, decltype(mode)::value>, x, v_init, one_v_init,
                                     decay, spikes, v_final, out, T_, N, p);
  };
  switch (static_cast<ForwardMode>(mode)) {
    case ForwardMode::kSaveH: return run(std::integral_constant<ForwardMode, ForwardMode::kSaveH>{});
    case ForwardMode::kRate: return run(std::integral_constant<ForwardMode, ForwardMode::kRate>{});
    case ForwardMode::kLean: return run(std::integral_constant<ForwardMode, ForwardMode::kLean>{});
    case ForwardMode::kRecharge: return run(std::integral_constant<ForwardMode, ForwardMode::kRecharge>{});
  }
}

template <typename T>
T sum_partials(const std::vector<T>& partials) {
  T total = T(0);
  for (T value : partials) total += value;
  return total;
}

template <typename T, int VEC>
T backward(bool decay_grad, const T* grad_spikes, const T* grad_v, const T* h_seq, const T* v_init, bool one_v_init,
           const T* decay, T* grad_x, T* grad_v_init, int64_t T_, int64_t N, const NeuronParams<T>& p) {
  const int64_t blocks = blocks_for(N, VEC);
  std::vector<T> partials(blocks, T(0));
  cuda_emulation::launch<kThreads>(blocks, decay_grad ? backward_kernel<T, T, VEC, true> : backward_kernel<T, T, VEC, false>,
                                   grad_spikes, grad_v, h_seq, v_init, one_v_init, decay, grad_x, grad_v_init,
                                   partials.data(), T_, N, p);
  return sum_partials(partials);
}

template <typename T>
T backward_from_x(bool decay_grad, const T* grad_spikes, const T* grad_v, const T* x, const T* v_init,
                  bool one_v_init, const T* decay, T* grad_x, T* grad_v_init, int64_t T_, int64_t N,
                  const NeuronParams<T>& p) {
  const int64_t blocks = blocks_for(N, 1);
  std::vector<T> partials(blocks, T(0));
  auto kernel = decay_grad ? backward_from_x_kernel<T, T, true> : backward_from_x_kernel<T, T, false>;
  cuda_emulation::launch_with_shared<kThreads>(blocks, staged_bytes<T>(T_), kernel, grad_spikes, grad_v, x, v_init,
                                               one_v_init, decay, grad_x, grad_v_init, partials.data(),
                                               static_cast<int>(T_), N, p);
  return sum_partials(partials);
}

template <typename T>
void set_decay(NeuronParams<T>& p, const void* decay) {
  if (p.neuron == kPLIF) p.decay = *static_cast<const T*>(decay);  // the kernels read it themselves too
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float64. vec: 1 or 4 (the caller checks N % 4 and alignment, as the launcher
// does). Null pointers where the kernel takes none (spikes / v_final of kRecharge, out of kLean).
int emu_lif_forward(int dtype, int mode, int vec, const void* x, const void* v_init, int one_v_init,
                    const void* decay, void* spikes, void* v_final, void* out, int64_t T, int64_t N,
                    const double* scalars) {
  if (vec != 1 && vec != 4) return 1;
  if (dtype == 0) {
    const auto p = params_of<float>(scalars);
    auto run = vec == 4 ? forward<float, 4> : forward<float, 1>;
    run(mode, static_cast<const float*>(x), static_cast<const float*>(v_init), one_v_init != 0,
        static_cast<const float*>(decay), static_cast<float*>(spikes), static_cast<float*>(v_final),
        static_cast<float*>(out), T, N, p);
  } else {
    const auto p = params_of<double>(scalars);
    auto run = vec == 4 ? forward<double, 4> : forward<double, 1>;
    run(mode, static_cast<const double*>(x), static_cast<const double*>(v_init), one_v_init != 0,
        static_cast<const double*>(decay), static_cast<double*>(spikes), static_cast<double*>(v_final),
        static_cast<double*>(out), T, N, p);
  }
  return 0;
}

// backward_kernel (the saved-H backward); grad_v_init null for a one-value v_init. Writes the decay
// gradient (the block partials summed in block order) to *grad_decay.
int emu_lif_backward(int dtype, int vec, int decay_grad, const void* grad_spikes, const void* grad_v,
                     const void* h_seq, const void* v_init, int one_v_init, const void* decay, void* grad_x,
                     void* grad_v_init, double* grad_decay, int64_t T, int64_t N, const double* scalars) {
  if (vec != 1 && vec != 4) return 1;
  if (dtype == 0) {
    auto p = params_of<float>(scalars);
    set_decay(p, decay);
    auto run = vec == 4 ? backward<float, 4> : backward<float, 1>;
    *grad_decay = run(decay_grad != 0, static_cast<const float*>(grad_spikes), static_cast<const float*>(grad_v),
                      static_cast<const float*>(h_seq), static_cast<const float*>(v_init), one_v_init != 0,
                      static_cast<const float*>(decay), static_cast<float*>(grad_x), static_cast<float*>(grad_v_init),
                      T, N, p);
  } else {
    auto p = params_of<double>(scalars);
    set_decay(p, decay);
    auto run = vec == 4 ? backward<double, 4> : backward<double, 1>;
    *grad_decay = run(decay_grad != 0, static_cast<const double*>(grad_spikes), static_cast<const double*>(grad_v),
                      static_cast<const double*>(h_seq), static_cast<const double*>(v_init), one_v_init != 0,
                      static_cast<const double*>(decay), static_cast<double*>(grad_x),
                      static_cast<double*>(grad_v_init), T, N, p);
  }
  return 0;
}

// backward_from_x_kernel (the lean pair's backward, T <= staged_steps_max: H staged in shared
// memory); grad_v_init null for a one-value v_init.
int emu_lif_backward_from_x(int dtype, int decay_grad, const void* grad_spikes, const void* grad_v, const void* x,
                            const void* v_init, int one_v_init, const void* decay, void* grad_x, void* grad_v_init,
                            double* grad_decay, int64_t T, int64_t N, const double* scalars) {
  if (T < 1 || T > (dtype == 0 ? staged_steps_max<float>() : staged_steps_max<double>())) return 1;
  if (dtype == 0) {
    auto p = params_of<float>(scalars);
    set_decay(p, decay);
    *grad_decay = backward_from_x<float>(
        decay_grad != 0, static_cast<const float*>(grad_spikes), static_cast<const float*>(grad_v),
        static_cast<const float*>(x), static_cast<const float*>(v_init), one_v_init != 0,
        static_cast<const float*>(decay), static_cast<float*>(grad_x), static_cast<float*>(grad_v_init), T, N, p);
  } else {
    auto p = params_of<double>(scalars);
    set_decay(p, decay);
    *grad_decay = backward_from_x<double>(
        decay_grad != 0, static_cast<const double*>(grad_spikes), static_cast<const double*>(grad_v),
        static_cast<const double*>(x), static_cast<const double*>(v_init), one_v_init != 0,
        static_cast<const double*>(decay), static_cast<double*>(grad_x), static_cast<double*>(grad_v_init), T, N, p);
  }
  return 0;
}

// The longest sequence backward_from_x_kernel stages (dtype as above).
int emu_staged_steps_max(int dtype) {
  return static_cast<int>(dtype == 0 ? staged_steps_max<float>() : staged_steps_max<double>());
}

}  // extern "C"
