// AVX2 + FMA micro-kernel, 6x16 f32 tile in 12 ymm accumulators. Compiled with -mavx2 -mfma.
#include <immintrin.h>

#include "gemm_kernels.h"

namespace ktjax {

namespace {

inline void microkernel_step(const float* a, const float* b, __m256 (&c0)[6], __m256 (&c1)[6]) {
  const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    const __m256 ai = _mm256_broadcast_ss(a + i);
    c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
    c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
  }
}

}  // namespace

// Constant row indices throughout (rows past mr skipped by a test), so that the accumulators stay in
// registers; see microkernel_avx512.
void microkernel_avx2(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                      float alpha, bool acc) {
  constexpr int MR = 6, NR = 16;
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) microkernel_step(a + k * MR, b + k * NR, c0, c1);
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    if (i >= mr) break;
    float* p = c[i];
    if (nr == NR) {
      __m256 r0 = _mm256_mul_ps(c0[i], va), r1 = _mm256_mul_ps(c1[i], va);
      if (acc) {
        r0 = _mm256_add_ps(r0, _mm256_loadu_ps(p));
        r1 = _mm256_add_ps(r1, _mm256_loadu_ps(p + 8));
      }
      _mm256_storeu_ps(p, r0);
      _mm256_storeu_ps(p + 8, r1);
    } else {
      alignas(32) float tmp[NR];
      _mm256_store_ps(tmp, _mm256_mul_ps(c0[i], va));
      _mm256_store_ps(tmp + 8, _mm256_mul_ps(c1[i], va));
      for (int j = 0; j < nr; ++j) p[j] = (acc ? p[j] : 0.0f) + tmp[j];
    }
  }
}

}  // namespace ktjax
