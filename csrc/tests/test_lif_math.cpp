// Unit test of csrc/lif/lif_math.h, the per-element math shared by the CPU and CUDA kernels.
// Checks exact values where the arithmetic is exact, every surrogate derivative against a central
// difference of its primitive (the smooth function whose derivative it is), and the backward step
// and the PLIF decay derivative against finite differences of the forward step.
#include <cmath>
#include <cstdio>
#include <functional>

#include "lif/lif_math.h"

using namespace snnkd::lif;

static int failures = 0;

#define CHECK_CLOSE(actual, expected, tol, what)                                                      \
  do {                                                                                                \
    const double a_ = (actual), e_ = (expected);                                                      \
    if (!(std::fabs(a_ - e_) <= (tol) * (1.0 + std::fabs(e_)))) {                                     \
      std::printf("FAIL %s: got %.17g expected %.17g (%s:%d)\n", (what), a_, e_, __FILE__, __LINE__); \
      ++failures;                                                                                     \
    }                                                                                                 \
  } while (0)

static NeuronParams<double> params(int neuron, bool decay_input, bool soft, bool detach, int surrogate) {
  NeuronParams<double> p;
  p.neuron = neuron;
  p.tau = 2.0;
  p.decay = 0.3;
  p.decay_input = decay_input;
  p.v_threshold = 1.0;
  p.v_reset = soft ? 0.0 : -0.25;
  p.soft_reset = soft;
  p.detach_reset = detach;
  p.surrogate = surrogate;
  p.alpha = 1.7;
  set_gains(p);
  return p;
}

// Primitive functions (the smooth stand-ins for Heaviside) of each surrogate, as in SpikingJelly.
static double primitive(int kind, double x, double a) {
  switch (kind) {
    case kSigmoid: return 1.0 / (1.0 + std::exp(-a * x));
    case kATan: return std::atan(M_PI / 2.0 * a * x) / M_PI + 0.5;
    case kPiecewiseQuadratic:
      if (x < -1.0 / a) return 0.0;
      if (x > 1.0 / a) return 1.0;
      return -a * a / 2.0 * x * std::fabs(x) + a * x + 0.5;
    case kPiecewiseExp: return x < 0 ? 0.5 * std::exp(a * x) : 1.0 - 0.5 * std::exp(-a * x);
    case kSoftSign: return 0.5 * (a * x / (1.0 + std::fabs(a * x)) + 1.0);
    case kSuperSpike: return a * x / (1.0 + std::fabs(x));
    case kErf: return 0.5 * std::erfc(-a * x);
  }
  return 0.0;
}

static void test_forward_exact() {
  NeuronParams<float> p{};
  p.neuron = kLIF; p.tau = 2.0f; p.decay_input = true; p.v_threshold = 1.0f; p.v_reset = 0.0f;
  CHECK_CLOSE(charge<float>(0.5f, 1.5f, p), 1.0, 0.0, "LIF decay_input charge");
  p.decay_input = false;
  CHECK_CLOSE(charge<float>(0.5f, 1.5f, p), 1.75, 0.0, "LIF charge without input decay");
  p.neuron = kIF;
  CHECK_CLOSE(charge<float>(0.5f, 1.5f, p), 2.0, 0.0, "IF charge");
  p.neuron = kPLIF; p.decay = 0.25f; p.decay_input = true;
  CHECK_CLOSE(charge<float>(0.5f, 1.5f, p), 0.75, 0.0, "PLIF charge");
  p.soft_reset = true; p.v_reset = -7.0f;  // ignored by a soft reset: the charge rests at 0
  CHECK_CLOSE(charge<float>(1.0f, 1.0f, p), 1.0, 0.0, "soft reset rests at 0 in the charge");
  if (!fire<float>(1.0f, 1.0f)) { std::printf("FAIL fire at threshold must spike (>=)\n"); ++failures; }
  if (fire<float>(std::nextafter(1.0f, 0.0f), 1.0f)) { std::printf("FAIL fire below threshold\n"); ++failures; }
  if (fire<float>(NAN, 1.0f)) { std::printf("FAIL NaN must not spike\n"); ++failures; }
  CHECK_CLOSE(reset<float>(1.5f, true, p), 0.5, 0.0, "soft reset subtracts v_threshold");
  p.soft_reset = false; p.v_reset = -0.5f;
  CHECK_CLOSE(reset<float>(1.5f, true, p), -0.5, 0.0, "hard reset to v_reset");
  CHECK_CLOSE(reset<float>(0.7f, false, p), 0.7f, 0.0, "no spike keeps H");
}

