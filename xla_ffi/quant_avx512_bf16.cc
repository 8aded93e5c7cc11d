// The quantized pair path (QuantCodeReader, QuantPairDotKernel in gemm.h), compiled with -mavx512f
// -mavx512bw -mavx512bf16: a quantized weight's codes widened to bf16 (exactly: every int8, int4 and e4m3
// code is a bf16 value), 32 at a time, and multiplied by bf16 token values with vdpbf16ps, the scales
// applied to each segment's sums.
#include <immintrin.h>

#include <algorithm>

#include "avx512_masks.h"
#include "gemm_kernels.h"

namespace ktjax {

namespace {

// The driver reads the codes 4 rows at a time, a block of columns of each in turn: each step fetches into
// L2 the same columns of the row this many rows on (two groups later), one line per step, so that the
// requests are spread over the work (docs/performance-log.md has the alternatives measured).
constexpr int64_t kQuantRowsAhead = 8;

// bf16 bits of 0..15 (the int4 codes), looked up by vpermw (indices 16..31 unused).
alignas(64) constexpr uint16_t kInt4Bf16[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                                 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

// 32 int8 codes as bf16: widened to f32 (exact), then narrowed (exact: at most 8 significant bits).
inline __m512i int8x32(const uint8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// 32 int4 codes (16 bytes, low nibble first) as bf16: each byte's two nibbles into the two 16-bit halves
// of a 32-bit lane (column order), then each looked up.
inline __m512i int4x32(const uint8_t* p) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i nibbles = _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0x0f)),
                                          _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xf0)), 12));
  return _mm512_permutexvar_epi16(nibbles, _mm512_load_si512(kInt4Bf16));
}

// bf16 bits of the e4m3 subnormals m 2^-9, m = 0..7 (m = 0: +0), looked up by vpermw.
alignas(64) constexpr uint16_t kFp8SubnormalBf16[32] = {0x0000, 0x3b00, 0x3b80, 0x3bc0, 0x3c00, 0x3c20, 0x3c40, 0x3c60};

// 32 e4m3fn codes as bf16, bit by bit: a normal's exponent field e (bias 7) becomes e + 120 (bias 127)
// and its 3 mantissa bits the top 3 of bf16's 7; zero and the subnormals come from a table; 0x7f / 0xff
// (NaN) become a quiet NaN; the sign stays. Exact: every e4m3 value is a bf16 value.
inline __m512i fp8x32(const uint8_t* p) {
  const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi16(0x7f));
  __m512i r = _mm512_add_epi16(_mm512_slli_epi16(magnitude, 4), _mm512_set1_epi16(0x3c00));
  const __mmask32 subnormal = _mm512_cmplt_epu16_mask(magnitude, _mm512_set1_epi16(8));
  r = _mm512_mask_permutexvar_epi16(r, subnormal, magnitude, _mm512_load_si512(kFp8SubnormalBf16));
  const __mmask32 nan = _mm512_cmpeq_epi16_mask(magnitude, _mm512_set1_epi16(0x7f));
  r = _mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(0x7fc0));
  return _mm512_or_si512(r, _mm512_slli_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x80)), 8));
}

