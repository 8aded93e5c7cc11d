// AVX2 + FMA kernels: the micro-kernel (6x16 f32 tile in 12 ymm accumulators), the small-batch dot and
// direct kernels with the dot kernel's row packer, the panel and row-panel packers and the bf16
// rounder. Compiled with -mavx2 -mfma.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

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

// 16 values (r0, then r1) into p[0:n], added to what is there when acc; n < 16 through a temporary.
inline void store16(float* p, __m256 r0, __m256 r1, int n, bool acc) {
  if (n == 16) {
    if (acc) {
      r0 = _mm256_add_ps(r0, _mm256_loadu_ps(p));
      r1 = _mm256_add_ps(r1, _mm256_loadu_ps(p + 8));
    }
    _mm256_storeu_ps(p, r0);
    _mm256_storeu_ps(p + 8, r1);
    return;
  }
  alignas(32) float tmp[16];
  _mm256_store_ps(tmp, r0);
  _mm256_store_ps(tmp + 8, r1);
  for (int j = 0; j < n; ++j) p[j] = (acc ? p[j] : 0.0f) + tmp[j];
}

// In place: r[j] becomes column j of the 8x8 block whose rows were r[0..7].
inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);  // per 128-bit lane: a0 b0 a1 b1
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // rows 4i..4i+3: s[4i + c] holds column c of them (both lanes)
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
  }
}

inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// One full panel of 16 stored rows, transposed: dst[k * 16 + j] = rows[j][k] * scale[j]. Blocks of 8 x 8
// are transposed in registers and stored as whole rows of the panel (the portable loop stores one
// value per cache line).
template <typename T>
void pack_panel16(const T* const* rows, const float* scale, int64_t kc, float* dst) {
  __m256 v[8];
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < 8; ++i) v[i] = _mm256_mul_ps(load8(rows[8 * h + i] + k), _mm256_set1_ps(scale[8 * h + i]));
      transpose8(v);
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(dst + (k + c) * 16 + 8 * h, v[c]);
    }
  }
  for (; k < kc; ++k) {  // the last kc % 8 slices
    for (int j = 0; j < 16; ++j) dst[k * 16 + j] = widen1(rows[j][k]) * scale[j];
  }
}

// One full A-side panel of 6 stored rows, transposed: dst[k * 6 + i] = rows[i][k] * scale[i]. Blocks of
// 8 k are transposed with two zero rows; each slice of 6 is stored as 4 + 2 values.
template <typename T>
void pack_panel6(const T* const* rows, const float* scale, int64_t kc, float* dst) {
  __m256 v[8];
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int i = 0; i < 6; ++i) v[i] = _mm256_mul_ps(load8(rows[i] + k), _mm256_set1_ps(scale[i]));
    v[6] = v[7] = _mm256_setzero_ps();
    transpose8(v);
    for (int c = 0; c < 8; ++c) {
      float* d = dst + (k + c) * 6;
      _mm_storeu_ps(d, _mm256_castps256_ps128(v[c]));
      _mm_storel_pi(reinterpret_cast<__m64*>(d + 4), _mm256_extractf128_ps(v[c], 1));
    }
  }
  for (; k < kc; ++k) {  // the last kc % 8 slices
    for (int i = 0; i < 6; ++i) dst[k * 6 + i] = widen1(rows[i][k]) * scale[i];
  }
}

// 8 bf16 of every 32-bit pair widened to f32: the even elements (low halves) or the odd ones.
inline __m256 bf16_even8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
}
inline __m256 bf16_odd8(const uint16_t* p) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), high));
}

