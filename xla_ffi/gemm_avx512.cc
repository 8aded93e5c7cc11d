// AVX-512 kernels, compiled with -mavx512f -mavx512bw -mfma: the 6x32 f32 micro-kernel (12 zmm
// accumulators, masked stores for edge tiles), its panel packers, the small-batch dot and direct
// kernels that read bf16 weights in place, and the bf16 rounder.
#include <immintrin.h>

#include <algorithm>

#include "avx512_masks.h"
#include "gemm_kernels.h"

namespace ktjax {

namespace {

// One k step of the 6x32 tile: two B vectors, each A value broadcast once for both.
inline void microkernel_step(const float* a, const float* b, __m512 (&c0)[6], __m512 (&c1)[6]) {
  const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    const __m512 ai = _mm512_set1_ps(a[i]);
    c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
    c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
  }
}

}  // namespace

// All loops over the tile's rows use constant indices (unrolled, rows past mr skipped by a test), so
// that the 12 accumulators live in registers from start to end: with a loop bound of mr they were
// zeroed and stored through a stack array on every call. The k loop is unrolled 4 times, so the loop
// counter and pointer updates do not compete with the 12 FMAs for issue slots.
void microkernel_avx512(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                        float alpha, bool acc) {
  constexpr int MR = 6, NR = 32;
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) microkernel_step(a + k * MR, b + k * NR, c0, c1);
  store_tile6x32(c0, c1, c, mr, nr, alpha, acc);
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

// 16 bf16 values widened to f32 (exact: the bits move to the high half of each lane).
inline __m512 widen16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
// 16 values widened to f32 and scaled.
inline __m512 load16(const uint16_t* p, float scale) {
  const __m512 f = widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_mul_ps(f, _mm512_set1_ps(scale));
}
inline __m512 load16(const float* p, float scale) {
  return _mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(scale));
}

// 32 bf16 values in one 64-byte vector, widened to f32 in two halves: the even elements (shifted into
// the high half of their 32-bit lane) and the odd ones (already there: the even halves zeroed).
inline __m512 bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 bf16_odd(__m512i v) {
  return _mm512_castsi512_ps(_mm512_maskz_mov_epi16(0xAAAAAAAAu, v));  // a k-mask, not a zmm constant
}

// The weights it packs usually come from memory, 32 rows at a time (too many streams for the hardware
// prefetcher): each load also prefetches, into L2, the same row kc further on, where the driver's next
// depth block of the same panel starts, so those loads overlap with the products on this block.
template <typename T>
void pack_panel32(const T* const* rows, const float* scale, int64_t kc, float* dst) {
  constexpr int NR = 32;
  int64_t k = 0;
  for (; k + 16 <= kc; k += 16) {
    for (int half = 0; half < 2; ++half) {  // rows [16*half, 16*half + 16) -> columns of dst
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[16 * half + i] + k + kc), _MM_HINT_T1);
        r[i] = load16(rows[16 * half + i] + k, scale[16 * half + i]);
      }
      transpose16(r);  // r[kk] = element k + kk of the 16 rows
      for (int kk = 0; kk < 16; ++kk) _mm512_storeu_ps(dst + (k + kk) * NR + 16 * half, r[kk]);
    }
  }
  for (; k < kc; ++k) {  // the last kc % 16 columns
    for (int j = 0; j < NR; ++j) dst[k * NR + j] = widen1(rows[j][k]) * scale[j];
  }
}

// Permutation indices of interleave6, built once at compile time.
struct Interleave6 {
  // Stage 1: pair lane 2i+b = row b's element i (lo: elements 0..7, hi: 8..15).
  int32_t pair_lo[16], pair_hi[16];
  // Stage 2, per output vector m: its 8 float pairs, pair slot s = 8m + s of the 48, come from pair
  // stream s % 3 at pair index s / 3 (always in the half m / 3). Streams 0 and 1 by one two-source
  // permute (ab), stream 2 merged by a masked one (c, c_mask).
  int64_t ab[6][8], c[6][8];
  uint8_t c_mask[6];

