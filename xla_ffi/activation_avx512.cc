// AVX-512 SiLU gating and softmax rows (activation.h), compiled with -mavx512f -mfma.
#include <immintrin.h>

#include "activation.h"
#include "avx512_masks.h"

namespace ktjax {
namespace {

// exp(x) in 16 lanes (the constants in activation.h), 2^n by vscalefps, which overflows to inf and
// underflows to 0 as expf does. The clamp keeps a NaN (min and max return their second operand when
// either is NaN).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(kExpMin), _mm512_min_ps(_mm512_set1_ps(kExpMax), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 sigmoid16(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

}  // namespace

void silu_mul_avx512(const float* g, const float* u, float* h, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    _mm512_mask_storeu_ps(h + i, m, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid16(gv)), uv));
  }
}

void silu_mul_grad_avx512(const float* g, const float* u, const float* dh, float w, float* dg, float* du,
                          int64_t n) {
  const __m512 wv = _mm512_set1_ps(w), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 d = _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(m, dh + i));
    const __m512 sg = sigmoid16(gv);
    _mm512_mask_storeu_ps(du + i, m, _mm512_mul_ps(_mm512_mul_ps(d, gv), sg));
    // d * u * sg * (1 + g (1 - sg)), in the portable version's order of operations
    const __m512 slope = _mm512_add_ps(one, _mm512_mul_ps(gv, _mm512_sub_ps(one, sg)));
    _mm512_mask_storeu_ps(dg + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, uv), sg), slope));
  }
}

float row_max_avx512(const float* s, int64_t n, float m) {
  __m512 best = _mm512_set1_ps(m);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = first_lanes(n - i);
    best = _mm512_mask_max_ps(best, k, best, _mm512_maskz_loadu_ps(k, s + i));
  }
  return _mm512_reduce_max_ps(best);
}

float exp_shift_avx512(const float* s, float m, float* p, int64_t n) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = first_lanes(n - i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), mv));
    _mm512_mask_storeu_ps(p + i, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

}  // namespace ktjax