static void test_surrogates() {
  const double xs[] = {-2.3, -0.61, -0.2, 0.0137, 0.35, 0.9, 3.1};
  for (int kind = 0; kind < kNumSurrogates; ++kind) {
    for (double alpha : {0.5, 1.0, 2.0, 4.0}) {
      for (double x : xs) {
        if (kind == kPiecewiseQuadratic && std::fabs(std::fabs(x) - 1.0 / alpha) < 1e-3) continue;  // kink
        const double eps = 1e-6;
        const double numeric = (primitive(kind, x + eps, alpha) - primitive(kind, x - eps, alpha)) / (2 * eps);
        CHECK_CLOSE(surrogate_grad<double>(x, kind, alpha), numeric, 1e-6, "surrogate derivative vs primitive");
        CHECK_CLOSE(surrogate_grad<float>(float(x), kind, float(alpha)), numeric, 1e-5, "float surrogate");
      }
    }
  }
}

// One step as a function of (v, x, decay), with the spike's value frozen (a Heaviside has no
// derivative) and its derivative replaced by the surrogate: the backward_step's contract.
static void test_backward_step() {
  for (int neuron : {kIF, kLIF, kPLIF})
    for (bool decay_input : {false, true})
      for (bool soft : {false, true})
        for (bool detach : {false, true})
          for (int kind = 0; kind < kNumSurrogates; ++kind) {
            const auto p = params(neuron, decay_input, soft, detach, kind);
            for (double v0 : {-0.4, 0.3, 0.9})
              for (double x : {-0.5, 0.8, 2.5}) {
                const double gs = 0.7, gv = -1.3;
                const double h = charge<double>(v0, x, p);
                const bool s = fire<double>(h, p.v_threshold);
                const double sg = surrogate_grad<double>(h - p.v_threshold, kind, p.alpha);
                // dL/dH by hand: L = gs*S + gv*V with dS/dH = sg, dV/dH from the reset rule.
                double dv_dh = soft ? 1.0 - (detach ? 0.0 : p.v_threshold * sg)
                                    : (s ? 0.0 : 1.0) + (detach ? 0.0 : (p.v_reset - h) * sg);
                const double gh = gs * sg + gv * dv_dh;
                const auto g = backward_step<double>(h, gs, gv, p);
                CHECK_CLOSE(g.grad_h, gh, 1e-12, "grad_h");
                // dH/dx and dH/dv by central differences of the charge (smooth).
                const double eps = 1e-6;
                const double dh_dx = (charge<double>(v0, x + eps, p) - charge<double>(v0, x - eps, p)) / (2 * eps);
                const double dh_dv = (charge<double>(v0 + eps, x, p) - charge<double>(v0 - eps, x, p)) / (2 * eps);
                CHECK_CLOSE(g.grad_x, gh * dh_dx, 1e-8, "grad_x");
                CHECK_CLOSE(g.grad_v_prev, gh * dh_dv, 1e-8, "grad_v_prev");
                if (neuron == kPLIF) {
                  auto q = p;  // the charge reads decay itself; the gains only matter to backward_step
                  q.decay = p.decay + eps;
                  const double hp = charge<double>(v0, x, q);
                  q.decay = p.decay - eps;
                  const double hm = charge<double>(v0, x, q);
                  CHECK_CLOSE(dh_ddecay<double>(h, v0, p), (hp - hm) / (2 * eps), 1e-8, "dH/d(decay)");
                }
              }
          }
}

int main() {
  test_forward_exact();
  test_surrogates();
  test_backward_step();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("lif_math: all checks passed\n");
  return 0;
}
