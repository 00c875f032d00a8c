// Per-element math of the multi-step spiking neurons (IF, LIF, PLIF): charge, fire, reset and the
// surrogate derivatives, shared by the CPU kernels (lif_cpu.cpp), the CUDA kernels (lif_cuda.cu)
// and the C++ unit test (csrc/tests/test_lif_math.cpp). The Triton kernels keep their own copy in
// snnkd_fast/lif/triton.py; both are tested against snnkd_fast/lif/reference.py.
//
// Bit-exact parity with SpikingJelly's torch path matters here: a spike is a threshold test on
// the charged membrane, so one ulp of difference in H can flip a spike and change the whole
// trajectory. The charge therefore uses exactly SpikingJelly's operation order, divides by tau
// (not a multiply by 1/tau), and uses the *_rn intrinsics on the device so that nvcc cannot
// contract a multiply and an add into one FMA (an FMA rounds once where torch rounds twice).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/fast_math.h"
#include "common/hd.h"

namespace snnkd {
namespace lif {

// Unqualified calls below pick the overload of the argument's type (float stays float); CUDA
// provides the same std:: overloads in device code.
using std::exp;
using std::fabs;
using std::log;

// Neuron kinds. Kept in sync with snnkd_fast/lif/params.py (NEURON_*).
enum NeuronKind : int { kIF = 0, kLIF = 1, kPLIF = 2 };

// Surrogate ids: the order of snnkd_fast/lif/surrogates.py's SURROGATES table.
enum SurrogateKind : int {
  kSigmoid = 0,
  kATan = 1,
  kPiecewiseQuadratic = 2,
  kPiecewiseExp = 3,
  kSoftSign = 4,
  kSuperSpike = 5,
  kErf = 6,
  kNumSurrogates = 7,
};

// Scalar configuration of one call, validated in Python before any kernel runs.
template <typename acc_t>
struct NeuronParams {
  int neuron;        // NeuronKind
  acc_t tau;         // LIF: the charge divides by tau
  acc_t decay;       // PLIF: sigmoid(w), multiplied (read from device memory by the launcher)
  bool decay_input;  // LIF/PLIF: does the input decay with the membrane
  acc_t v_threshold;
  acc_t v_reset;     // hard-reset value; 0 in the charge when soft_reset
  bool soft_reset;   // v_reset=None in the Python API: subtract v_threshold on a spike
  bool detach_reset; // drop the reset path (spike -> membrane) from the gradient
  int surrogate;     // SurrogateKind
  acc_t alpha;
  // Derived by set_gains() (host side, once per call): the share of dL/dH[t] that leaks away per
  // step (1/tau, sigmoid(w), or 0 for IF) and the input's weight in H (that share with decay_input,
  // else 1). Precomputed because a division inside a loop is not hoisted (it may trap), and a
  // mode-dependent select in the loop would stop the CPU loops from vectorizing.
  acc_t leak_rate;
  acc_t input_gain;
  // LIF's charge divides by tau; StaticNeuronParams hides this with true where tau is a power of two
  // (reciprocal_is_exact), and the charge then multiplies by leak_rate (1/tau) instead.
  static constexpr bool exact_reciprocal_tau = false;
};

template <typename acc_t>
SNNKD_HD void set_gains(NeuronParams<acc_t>& p) {
  p.leak_rate = p.neuron == kIF ? acc_t(0) : (p.neuron == kLIF ? acc_t(1) / p.tau : p.decay);
  p.input_gain = (p.neuron != kIF && p.decay_input) ? p.leak_rate : acc_t(1);
}

// NeuronParams whose mode fields are compile-time constants (they hide the base's runtime fields):
// the same math functions below, instantiated with it, have no branches on the mode, so the CPU
// compiler vectorizes the per-neuron loops. The runtime scalars (tau, v_threshold, ...) are inherited.
// EXACT_RECIPROCAL_TAU: LIF's tau is a power of two (see reciprocal_is_exact); the charge then
// multiplies by 1/tau instead of dividing.
template <typename acc_t, int NEURON, bool DECAY_INPUT, bool SOFT_RESET, bool DETACH_RESET = false,
          int SURROGATE = kSigmoid, bool EXACT_RECIPROCAL_TAU = false>
struct StaticNeuronParams : NeuronParams<acc_t> {
  static constexpr int neuron = NEURON;
  static constexpr bool decay_input = DECAY_INPUT;
  static constexpr bool soft_reset = SOFT_RESET;
  static constexpr bool detach_reset = DETACH_RESET;
  static constexpr int surrogate = SURROGATE;
  static constexpr bool exact_reciprocal_tau = EXACT_RECIPROCAL_TAU;
  explicit StaticNeuronParams(const NeuronParams<acc_t>& p) : NeuronParams<acc_t>(p) {}
};

// Whether 1/tau is exact (tau a power of two: 2, SpikingJelly's default, 4, 0.5, ...): then v / tau
// and v * (1/tau) are the same number for every v -- both are the exact quotient rounded once --
// and the charge may multiply by leak_rate (1/tau). The division is what the CPU's recomputing
// backward (lif_backward_from_x) spends most on: ~25% of its time at tau = 2 (measured).
template <typename acc_t>
inline bool reciprocal_is_exact(acc_t tau) {
  int exponent = 0;
  return tau > acc_t(0) && std::frexp(tau, &exponent) == acc_t(0.5) && std::isnormal(acc_t(1) / tau);
}

// ---- exact-rounding helpers -------------------------------------------------------------------
// On the host the build passes -ffp-contract=off; on the device the intrinsics pin the rounding.
SNNKD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SNNKD_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
SNNKD_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
SNNKD_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// ---- forward -------------------------------------------------------------------------------
// value / tau, LIF's decay: a multiply by 1/tau where that is exact (StaticNeuronParams'
// exact_reciprocal_tau; the runtime NeuronParams of the CUDA kernels always divide).
template <typename acc_t, typename P>
SNNKD_HD acc_t over_tau(acc_t value, const P& p) {
  if (P::exact_reciprocal_tau) return mul_rn(value, p.leak_rate);
  return div_rn(value, p.tau);
}

// H[t] from V[t-1] and X[t]; SpikingJelly's operation order (see the header comment).
template <typename acc_t, typename P>
SNNKD_HD acc_t charge(acc_t v, acc_t x, const P& p) {
  const acc_t v_rest = p.soft_reset ? acc_t(0) : p.v_reset;
  if (p.neuron == kIF) return v + x;
  if (p.neuron == kLIF) {
    return p.decay_input ? v + over_tau(x - (v - v_rest), p) : (v - over_tau(v - v_rest, p)) + x;
  }
  // kPLIF
  return p.decay_input ? v + mul_rn(x - (v - v_rest), p.decay) : (v - mul_rn(v - v_rest, p.decay)) + x;
}

// S[t] = Heaviside(H[t] - v_th), with SpikingJelly's ">=" (snntorch and norse use ">").
// NaN compares false: a NaN membrane never spikes and stays NaN (documented NaN policy).
template <typename acc_t>
SNNKD_HD bool fire(acc_t h, acc_t v_threshold) {
  return h >= v_threshold;
}

// V[t] after the reset. With spike in {0, 1} this equals torch's `s*v_reset + (1-s)*h` and
// `h - s*v_th` bit for bit on every finite h.
template <typename acc_t, typename P>
SNNKD_HD acc_t reset(acc_t h, bool spike, const P& p) {
  return spike ? (p.soft_reset ? h - p.v_threshold : p.v_reset) : h;
}

// ---- exp for the surrogates: fast_exp (csrc/common/fast_math.h) vectorizes on the host -----------

// ---- surrogate derivatives, d/dx of the smooth stand-in for Heaviside(x) ------------------------
// Same formulas (and operation order) as SpikingJelly 2.0's surrogate kernels.
template <typename acc_t>
SNNKD_HD acc_t surrogate_grad(acc_t x, int kind, acc_t alpha) {
  const acc_t one = acc_t(1);
  switch (kind) {
    case kSigmoid: {
      const acc_t s = one / (one + fast_exp(-alpha * x));
      return (one - s) * s * alpha;
    }
    case kATan: {
      const acc_t z = x * (acc_t(M_PI) / acc_t(2) * alpha);
      return (alpha / acc_t(2)) / (one + z * z);
    }
    case kPiecewiseQuadratic: {
      const acc_t g = alpha - alpha * alpha * fabs(x);
      return g > acc_t(0) ? g : acc_t(0);
    }
    case kPiecewiseExp:
      return (alpha / acc_t(2)) * fast_exp(-alpha * fabs(x));
    case kSoftSign: {
      const acc_t z = one / alpha + fabs(x);
      return one / (acc_t(2) * alpha * z * z);
    }
    case kSuperSpike: {
      const acc_t z = one + fabs(x);
      return alpha / (z * z);
    }
    case kErf: {
      const acc_t z = alpha * x;
      // 1/sqrt(pi) spelled out: M_2_SQRTPI/2 keeps it a compile-time constant on host and device.
      return (alpha * acc_t(M_2_SQRTPI / 2.0)) * fast_exp(-z * z);
    }
    default:
      return acc_t(0);
  }
}

// ---- backward, one step in reverse time ----------------------------------------------------------
// Inputs: the saved H[t], dL/dS[t], and dL/dV[t] (the gradient reaching the membrane after step t:
// from V's output at t = T-1, from the next step's charge otherwise).
// Outputs: dL/dX[t], dL/dV[t-1] (the carry), and dL/dH[t] (for the PLIF decay gradient).
template <typename acc_t>
struct StepGrad {
  acc_t grad_x;
  acc_t grad_v_prev;
  acc_t grad_h;
};

// dV[t]/dH[t] through the reset, given the surrogate derivative sg at H[t].
template <typename acc_t, typename P>
SNNKD_HD acc_t reset_grad(acc_t h, acc_t sg, const P& p) {
  if (p.soft_reset) return p.detach_reset ? acc_t(1) : acc_t(1) - p.v_threshold * sg;
  const acc_t keep = fire(h, p.v_threshold) ? acc_t(0) : acc_t(1);
  return p.detach_reset ? keep : fmadd(p.v_reset - h, sg, keep);
}

template <typename acc_t, typename P>
SNNKD_HD StepGrad<acc_t> backward_step(acc_t h, acc_t grad_s, acc_t grad_v, const P& p) {
  const acc_t sg = surrogate_grad<acc_t>(h - p.v_threshold, p.surrogate, p.alpha);
  const acc_t dv_dh = reset_grad<acc_t>(h, sg, p);
  StepGrad<acc_t> g;
  g.grad_h = fmadd(grad_s, sg, grad_v * dv_dh);
  g.grad_x = g.grad_h * p.input_gain;
  g.grad_v_prev = fmadd(-g.grad_h, p.leak_rate, g.grad_h);
  return g;
}

// ---- rate-based backpropagation (Yu et al., NeurIPS 2024) ----------------------------------------
// Over the forward, per neuron: e = (1/T) sum_t sg[t] f[t], where f[t] = dH[t]/dx for an input x
// held constant over time: f[0] = input_gain, f[t+1] = input_gain + (1 - leak_rate) f[t] dV[t]/dH[t].
// One step: adds sg[t] f[t] to e_sum and advances f. The backward then needs only e (O(N) memory).
template <typename acc_t, typename P>
SNNKD_HD void eligibility_step(acc_t h, acc_t& f, acc_t& e_sum, const P& p) {
  const acc_t sg = surrogate_grad<acc_t>(h - p.v_threshold, p.surrogate, p.alpha);
  e_sum += sg * f;
  f = p.input_gain + (acc_t(1) - p.leak_rate) * f * reset_grad<acc_t>(h, sg, p);
}

// dH[t]/d(decay) for PLIF from the saved H[t] and the membrane V[t-1] before the charge. With
// decay_input, H - V = decay * (X - (V - v_rest)), so the input is recovered as (H - V)/decay and
// need not be saved: the backward keeps one [T, ...] tensor (H), as for LIF.
template <typename acc_t, typename P>
SNNKD_HD acc_t dh_ddecay(acc_t h, acc_t v_prev, const P& p) {
  const acc_t v_rest = p.soft_reset ? acc_t(0) : p.v_reset;
  return p.decay_input ? (h - v_prev) / p.decay : v_rest - v_prev;
}

// ---- one call's arguments ------------------------------------------------------------------------
// Scalar arguments of every neuron op, in schema order (csrc/ops.cpp), and the NeuronParams the
// kernels get from them (torch-free: the CUDA emulation test builds them too).
struct ScalarArgs {
  int64_t neuron;
  double tau;
  bool decay_input;
  double v_threshold;
  double v_reset;
  bool soft_reset;
  bool detach_reset;  // used by the backward (the forward op carries it for autograd)
  int64_t surrogate;  // used by the backward
  double alpha;       // used by the backward
};

template <typename acc_t>
inline NeuronParams<acc_t> make_params(const ScalarArgs& a, acc_t decay) {
  NeuronParams<acc_t> p;
  p.neuron = static_cast<int>(a.neuron);
  p.tau = static_cast<acc_t>(a.tau);
  p.decay = decay;
  p.decay_input = a.decay_input;
  p.v_threshold = static_cast<acc_t>(a.v_threshold);
  p.v_reset = static_cast<acc_t>(a.v_reset);
  p.soft_reset = a.soft_reset;
  p.detach_reset = a.detach_reset;
  p.surrogate = static_cast<int>(a.surrogate);
  p.alpha = static_cast<acc_t>(a.alpha);
  set_gains(p);
  return p;
}

}  // namespace lif
}  // namespace snnkd
