// Launchers of the CUDA neuron kernels (csrc/lif/lif_cuda_kernels.cuh) and their registration.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <utility>

#include "lif_cuda_kernels.cuh"
#include "lif_ops.h"

namespace snnkd {
namespace lif {
namespace {

constexpr int kVec = 4;

// VEC-wide accesses need N % VEC == 0 and every row start aligned to the pack size.
template <typename scalar_t, typename acc_t>
bool can_vectorize(int64_t N, std::initializer_list<const void*> scalar_ptrs,
                   std::initializer_list<const void*> acc_ptrs) {
  if (N % kVec != 0) return false;
  for (const void* ptr : scalar_ptrs)
    if (ptr && !pack_aligned(ptr, sizeof(scalar_t) * kVec)) return false;
  for (const void* ptr : acc_ptrs)
    if (ptr && !pack_aligned(ptr, sizeof(acc_t) * kVec)) return false;
  return true;
}

const void* optional_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Lets `kernel` launch with up to `bytes` of dynamic shared memory on the current device (above the
// default 48 KiB a kernel must opt in, per kernel and device). The attribute is set once per pair,
// not on every launch; a failed call is not remembered, so the next launch raises again.
void allow_dynamic_shared_memory(const void* kernel, int device, int bytes) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> opted_in;
  const std::lock_guard<std::mutex> lock(mutex);
  if (opted_in.count({kernel, device}) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  opted_in.insert({kernel, device});
}

}  // namespace

// A one-element v_init for every neuron is read as one value by the kernels: no [N] copy of it
// is written, and no gradient for it.
template <ForwardMode MODE>
void launch_forward_mode_cuda(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                              const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0);
  const int64_t N = x.numel() / T;
  const bool one_v_init = broadcast_v_init(v_init, N);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "snnkd_lif_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(a, acc_t(0));
    const acc_t* decay_ptr = a.neuron == kPLIF ? decay->data_ptr<acc_t>() : nullptr;
    scalar_t* spikes_ptr = spikes.defined() ? spikes.data_ptr<scalar_t>() : nullptr;
    acc_t* v_final_ptr = v_final.defined() ? v_final.data_ptr<acc_t>() : nullptr;
    acc_t* out_ptr = out.defined() ? out.data_ptr<acc_t>() : nullptr;
    const bool vec = can_vectorize<scalar_t, acc_t>(N, {x.data_ptr(), spikes_ptr},
                                                    {one_v_init ? nullptr : v_init.data_ptr(), out_ptr, v_final_ptr});
    const int64_t blocks = (N / (vec ? kVec : 1) + kThreads - 1) / kThreads;
    auto kernel = vec ? forward_kernel<scalar_t, acc_t, kVec, MODE> : forward_kernel<scalar_t, acc_t, 1, MODE>;
    kernel<<<blocks, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), v_init.data_ptr<acc_t>(), one_v_init, decay_ptr,
                                            spikes_ptr, v_final_ptr, out_ptr, T, N, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_forward_cuda(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                         const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& h_seq) {
  launch_forward_mode_cuda<ForwardMode::kSaveH>(x, v_init, decay, a, spikes, v_final, h_seq);
}

void launch_rate_forward_cuda(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                              const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final,
                              at::Tensor& eligibility) {
  launch_forward_mode_cuda<ForwardMode::kRate>(x, v_init, decay, a, spikes, v_final, eligibility);
}

void launch_lean_forward_cuda(const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                              const ScalarArgs& a, at::Tensor& spikes, at::Tensor& v_final, at::Tensor& unused) {
  launch_forward_mode_cuda<ForwardMode::kLean>(x, v_init, decay, a, spikes, v_final, unused);
}

void launch_backward_cuda(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                          const at::Tensor& h_seq, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                          bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                          at::Tensor& grad_decay) {
  const c10::cuda::CUDAGuard guard(h_seq.device());
  const int64_t T = h_seq.size(0);
  const int64_t N = h_seq.numel() / T;
  const bool one_v_init = broadcast_v_init(v_init, N);  // then grad_v_init is empty: none written
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "snnkd_lif_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(a, acc_t(0));
    const acc_t* decay_ptr = a.neuron == kPLIF ? decay->data_ptr<acc_t>() : nullptr;
    acc_t* grad_v_init_ptr = one_v_init ? nullptr : grad_v_init.data_ptr<acc_t>();
    const bool vec = can_vectorize<scalar_t, acc_t>(
        N, {optional_ptr(grad_spikes), grad_x.data_ptr()},
        {optional_ptr(grad_v), h_seq.data_ptr(), one_v_init ? nullptr : v_init.data_ptr(), grad_v_init_ptr});
    const int64_t blocks = (N / (vec ? kVec : 1) + kThreads - 1) / kThreads;
    at::Tensor partials = decay_grad ? at::empty({blocks}, h_seq.options()) : at::Tensor();
    auto kernel = vec ? (decay_grad ? backward_kernel<scalar_t, acc_t, kVec, true> : backward_kernel<scalar_t, acc_t, kVec, false>)
                      : (decay_grad ? backward_kernel<scalar_t, acc_t, 1, true> : backward_kernel<scalar_t, acc_t, 1, false>);
    kernel<<<blocks, kThreads, 0, stream>>>(
        grad_spikes ? grad_spikes->data_ptr<scalar_t>() : nullptr, grad_v ? grad_v->data_ptr<acc_t>() : nullptr,
        h_seq.data_ptr<acc_t>(), v_init.data_ptr<acc_t>(), one_v_init, decay_ptr, grad_x.data_ptr<scalar_t>(),
        grad_v_init_ptr, decay_grad ? partials.data_ptr<acc_t>() : nullptr, T, N, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (decay_grad) grad_decay.copy_(partials.sum());
  });
}

// lif_backward_from_x: H recharged from x inside the backward kernel, into shared memory, for
// T <= staged_steps_max (64 in fp32), else into a temporary H [T, N] by the forward kernel's
// kRecharge mode, then the saved-H backward (the temporary lives for this call only: the forward
// still saved nothing T-long). grad_v_init is empty for a one-value v_init (see backward_op).
void launch_backward_from_x_cuda(const std::optional<at::Tensor>& grad_spikes, const std::optional<at::Tensor>& grad_v,
                                 const at::Tensor& x, const at::Tensor& v_init, const std::optional<at::Tensor>& decay,
                                 bool decay_grad, const ScalarArgs& a, at::Tensor& grad_x, at::Tensor& grad_v_init,
                                 at::Tensor& grad_decay) {
  const int64_t T = x.size(0);
  const int64_t N = x.numel() / T;
  const bool staged = v_init.scalar_type() == at::kDouble ? T <= staged_steps_max<double>()
                                                          : T <= staged_steps_max<float>();
  if (!staged) {
    at::Tensor h_seq = at::empty(x.sizes(), v_init.options());
    at::Tensor none;
    launch_forward_mode_cuda<ForwardMode::kRecharge>(x, v_init, decay, a, none, none, h_seq);
    launch_backward_cuda(grad_spikes, grad_v, h_seq, v_init, decay, decay_grad, a, grad_x, grad_v_init, grad_decay);
    return;
  }
  const bool one_v_init = broadcast_v_init(v_init, N);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "snnkd_lif_backward_from_x_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(a, acc_t(0));
    const acc_t* decay_ptr = a.neuron == kPLIF ? decay->data_ptr<acc_t>() : nullptr;
    const int64_t blocks = (N + kThreads - 1) / kThreads;
    at::Tensor partials = decay_grad ? at::empty({blocks}, v_init.options()) : at::Tensor();
    auto kernel = decay_grad ? backward_from_x_kernel<scalar_t, acc_t, true>
                             : backward_from_x_kernel<scalar_t, acc_t, false>;
    const int64_t shared_bytes = staged_bytes<acc_t>(T);
    if (shared_bytes > 48 * 1024) {
      allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), x.get_device(),
                                  static_cast<int>(kMaxStagedBytes));
    }
    kernel<<<blocks, kThreads, shared_bytes, stream>>>(
        grad_spikes ? grad_spikes->data_ptr<scalar_t>() : nullptr, grad_v ? grad_v->data_ptr<acc_t>() : nullptr,
        x.data_ptr<scalar_t>(), v_init.data_ptr<acc_t>(), one_v_init, decay_ptr, grad_x.data_ptr<scalar_t>(),
        one_v_init ? nullptr : grad_v_init.data_ptr<acc_t>(), decay_grad ? partials.data_ptr<acc_t>() : nullptr,
        static_cast<int>(T), N, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (decay_grad) grad_decay.copy_(partials.sum());
  });
}

}  // namespace lif
}  // namespace snnkd

TORCH_LIBRARY_IMPL(snnkd_fast, CUDA, m) {
  m.impl("lif_forward", &snnkd::lif::forward_op<snnkd::lif::launch_forward_cuda>);
  m.impl("lif_backward", &snnkd::lif::backward_op<snnkd::lif::launch_backward_cuda>);
  m.impl("lif_rate_forward",
         &snnkd::lif::forward_op<snnkd::lif::launch_rate_forward_cuda, snnkd::lif::Keep::kEligibility>);
  // The lean pair on CUDA: what recompute_h=True runs; not the cuda backend's default (lif/op.py's
  // _RECOMPUTE_H_DEVICES) until its shared-memory backward is timed on a GPU.
  m.impl("lif_forward_lean", &snnkd::lif::lean_forward_op<snnkd::lif::launch_lean_forward_cuda>);
  m.impl("lif_backward_from_x",
         &snnkd::lif::backward_op<snnkd::lif::launch_backward_from_x_cuda, true>);
}
