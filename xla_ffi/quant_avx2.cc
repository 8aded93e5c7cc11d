// The AVX2 row dequantizer of quantized weights (QuantRowReader in gemm.h; formats in quant.h), used by
// the AVX2 and AVX-512 ISAs. Compiled with -mavx2 -mf16c and without -mfma, so that no product and sum
// is fused: the values are exactly QuantWeight::dequantize_row's, as the tests check bit for bit.
#include <immintrin.h>

#include <algorithm>

#include "gemm_kernels.h"

namespace ktjax {

namespace {

// 8 int8 values widened to f32.
inline __m256 int8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// 16 int4 values (8 bytes, the low nibble first) widened to f32: q[0] columns 0-7, q[1] columns 8-15.
inline void int4x16(const uint8_t* p, __m256 (&q)[2]) {
  const __m128i nibble = _mm_set1_epi8(0x0f);
  const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i v = _mm_unpacklo_epi8(_mm_and_si128(x, nibble), _mm_and_si128(_mm_srli_epi16(x, 4), nibble));
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
}

// 8 e4m3fn values as f32, divided by 256: each byte's bits moved into an f16 (sign; exponent and
// mantissa 7 places up, so that the f16 exponent's bias of 15 reads e4m3's 7 as 15: a factor 2^-8, on
// subnormals too), 0x7f / 0xff made f16 NaNs, and converted by vcvtph2ps, exactly.
inline __m256 fp8x8_over256(const uint8_t* p) {
  const __m128i x = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i magnitude = _mm_and_si128(x, _mm_set1_epi16(0x7f));
  __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(x, _mm_set1_epi16(0x80)), 8), _mm_slli_epi16(magnitude, 7));
  const __m128i nan = _mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x7f));
  h = _mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x7e00)));
  return _mm256_cvtph_ps(h);
}

}  // namespace

void dequant_row_avx2(const QuantWeight& w, int64_t r, int64_t c, int64_t n, float mul, float* dst) {
  // QuantWeight::dequantize_row's arithmetic, 8 or 16 values at a time (the same products and sums, so
  // the same values); the edges of each run through it.
  const int64_t row = w.r0 + r, col0 = w.c0 + c;
  const uint8_t* data = w.data + row * w.data_ld();
  switch (w.format) {
    case QuantFormat::kInt8: {
      const float s = w.f32_scales()[row] * mul;
      const __m256 vs = _mm256_set1_ps(s);
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, _mm256_mul_ps(int8x8(data + col0 + j), vs));
      if (j < n) w.dequantize_row(r, c + j, n - j, mul, dst + j);
      return;
    }
    case QuantFormat::kInt4: {
      for (int64_t j = 0; j < n;) {
        const int64_t col = col0 + j, g = col / w.group;
        const int64_t len = std::min(n - j, (g + 1) * w.group - col);
        int64_t k = 0;
        if (col % 2 == 0) {
          float scale, min;
          w.int4_pair(row, g, &scale, &min);
          const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(min);
          const __m256 vmul = _mm256_set1_ps(mul);
          for (; k + 16 <= len; k += 16) {
            __m256 q[2];
            int4x16(data + (col + k) / 2, q);
            for (int h = 0; h < 2; ++h) {
              const __m256 v = _mm256_add_ps(_mm256_mul_ps(q[h], vs), vm);
              _mm256_storeu_ps(dst + j + k + 8 * h, mul == 1.0f ? v : _mm256_mul_ps(v, vmul));  // x * 1 = x
            }
          }
        }
        if (k < len) w.dequantize_row(r, c + j + k, len - k, mul, dst + j + k);
        j += len;
      }
      return;
    }
    case QuantFormat::kFp8: {
      const int64_t blocks = (w.cols + w.block_cols - 1) / w.block_cols;
      const float* s = w.f32_scales() + row / w.group * blocks;
      for (int64_t j = 0; j < n;) {
        const int64_t col = col0 + j, b = col / w.block_cols;
        const int64_t len = std::min(n - j, (b + 1) * w.block_cols - col);
        const __m256 vs = _mm256_set1_ps(s[b] * mul * 256.0f);
        int64_t k = 0;
        for (; k + 8 <= len; k += 8) _mm256_storeu_ps(dst + j + k, _mm256_mul_ps(fp8x8_over256(data + col + k), vs));
        if (k < len) w.dequantize_row(r, c + j + k, len - k, mul, dst + j + k);
        j += len;
      }
      return;
    }
  }
}

}  // namespace ktjax