// Sums of 4 vectors: lane j of the result is the sum of v[j]'s 8 lanes.
inline __m128 reduce4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// R token rows (rows r0.. of a tile of mb rows in the dot layout) against 4 weight rows; see
// DotKernel in gemm.h, and F32DotKernel for W = float. 8 accumulators, 4 weight vectors and one token
// vector fill 13 of the 16 ymm registers. bf16 weights: each 32-byte load of 16 widens to its 8 even and
// 8 odd elements, which meet the token values at offsets 0 and 16 of the layout's block of 32, and the
// next 4 rows are prefetched on the way. f32 weights (a dequantized buffer in L1): in column order, as
// the token values are.
template <int R, typename W>
void dot_rows(int64_t kc, const float* tile, int mb, int r0, const W* w, int64_t ldw, int nw,
              float* const* c, float alpha, bool acc, PrefetchSlice slice) {
  __m256 s[4][R];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
#pragma GCC unroll 2
    for (int i = 0; i < R; ++i) s[j][i] = _mm256_setzero_ps();
  }
  // wv = 4 weight vectors, then s += the R token vectors at offset `at` of their block times them
  const auto multiply = [&s](const float* a, int at, const __m256 (&wv)[4]) {
#pragma GCC unroll 2
    for (int i = 0; i < R; ++i) {
      const __m256 av = _mm256_loadu_ps(a + i * 32 + at);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) s[j][i] = _mm256_fmadd_ps(av, wv[j], s[j][i]);
    }
  };
  const W* next = w + 4 * ldw;
  int until_prefetch = slice.phase;
  for (int64_t k = 0, b = 0; k < kc; k += 32, ++b) {
    const float* a = tile + (b * mb + r0) * 32;
    __m256 wv[4];
    if constexpr (std::is_same_v<W, float>) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k + 8 * q);
        multiply(a, 8 * q, wv);
      }
    } else {
      if (until_prefetch-- == 0) {
        for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldw + k), _MM_HINT_T1);
        until_prefetch = slice.period - 1;
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {  // weights k + 16 h .. k + 16 h + 15: token values 8 h.. (even), 16 + 8 h.. (odd)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) wv[j] = bf16_even8(w + j * ldw + k + 16 * h);
        multiply(a, 8 * h, wv);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) wv[j] = bf16_odd8(w + j * ldw + k + 16 * h);
        multiply(a, 16 + 8 * h, wv);
      }
    }
  }
  const __m128 va = _mm_set1_ps(alpha);
#pragma GCC unroll 2
  for (int i = 0; i < R; ++i) {
    float* p = c[r0 + i];
    __m128 r = _mm_mul_ps(reduce4(s[0][i], s[1][i], s[2][i], s[3][i]), va);
    if (nw == 4) {
      if (acc) r = _mm_add_ps(r, _mm_loadu_ps(p));
      _mm_storeu_ps(p, r);
    } else {
      float v[4];
      _mm_storeu_ps(v, r);
      for (int j = 0; j < nw; ++j) p[j] = (acc ? p[j] : 0.0f) + v[j];
    }
  }
}

// The dot kernels' tiles of 6 rows in the layout, each run as pairs of rows; every pair reads the same 4
// weight rows and (bf16) prefetches its share of the next 4.
template <typename W>
void dot_tiles(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const W* w, int64_t ldw, int nw,
               float* const* c, float alpha, bool acc) {
  const int pairs = (m + 1) / 2;
  for (int i = 0; i < m; i += 6) {
    const int mb = std::min(6, m - i);
    const float* tile = a + i * lda + k0 * mb;
    for (int r0 = 0; r0 < mb; r0 += 2) {
      const PrefetchSlice slice{(i + r0) / 2, pairs};
      if (r0 + 2 <= mb) dot_rows<2>(kc, tile, mb, r0, w, ldw, nw, c + i, alpha, acc, slice);
      else dot_rows<1>(kc, tile, mb, r0, w, ldw, nw, c + i, alpha, acc, slice);
    }
  }
}

// MR rows of A (packed 6 apart) against 16 bf16 columns read in place (a quarter of the direct
// kernel's block; see DirectKernel in gemm.h): even and odd columns in 2 x MR accumulators, put back in
// order at the end. `valid` of the 16 columns are stored. The copy (kDirectCols floats per k) holds
// the widened even and odd columns: with kFromCopy they are read from there (w unused), else from w,
// and written there when copy != null. With next, `lines` 64-byte lines per row of the next block are
// prefetched into L2 at the steps that `slice` selects.
template <int MR, bool kFromCopy>
void direct_cols16(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int valid,
                   float alpha, bool acc, float* copy, const uint16_t* next, int64_t next_ld, int lines,
                   PrefetchSlice slice) {
  __m256 ce[MR], co[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) ce[i] = co[i] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int until_prefetch = next != nullptr ? slice.phase : -1;
  for (int64_t k = 0; k < kc; ++k, a += 6, w += ldw, next += next_ld) {
    if (until_prefetch-- == 0) {
      for (int l = 0; l < lines; ++l) _mm_prefetch(reinterpret_cast<const char*>(next + 32 * l), _MM_HINT_T1);
      until_prefetch = slice.period - 1;
    }
    __m256 we, wo;
    if constexpr (kFromCopy) {
      we = _mm256_loadu_ps(copy + k * kDirectCols);
      wo = _mm256_loadu_ps(copy + k * kDirectCols + 8);
    } else {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      if (copy != nullptr) {
        _mm256_storeu_ps(copy + k * kDirectCols, we);
        _mm256_storeu_ps(copy + k * kDirectCols + 8, wo);
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      ce[i] = _mm256_fmadd_ps(ai, we, ce[i]);
      co[i] = _mm256_fmadd_ps(ai, wo, co[i]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    // unpack within 128-bit lanes: lo = columns 0-3 | 8-11, hi = 4-7 | 12-15
    const __m256 lo = _mm256_unpacklo_ps(ce[i], co[i]), hi = _mm256_unpackhi_ps(ce[i], co[i]);
    store16(c[i], _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x20), va),
            _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x31), va), valid, acc);
  }
}