  constexpr Interleave6() : pair_lo(), pair_hi(), ab(), c(), c_mask() {
    for (int i = 0; i < 16; ++i) {
      pair_lo[i] = i / 2 + 16 * (i % 2);
      pair_hi[i] = 8 + i / 2 + 16 * (i % 2);
    }
    for (int m = 0; m < 6; ++m) {
      for (int s = 0; s < 8; ++s) {
        const int slot = 8 * m + s, stream = slot % 3, index = slot / 3 % 8;
        ab[m][s] = stream == 1 ? 8 + index : index;
        c[m][s] = index;
        if (stream == 2) c_mask[m] = static_cast<uint8_t>(c_mask[m] | (1u << s));
      }
    }
  }
};
constexpr Interleave6 kInterleave6;

// Interleaves 6 rows of 16 values into 96: out[16 m + l] = v[(16 m + l) % 6][(16 m + l) / 6], i.e.
// 16 consecutive k-slices of a 6-row A panel. Rows are first zipped in pairs (3 streams of 16 float
// pairs), then the 3 streams are interleaved pair by pair as 64-bit elements.
inline void interleave6(const __m512 v[6], __m512 out[6]) {
  const Interleave6& t = kInterleave6;
  const __m512i lo = _mm512_loadu_si512(t.pair_lo), hi = _mm512_loadu_si512(t.pair_hi);
  __m512d pairs[3][2];
  for (int q = 0; q < 3; ++q) {
    pairs[q][0] = _mm512_castps_pd(_mm512_permutex2var_ps(v[2 * q], lo, v[2 * q + 1]));
    pairs[q][1] = _mm512_castps_pd(_mm512_permutex2var_ps(v[2 * q], hi, v[2 * q + 1]));
  }
  for (int m = 0; m < 6; ++m) {
    const int h = m / 3;
    const __m512d ab = _mm512_permutex2var_pd(pairs[0][h], _mm512_loadu_si512(t.ab[m]), pairs[1][h]);
    out[m] = _mm512_castpd_ps(
        _mm512_mask_permutexvar_pd(ab, t.c_mask[m], _mm512_loadu_si512(t.c[m]), pairs[2][h]));
  }
}

// One 6-row A panel: dst[k * 6 + i] = rows[i][k] * scale[i], 16 values of k per interleave.
template <typename T>
void pack_panel6(const T* const* rows, const float* scale, int64_t kc, float* dst) {
  __m512 v[6], out[6];
  int64_t k = 0;
  for (; k + 16 <= kc; k += 16, dst += 96) {
    for (int i = 0; i < 6; ++i) v[i] = load16(rows[i] + k, scale[i]);
    interleave6(v, out);
    for (int m = 0; m < 6; ++m) _mm512_storeu_ps(dst + 16 * m, out[m]);
  }
  for (; k < kc; ++k, dst += 6) {  // the last kc % 16 slices
    for (int i = 0; i < 6; ++i) dst[i] = widen1(rows[i][k]) * scale[i];
  }
}

// The pair packers (PairPanelPacker in gemm.h): a 32-bit word holds two consecutive bf16 values, so
// the f32 packers' transposes move pairs as they move floats. Groups of 16 whole pairs go through the
// transposes, the rest (and an odd kc's last pair, its high half zero) word by word.
inline __m512 load_pairs(const uint16_t* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
inline void store_pairs(uint32_t* dst, __m512 v) { _mm512_storeu_si512(dst, _mm512_castps_si512(v)); }

// n values of row src (from element c0), widened and scaled, as 16 lanes; lanes past n are zero.
inline __m512 load_masked(const void* src, DType dtype, int64_t c0, int64_t n, __m512 scale) {
  if (n <= 0) return _mm512_setzero_ps();
  const __mmask16 m = first_lanes(n);
  __m512 v;
  if (dtype == DType::kBF16) {
    v = widen16(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, static_cast<const uint16_t*>(src) + c0)));
  } else {
    v = _mm512_maskz_loadu_ps(m, static_cast<const float*>(src) + c0);
  }
  return _mm512_mul_ps(v, scale);
}

