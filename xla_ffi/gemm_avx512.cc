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

namespace {

// Transposes 16 rows of 16 floats in place: r[i][j] -> r[j][i].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// 16 values widened to f32 and scaled.
inline __m512 load16(const uint16_t* p, float scale) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  return _mm512_mul_ps(f, _mm512_set1_ps(scale));
}
inline __m512 load16(const float* p, float scale) {
  return _mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(scale));
}
inline float widen1(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen1(float v) { return v; }

template <typename T>
void pack_panel32(const T* const* rows, const float* scale, int64_t kc, float* dst) {
  constexpr int NR = 32;
  int64_t k = 0;
  for (; k + 16 <= kc; k += 16) {
    for (int half = 0; half < 2; ++half) {  // rows [16*half, 16*half + 16) -> columns of dst
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = load16(rows[16 * half + i] + k, scale[16 * half + i]);
      transpose16(r);  // r[kk] = element k + kk of the 16 rows
      for (int kk = 0; kk < 16; ++kk) _mm512_storeu_ps(dst + (k + kk) * NR + 16 * half, r[kk]);
    }
  }
  for (; k < kc; ++k) {  // the last kc % 16 columns
    for (int j = 0; j < NR; ++j) dst[k * NR + j] = widen1(rows[j][k]) * scale[j];
  }
}

}  // namespace

void pack_bf16_panel_avx512(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel32(rows, scale, kc, dst);
}

void pack_f32_panel_avx512(const float* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel32(rows, scale, kc, dst);
}

}  // namespace ktjax