template <int MR>
void direct_quarters(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int nr,
                     float alpha, bool acc, const DirectRows& rows) {
  using Copy = DirectRows::Copy;
  float* cq[MR];
  for (int q = 0; 16 * q < nr; ++q) {
    for (int i = 0; i < MR; ++i) cq[i] = c[i] + 16 * q;
    const bool first = q == 0;  // prefetches the next block's rows: both lines when nr > 32
    const int valid = std::min(16, nr - 16 * q), lines = nr > 32 ? 2 : 1;
    const uint16_t* next = first ? rows.prefetch : nullptr;
    if (rows.copy_mode == Copy::kRead) {
      direct_cols16<MR, true>(kc, a, nullptr, 0, cq, valid, alpha, acc, rows.copy + 16 * q, next, rows.prefetch_ld,
                              lines, rows.slice);
    } else {
      direct_cols16<MR, false>(kc, a, w + 16 * q, ldw, cq, valid, alpha, acc,
                               rows.copy_mode == Copy::kWrite ? rows.copy + 16 * q : nullptr, next,
                               rows.prefetch_ld, lines, rows.slice);
    }
  }
}

}  // namespace

void direct_bf16_avx2(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int mr, int nr,
                      float alpha, bool acc, const DirectRows& rows) {
  with_tile_rows(mr, [&](auto MR) { direct_quarters<MR>(kc, a, w, ldw, c, nr, alpha, acc, rows); });
}

void dot_bf16_avx2(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                   int nw, float* const* c, float alpha, bool acc) {
  dot_tiles(k0, kc, a, lda, m, w, ldw, nw, c, alpha, acc);
}

void dot_f32_avx2(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const float* w, int64_t ldw, int nw,
                  float* const* c, float alpha, bool acc) {
  dot_tiles(k0, kc, a, lda, m, w, ldw, nw, c, alpha, acc);
}

void pack_bf16_panel_avx2(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel16(rows, scale, kc, dst);
}

void pack_f32_panel_avx2(const float* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel16(rows, scale, kc, dst);
}

void pack_bf16_a_panel_avx2(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel6(rows, scale, kc, dst);
}

void pack_f32_a_panel_avx2(const float* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel6(rows, scale, kc, dst);
}

void round_bf16_avx2(const float* src, uint16_t* dst, int64_t n) {
  // round_bf16_avx512 with 8 lanes: nearest even, NaN kept quiet (f32_to_bf16 in dtype.h, one by one)
  const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + i));
    const __m256i top = _mm256_srli_epi32(u, 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);  // |u| < 2^31: signed is fine
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(top, one))), 16);
    r = _mm256_blendv_epi8(r, _mm256_or_si256(top, quiet), nan);
    // 8 values < 2^16 to 16 bits: packus works per 128-bit lane, so gather its two low quarters
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

namespace {

// See RowPanelPacker (gemm.h): 8 values per load where a panel's row has them, the edges one by one.
template <typename T>
void pack_row_panels8(const T* src, float scale, int64_t n, int64_t width, int64_t stride, float* dst) {
  const __m256 vs = _mm256_set1_ps(scale);
  for (int64_t c0 = 0; c0 < n; c0 += width, dst += stride) {
    const int64_t valid = std::min(width, n - c0);
    int64_t j = 0;
    for (; j + 8 <= valid; j += 8) _mm256_storeu_ps(dst + j, _mm256_mul_ps(load8(src + c0 + j), vs));
    for (; j < valid; ++j) dst[j] = widen1(src[c0 + j]) * scale;
    for (; j < width; ++j) dst[j] = 0.0f;
  }
}

}  // namespace

void pack_row_panels_avx2(const void* src, DType dtype, float scale, int64_t n, int64_t width, int64_t stride,
                          float* dst) {
  if (dtype == DType::kBF16) {
    pack_row_panels8(static_cast<const uint16_t*>(src), scale, n, width, stride, dst);
  } else {
    pack_row_panels8(static_cast<const float*>(src), scale, n, width, stride, dst);
  }
}

void pack_dot_row_avx2(const void* src, DType dtype, float scale, int64_t n, int64_t stride, float* dst) {
  // Token rows only (a few per expert): the portable block packer is cheap next to the products.
  for (int64_t k0 = 0; k0 < n; k0 += 32, dst += stride) {
    pack_dot_block(src, dtype, scale, k0, std::min<int64_t>(32, n - k0), dst);
  }
}

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
    store16(c[i], _mm256_mul_ps(c0[i], va), _mm256_mul_ps(c1[i], va), nr, acc);
  }
}

}  // namespace ktjax