// MB token rows against 4 rows of codes, 32 values per step. With kSegments, each segment's sums are
// scaled into totals (MB <= 3: 2 * 4 * MB accumulators); without (one scale a row), the sums are scaled
// once at the end (MB <= 6).
template <int MB, bool kSegments>
void quant_pair_tile(int64_t kc, const uint16_t* a, int64_t lda, const uint16_t* q, int64_t ldq, int nw,
                     int64_t seg, const QuantScales& sc, float* const* c, float alpha, bool acc) {
  const float* scale = sc.scale;
  const int64_t lds = kQuantSegments;
  __m512 s[4][MB], t[4][MB];
  const int64_t step = kSegments ? seg : kc;
  for (int64_t k0 = 0, g = 0; k0 < kc; k0 += step, ++g) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
#pragma GCC unroll 6
      for (int i = 0; i < MB; ++i) s[j][i] = _mm512_setzero_ps();
    }
    const int64_t end = std::min(kc, k0 + step);
    for (int64_t k = k0; k < end; k += 32) {
      __m512i wv[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(q + j * ldq + k);
#pragma GCC unroll 6
      for (int i = 0; i < MB; ++i) {
        const __m512i av = _mm512_loadu_si512(a + i * lda + k);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          s[j][i] = _mm512_dpbf16_ps(s[j][i], reinterpret_cast<__m512bh>(av), reinterpret_cast<__m512bh>(wv[j]));
        }
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 vs = _mm512_set1_ps(scale[j * lds + g]);
#pragma GCC unroll 6
      for (int i = 0; i < MB; ++i) {
        if constexpr (kSegments) {
          t[j][i] = g == 0 ? _mm512_mul_ps(s[j][i], vs) : _mm512_fmadd_ps(s[j][i], vs, t[j][i]);
        } else {
          s[j][i] = _mm512_mul_ps(s[j][i], vs);
        }
      }
    }
  }
  if constexpr (kSegments) {
    if (sc.mins != nullptr) {  // + the mins times the token rows' sums, segment by segment (lane by lane)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512 vm = _mm512_loadu_ps(sc.mins + j * kQuantSegments);
#pragma GCC unroll 6
        for (int i = 0; i < MB; ++i) t[j][i] = _mm512_fmadd_ps(vm, _mm512_loadu_ps(sc.sums + i * sc.ld_sums), t[j][i]);
      }
    }
    store_dot_sums<MB>(t, nw, c, alpha, acc);
  } else {
    store_dot_sums<MB>(s, nw, c, alpha, acc);
  }
}

template <bool kSegments>
void quant_pair_tiles(int64_t kc, const uint16_t* a, int64_t lda, int m, const uint16_t* q, int64_t ldq, int nw,
                      int64_t seg, const QuantScales& sc, float* const* c, float alpha, bool acc) {
  constexpr int kRows = kSegments ? 3 : 6;
  auto rows_from = [&](int i) {  // the scales as seen from token row i
    QuantScales s = sc;
    if (s.sums != nullptr) s.sums += i * s.ld_sums;
    return s;
  };
  int i = 0;
  for (; i + kRows <= m; i += kRows) {
    quant_pair_tile<kRows, kSegments>(kc, a + i * lda, lda, q, ldq, nw, seg, rows_from(i), c + i, alpha, acc);
  }
  if (i < m) {
    with_tile_rows(m - i, [&](auto MB) {
      if constexpr (decltype(MB)::value <= kRows) {
        quant_pair_tile<MB, kSegments>(kc, a + i * lda, lda, q, ldq, nw, seg, rows_from(i), c + i, alpha, acc);
      }
    });
  }
}

// Word indices that interleave a vector of 16 words of row k (low half) and 16 of row k + 1 (high half)
// into 16 pairs: word 2j is row k's j-th, word 2j + 1 row k + 1's.
alignas(64) constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// Values [c, c + 32) of view row r as f32 in two vectors (columns 0-15, 16-31), with dequantize_row's
// operations, where the 32 columns lie in one segment (int4: start on a group's block of 32): true; else
// false (the caller then dequantizes them with dequantize_row).
inline bool dequant32(const QuantWeight& w, int64_t r, int64_t c, float mul, __m512* lo, __m512* hi) {
  const int64_t row = w.r0 + r, col = w.c0 + c;
  __m512i codes;
  __m512 scale, min = _mm512_setzero_ps();
  switch (w.format) {
    case QuantFormat::kInt8:
      codes = int8x32(w.row_bytes(r, c));
      scale = _mm512_set1_ps(w.f32_scales()[row] * mul);
      break;
    case QuantFormat::kInt4: {
      if (col % 32 != 0) return false;  // G is a multiple of 32: the 32 columns share a group
      float s, m;
      w.int4_pair(row, col / w.group, &s, &m);
      codes = int4x32(w.row_bytes(r, c));
      scale = _mm512_set1_ps(s);
      min = _mm512_set1_ps(m);
      break;
    }
    case QuantFormat::kFp8: {
      if (col % w.block_cols + 32 > w.block_cols) return false;
      const int64_t blocks = (w.cols + w.block_cols - 1) / w.block_cols;
      codes = fp8x32(w.row_bytes(r, c));
      scale = _mm512_set1_ps(w.f32_scales()[row / w.group * blocks + col / w.block_cols] * mul);
      break;
    }
  }
  const __m512 q[2] = {_mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_castsi512_si256(codes))),
                       _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_extracti64x4_epi64(codes, 1)))};
  __m512 v[2];
  for (int h = 0; h < 2; ++h) {
    v[h] = _mm512_mul_ps(q[h], scale);
    if (w.format == QuantFormat::kInt4) {  // (q s + m) mul, dequantize_row's order (the compiler may fuse q s + m:
      // the bf16 rounding that follows is within the tests' bound either way)
      v[h] = _mm512_add_ps(v[h], min);
      if (mul != 1.0f) v[h] = _mm512_mul_ps(v[h], _mm512_set1_ps(mul));
    }
  }
  *lo = v[0];
  *hi = v[1];
  return true;
}

}  // namespace