// MB token rows against the 4 weight rows; see DotKernel in gemm.h. The token rows are interleaved
// per block of 32 (one pointer walks them) and the loops use constant indices only, so that the 24
// accumulators, the 4 widened weight vectors and the addresses all stay in registers. The next 4
// weight rows are prefetched into L2 at the steps of 32 k selected by `slice` (see PrefetchSlice).
template <int MB>
void dot_tile(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, int nw, float* const* c,
              float alpha, bool acc, PrefetchSlice slice) {
  __m512 s[4][MB];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
#pragma GCC unroll 6
    for (int i = 0; i < MB; ++i) s[j][i] = _mm512_setzero_ps();
  }
  const uint16_t* next = w + 4 * ldw;
  int until_prefetch = slice.phase;
  for (int64_t k = 0; k < kc; k += 32, a += MB * 32) {
    if (until_prefetch-- == 0) {
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldw + k), _MM_HINT_T1);
      until_prefetch = slice.period - 1;
    }
    __m512 wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      wv[j] = bf16_even(_mm512_loadu_si512(w + j * ldw + k));
    }
#pragma GCC unroll 6
    for (int i = 0; i < MB; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * 32);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) s[j][i] = _mm512_fmadd_ps(av, wv[j], s[j][i]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      wv[j] = bf16_odd(_mm512_loadu_si512(w + j * ldw + k));
    }
#pragma GCC unroll 6
    for (int i = 0; i < MB; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * 32 + 16);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) s[j][i] = _mm512_fmadd_ps(av, wv[j], s[j][i]);
    }
  }
  store_dot_sums<MB>(s, nw, c, alpha, acc);
}

// MR rows of A (packed 6 apart) against NH halves of 32 bf16 columns read in place; see DirectKernel
// in gemm.h. Each half widens to its even and odd columns, put back in order once per tile. This
// kernel's copy holds the widened halves (even columns, then odd), kDirectCols floats per k: the tiles
// that read it (kFromCopy) only load and multiply.
template <int MR, int NH, bool kFromCopy>
void direct_tile(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int nr,
                 float alpha, bool acc, const DirectRows& rows) {
  __m512 s[2 * NH][MR];  // half h: even columns s[2 h], odd columns s[2 h + 1]
#pragma GCC unroll 4  // else -O2 zeroes the arrays with a memset on the stack (rep stos)
  for (int j = 0; j < 2 * NH; ++j) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) s[j][i] = _mm512_setzero_ps();
  }
  // locals: the copy's stores could alias `rows` for the compiler
  float* const copy = kFromCopy || rows.copy_mode == DirectRows::Copy::kWrite ? rows.copy : nullptr;
  const uint16_t* next = rows.prefetch;
  const int64_t next_ld = rows.prefetch_ld;
  const int period = rows.slice.period;
  int until_prefetch = next != nullptr ? rows.slice.phase : -1;
  for (int64_t k = 0; k < kc; ++k, a += 6, w += ldw, next += next_ld) {
    if (until_prefetch-- == 0) {
      for (int h = 0; h < NH; ++h) _mm_prefetch(reinterpret_cast<const char*>(next + 32 * h), _MM_HINT_T1);
      until_prefetch = period - 1;
    }
    __m512 wv[2 * NH];
    if constexpr (kFromCopy) {
#pragma GCC unroll 4
      for (int j = 0; j < 2 * NH; ++j) wv[j] = _mm512_loadu_ps(copy + k * kDirectCols + 16 * j);
    } else {
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) {
        const __m512i v = _mm512_loadu_si512(w + 32 * h);
        wv[2 * h] = bf16_even(v);
        wv[2 * h + 1] = bf16_odd(v);
        if (copy != nullptr) {
          _mm512_storeu_ps(copy + k * kDirectCols + 32 * h, wv[2 * h]);
          _mm512_storeu_ps(copy + k * kDirectCols + 32 * h + 16, wv[2 * h + 1]);
        }
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
#pragma GCC unroll 4
      for (int j = 0; j < 2 * NH; ++j) s[j][i] = _mm512_fmadd_ps(ai, wv[j], s[j][i]);
    }
  }
  // Back to column order: in each half, columns 0..15 interleave the first halves of even and odd.
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512 va = _mm512_set1_ps(alpha);
  __mmask16 m[2 * NH];
  for (int q = 0; q < 2 * NH; ++q) m[q] = first_lanes(nr - 16 * q);
