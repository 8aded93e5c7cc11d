// k-masks, epilogues, horizontal sums and the bf16 pair interleave shared by the AVX-512 translation units
// (gemm_avx512.cc, gemm_avx512_bf16.cc, activation_avx512.cc); include only from files compiled with
// -mavx512f -mavx512bw.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ktjax {

// The k-mask of the first n of 16 lanes (none for n <= 0, all for n >= 16): edge tiles and row tails.
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// The k-mask of the first n of 32 16-bit lanes (none for n <= 0, all for n >= 32): bf16 row tails.
inline __mmask32 first_lanes32(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : (__mmask32(1) << n) - 1;
}

// The 6x32 micro-kernels' epilogue (f32 and bf16 pairs): c[i][0:nr] = (acc ? c[i][0:nr] : 0) + alpha *
// [c0[i], c1[i]] for i < mr. Constant row indices (rows past mr skipped by a test), so that the caller's
// accumulators stay in registers.
__attribute__((always_inline)) inline void store_tile6x32(const __m512 (&c0)[6], const __m512 (&c1)[6],
                                                          float* const* c, int mr, int nr, float alpha, bool acc) {
  const __m512 va = _mm512_set1_ps(alpha);
  const __mmask16 m0 = first_lanes(nr), m1 = first_lanes(nr - 16);
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    if (i >= mr) break;
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

// Sums of 4 vectors: lane j of the result is the sum of v[j]'s 16 lanes.
inline __m128 reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  // per 128-bit lane: [v0, v1, v2, v3] partial sums
  __m512 s = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, 0x4E));
  s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, 0xB1));
  return _mm512_castps512_ps128(s);
}

// The dot kernels' epilogue (gemm_avx512.cc, gemm_avx512_bf16.cc): s[j][i] holds the partial sums of
// token row i against weight row j; c[i][j] = (acc ? c[i][j] : 0) + alpha * (sum of its lanes), j < nw.
template <int MB>
__attribute__((always_inline)) inline void store_dot_sums(const __m512 (&s)[4][MB], int nw, float* const* c,
                                                          float alpha, bool acc) {
  const __m128 va = _mm_set1_ps(alpha);
#pragma GCC unroll 6
  for (int i = 0; i < MB; ++i) {
    __m128 r = _mm_mul_ps(reduce4(s[0][i], s[1][i], s[2][i], s[3][i]), va);
    if (nw == 4) {
      if (acc) r = _mm_add_ps(r, _mm_loadu_ps(c[i]));
      _mm_storeu_ps(c[i], r);
    } else {
      float v[4];
      _mm_storeu_ps(v, r);
      for (int j = 0; j < nw; ++j) c[i][j] = (acc ? c[i][j] : 0.0f) + v[j];
    }
  }
}

// 32 bf16 values of two stored rows k and k + 1 as pairs (the pair path, gemm.h): the pairs of columns
// 0..15 (first) and 16..31 (second), each two-source permute taking one value from each row.
alignas(64) inline constexpr uint16_t kPairLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) inline constexpr uint16_t kPairHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
inline __m512i pairs_first(__m512i r0, __m512i r1) {
  return _mm512_permutex2var_epi16(r0, _mm512_load_si512(kPairLo), r1);
}
inline __m512i pairs_second(__m512i r0, __m512i r1) {
  return _mm512_permutex2var_epi16(r0, _mm512_load_si512(kPairHi), r1);
}

}  // namespace ktjax
