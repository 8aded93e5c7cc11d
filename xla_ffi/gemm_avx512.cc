// AVX-512F micro-kernel, 6x32 f32 tile in 12 zmm accumulators; masked stores for edge tiles.
// Compiled with -mavx512f -mfma.
#include <immintrin.h>

#include "gemm_kernels.h"

namespace ktjax {

void microkernel_avx512(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                        float alpha, bool acc) {
  constexpr int MR = 6, NR = 32;
  __m512 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xffff) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xffff)
                       : nr > 16 ? __mmask16((1u << (nr - 16)) - 1)
                                 : __mmask16(0);
  for (int i = 0; i < mr; ++i) {
    float* p = c[i];
    __m512 r0 = _mm512_mul_ps(c0[i], va), r1 = _mm512_mul_ps(c1[i], va);
    if (acc) {
      r0 = _mm512_add_ps(r0, _mm512_maskz_loadu_ps(m0, p));
      r1 = _mm512_add_ps(r1, _mm512_maskz_loadu_ps(m1, p + 16));
    }
    _mm512_mask_storeu_ps(p, m0, r0);
    _mm512_mask_storeu_ps(p + 16, m1, r1);
  }
}

}  // namespace ktjax
