// AVX2 SiLU gating and softmax rows (activation.h), compiled with -mavx2 -mfma: the AVX-512 version's arithmetic in 8
// lanes, so both give the same bits.
#include <immintrin.h>

#include <algorithm>

#include "activation.h"

namespace ktjax {
namespace {

// 2^k for integer lanes k in [-126, 127]: the exponent field alone.
inline __m256 pow2(__m256i k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

// exp(x) in 8 lanes, as exp16 in activation_avx512.cc (the constants in activation.h). AVX2 has no
// vscalefps, so 2^n (n in [-150, 128]) is applied as two normal factors 2^a 2^b, a = floor(n / 2): p 2^a
// is exact, and p 2^a 2^b rounds once, overflowing to inf and underflowing to 0 where p 2^n does, i.e.
// the same bits as vscalefps.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExpMin), _mm256_min_ps(_mm256_set1_ps(kExpMax), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);  // a NaN gives INT_MIN here, but p is NaN already
  const __m256i a = _mm256_srai_epi32(ni, 1);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(a)), pow2(_mm256_sub_epi32(ni, a)));
}

inline __m256 sigmoid8(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

inline __m256 silu_mul8(__m256 g, __m256 u) { return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), u); }

// du and dg for d = w dh, in the portable version's order of operations.
inline void silu_mul_grad8(__m256 g, __m256 u, __m256 d, __m256* dg, __m256* du) {
  const __m256 one = _mm256_set1_ps(1.0f), sg = sigmoid8(g);
  *du = _mm256_mul_ps(_mm256_mul_ps(d, g), sg);
  const __m256 slope = _mm256_add_ps(one, _mm256_mul_ps(g, _mm256_sub_ps(one, sg)));
  *dg = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(d, u), sg), slope);
}

// The last n % 8 elements go through an 8-float copy (AVX2 has no masked loads of this kind).
struct Tail {
  alignas(32) float v[8] = {};
  Tail(const float* src, int64_t n) { std::copy_n(src, n, v); }
  __m256 load() const { return _mm256_load_ps(v); }
};

}  // namespace

void silu_mul_avx2(const float* g, const float* u, float* h, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(h + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i == n) return;
  alignas(32) float out[8];
  _mm256_store_ps(out, silu_mul8(Tail(g + i, n - i).load(), Tail(u + i, n - i).load()));
  std::copy_n(out, n - i, h + i);
}

void silu_mul_grad_avx2(const float* g, const float* u, const float* dh, float w, float* dg, float* du,
                        int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  __m256 dgv, duv;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    silu_mul_grad8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i), _mm256_mul_ps(wv, _mm256_loadu_ps(dh + i)),
                   &dgv, &duv);
    _mm256_storeu_ps(dg + i, dgv);
    _mm256_storeu_ps(du + i, duv);
  }
  if (i == n) return;
  silu_mul_grad8(Tail(g + i, n - i).load(), Tail(u + i, n - i).load(),
                 _mm256_mul_ps(wv, Tail(dh + i, n - i).load()), &dgv, &duv);
  alignas(32) float out_dg[8], out_du[8];
  _mm256_store_ps(out_dg, dgv);
  _mm256_store_ps(out_du, duv);
  std::copy_n(out_dg, n - i, dg + i);
  std::copy_n(out_du, n - i, du + i);
}

namespace {

inline float sum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

inline float max8(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

}  // namespace

// Whole groups of 8 in vectors, the last n % 8 values one by one (in 8 lanes, masked, for exp: the same
// bits as the AVX-512 version).
float row_max_avx2(const float* s, int64_t n, float m) {
  __m256 best = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(s + i));
  m = max8(best);
  for (; i < n; ++i) m = s[i] > m ? s[i] : m;
  return m;
}

float exp_shift_avx2(const float* s, float m, float* p, int64_t n) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(p + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < n) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = i; t < n; ++t) tail[t - i] = s[t];
    const __m256 keep = _mm256_cmp_ps(_mm256_set1_ps(static_cast<float>(n - i)),
                                      _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _CMP_GT_OQ);
    const __m256 e = _mm256_and_ps(keep, exp8(_mm256_sub_ps(_mm256_load_ps(tail), mv)));
    _mm256_store_ps(tail, e);
    for (int64_t t = i; t < n; ++t) p[t] = tail[t - i];
    sum = _mm256_add_ps(sum, e);
  }
  return sum8(sum);
}

}  // namespace ktjax