#pragma GCC unroll 6  // constant indices keep the accumulators in registers (the kernel runs on short blocks)
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) {
      float* p = c[i] + 32 * h;
      __m512 r0 = _mm512_mul_ps(_mm512_permutex2var_ps(s[2 * h][i], lo_idx, s[2 * h + 1][i]), va);
      __m512 r1 = _mm512_mul_ps(_mm512_permutex2var_ps(s[2 * h][i], hi_idx, s[2 * h + 1][i]), va);
      if (acc) {
        r0 = _mm512_add_ps(r0, _mm512_maskz_loadu_ps(m[2 * h], p));
        r1 = _mm512_add_ps(r1, _mm512_maskz_loadu_ps(m[2 * h + 1], p + 16));
      }
      _mm512_mask_storeu_ps(p, m[2 * h], r0);
      _mm512_mask_storeu_ps(p + 16, m[2 * h + 1], r1);
    }
  }
}

}  // namespace

void direct_bf16_avx512(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int mr,
                        int nr, float alpha, bool acc, const DirectRows& rows) {
  const bool from_copy = rows.copy_mode == DirectRows::Copy::kRead;
  with_tile_rows(mr, [&](auto MR) {
    if (nr > 32 && from_copy) direct_tile<MR, 2, true>(kc, a, w, ldw, c, nr, alpha, acc, rows);
    else if (nr > 32) direct_tile<MR, 2, false>(kc, a, w, ldw, c, nr, alpha, acc, rows);
    else if (from_copy) direct_tile<MR, 1, true>(kc, a, w, ldw, c, nr, alpha, acc, rows);
    else direct_tile<MR, 1, false>(kc, a, w, ldw, c, nr, alpha, acc, rows);
  });
}

void dot_bf16_avx512(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                     int nw, float* const* c, float alpha, bool acc) {
  // Every tile reads the same 4 weight rows; each prefetches its share of the next 4.
  const int tiles = (m + 5) / 6;
  int i = 0;
  for (; i + 6 <= m; i += 6) {
    dot_tile<6>(kc, a + i * lda + k0 * 6, w, ldw, nw, c + i, alpha, acc, PrefetchSlice{i / 6, tiles});
  }
  if (i < m) {
    const PrefetchSlice last{i / 6, tiles};
    with_tile_rows(m - i, [&](auto MB) {
      dot_tile<MB>(kc, a + i * lda + k0 * MB, w, ldw, nw, c + i, alpha, acc, last);
    });
  }
}

void pack_dot_row_avx512(const void* src, DType dtype, float scale, int64_t n, int64_t stride, float* dst) {
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t k = 0;
  if (dtype == DType::kBF16) {
    const auto* p = static_cast<const uint16_t*>(src);
    for (; k + 32 <= n; k += 32) {
      const __m512i v = _mm512_loadu_si512(p + k);
      float* d = dst + k / 32 * stride;
      _mm512_storeu_ps(d, _mm512_mul_ps(bf16_even(v), vs));
      _mm512_storeu_ps(d + 16, _mm512_mul_ps(bf16_odd(v), vs));
    }
  } else {
    const auto* p = static_cast<const float*>(src);
    const __m512i even_idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd_idx = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (; k + 32 <= n; k += 32) {
      const __m512 lo = _mm512_loadu_ps(p + k), hi = _mm512_loadu_ps(p + k + 16);
      float* d = dst + k / 32 * stride;
      _mm512_storeu_ps(d, _mm512_mul_ps(_mm512_permutex2var_ps(lo, even_idx, hi), vs));
      _mm512_storeu_ps(d + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, odd_idx, hi), vs));
    }
  }
  if (k < n) pack_dot_block(src, dtype, scale, k, n - k, dst + k / 32 * stride);  // the last, partial block
}

