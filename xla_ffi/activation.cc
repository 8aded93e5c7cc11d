// Portable SiLU gating and softmax rows (activation.h): the generic kernel set uses it.
#include "activation.h"

#include <cmath>

namespace ktjax {
namespace {

float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

}  // namespace

void silu_mul_portable(const float* g, const float* u, float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
}

void silu_mul_grad_portable(const float* g, const float* u, const float* dh, float w, float* dg, float* du,
                            int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float sg = sigmoid(g[i]), d = w * dh[i];
    du[i] = d * g[i] * sg;
    dg[i] = d * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
  }
}

float row_max_portable(const float* s, int64_t n, float m) {
  for (int64_t i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
  return m;
}

float exp_shift_portable(const float* s, float m, float* p, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp(s[i] - m);
    sum += p[i];
  }
  return sum;
}

}  // namespace ktjax