void quant_pair_rows_avx512bf16(const QuantWeight& w, int64_t k, bool two, int64_t c, int64_t n, float mul0,
                                float mul1, int64_t stride, uint32_t* dst) {
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t j = 0; j < n; j += 32, dst += stride) {
    const int64_t len = std::min<int64_t>(32, n - j);
    __m512 a[2], b[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    bool vector = len == 32 && dequant32(w, k, c + j, mul0, &a[0], &a[1]);
    if (vector && two) vector = dequant32(w, k + 1, c + j, mul1, &b[0], &b[1]);
    if (!vector) {  // a ragged or misaligned block: dequantize_row, then the same rounding
      alignas(64) float rows[2][32] = {};
      w.dequantize_row(k, c + j, len, mul0, rows[0]);
      if (two) w.dequantize_row(k + 1, c + j, len, mul1, rows[1]);
      for (int h = 0; h < 2; ++h) {
        a[h] = _mm512_load_ps(rows[0] + 16 * h);
        b[h] = _mm512_load_ps(rows[1] + 16 * h);
      }
    }
    for (int h = 0; h < 2; ++h) {  // row k's 16 values in the low words, row k + 1's in the high ones
      const __m512i words = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b[h], a[h]));
      _mm512_storeu_si512(dst + 16 * h, _mm512_permutexvar_epi16(interleave, words));
    }
  }
}

void quant_codes_avx512bf16(const QuantWeight& w, int64_t r, int64_t c, int64_t n, uint16_t* dst) {
  int64_t j = 0;
  const uint8_t* row = w.row_bytes(r, 0);
  // the same columns kQuantRowsAhead stored rows on (the driver's group of 4 rows that many rows later),
  // or nothing past the last row
  const bool has_ahead = w.r0 + r + kQuantRowsAhead < w.rows;
  const char* ahead = reinterpret_cast<const char*>(w.row_bytes(has_ahead ? r + kQuantRowsAhead : r, c));
  switch (w.format) {
    case QuantFormat::kInt8:
      for (; j + 32 <= n; j += 32) {
        _mm_prefetch(ahead + j, _MM_HINT_T1);
        _mm512_storeu_si512(dst + j, int8x32(row + c + j));
      }
      break;
    case QuantFormat::kInt4: {  // (c0 + c) even: byte (c0 + c + j) / 2 holds columns c + j and c + j + 1
      const uint8_t* bytes = w.row_bytes(r, c);
      for (; j + 32 <= n; j += 32) {
        _mm_prefetch(ahead + j / 2, _MM_HINT_T1);
        _mm512_storeu_si512(dst + j, int4x32(bytes + j / 2));
      }
      break;
    }
    case QuantFormat::kFp8:
      for (; j + 32 <= n; j += 32) {
        _mm_prefetch(ahead + j, _MM_HINT_T1);
        _mm512_storeu_si512(dst + j, fp8x32(row + c + j));
      }
      break;
  }
  for (; j < n; ++j) dst[j] = f32_to_bf16(w.code(r, c + j));
}

void quant_pair_dot_avx512bf16(int64_t kc, const uint16_t* a, int64_t lda, int m, const uint16_t* q, int64_t ldq,
                               int nw, int64_t seg, const QuantScales& sc, float* const* c, float alpha, bool acc) {
  if (seg >= kc && sc.mins == nullptr) return quant_pair_tiles<false>(kc, a, lda, m, q, ldq, nw, seg, sc, c, alpha, acc);
  quant_pair_tiles<true>(kc, a, lda, m, q, ldq, nw, seg, sc, c, alpha, acc);
}

}  // namespace ktjax