void round_bf16_avx512(const float* src, uint16_t* dst, int64_t n) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src + i));
    const __m512i top = _mm512_srli_epi32(u, 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(top, one))), 16);
    r = _mm512_mask_or_epi32(r, nan, top, quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void pack_bf16_panel_avx512(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel32(rows, scale, kc, dst);
}

void pack_f32_panel_avx512(const float* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel32(rows, scale, kc, dst);
}

void pack_bf16_a_panel_avx512(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel6(rows, scale, kc, dst);
}

void pack_f32_a_panel_avx512(const float* const* rows, const float* scale, int64_t kc, float* dst) {
  pack_panel6(rows, scale, kc, dst);
}

// As pack_panel32, with pairs: each load of 16 pairs also prefetches the same row kc further on.
void pack_pair_panel_avx512(const uint16_t* const* rows, int64_t kc, uint32_t* dst) {
  constexpr int NR = 32;
  const int64_t kp = (kc + 1) / 2;
  int64_t p = 0;
  for (; 2 * (p + 16) <= kc; p += 16) {
    for (int half = 0; half < 2; ++half) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[16 * half + i] + 2 * p + kc), _MM_HINT_T1);
        r[i] = load_pairs(rows[16 * half + i] + 2 * p);
      }
      transpose16(r);  // r[q] = pair p + q of the 16 rows
      for (int q = 0; q < 16; ++q) store_pairs(dst + (p + q) * NR + 16 * half, r[q]);
    }
  }
  for (; p < kp; ++p) {
    for (int j = 0; j < NR; ++j) dst[p * NR + j] = bf16_pair(rows[j], p, kc);
  }
}

void pack_pair_a_panel_avx512(const uint16_t* const* rows, int64_t kc, uint32_t* dst) {
  const int64_t kp = (kc + 1) / 2;
  __m512 v[6], out[6];
  int64_t p = 0;
  for (; 2 * (p + 16) <= kc; p += 16, dst += 96) {
    for (int i = 0; i < 6; ++i) v[i] = load_pairs(rows[i] + 2 * p);
    interleave6(v, out);
    for (int m = 0; m < 6; ++m) store_pairs(dst + 16 * m, out[m]);
  }
  for (; p < kp; ++p, dst += 6) {
    for (int i = 0; i < 6; ++i) dst[i] = bf16_pair(rows[i], p, kc);
  }
}

void pack_pair_rows_avx512(const uint16_t* r0, const uint16_t* r1, int64_t n, int64_t width, int64_t stride,
                           uint32_t* dst) {
  for (int64_t c0 = 0; c0 < n; c0 += width, dst += stride) {
    for (int64_t j = 0; j < width; j += 32) {
      const __mmask32 m = first_lanes32(std::min(width - j, n - c0 - j));
      const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + c0 + j);
      const __m512i b = r1 != nullptr ? _mm512_maskz_loadu_epi16(m, r1 + c0 + j) : _mm512_setzero_si512();
      const int64_t words = std::min<int64_t>(width - j, 32);
      _mm512_mask_storeu_epi32(dst + j, first_lanes(words), pairs_first(a, b));
      _mm512_mask_storeu_epi32(dst + j + 16, first_lanes(words - 16), pairs_second(a, b));
    }
  }
}

void pack_row_panels_avx512(const void* src, DType dtype, float scale, int64_t n, int64_t width,
                            int64_t stride, float* dst) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t c0 = 0; c0 < n; c0 += width, dst += stride) {
    for (int64_t j = 0; j < width; j += 16) {
      const int64_t lanes = std::min<int64_t>(width - j, 16);
      _mm512_mask_storeu_ps(dst + j, first_lanes(lanes),
                            load_masked(src, dtype, c0 + j, std::min(n - c0 - j, lanes), vs));
    }
  }
}

}  // namespace ktjax
