// AVX512_BF16 kernels, compiled with -mavx512f -mavx512bw -mavx512bf16: the bf16 pair path of gemm.h
// (PairKernel, PairDotKernel, PairDirectKernel), where both operands are bf16 and vdpbf16ps multiplies
// pairs of them into f32 accumulators. Its packers are in gemm_avx512.cc (they need AVX-512F only).
#include <immintrin.h>

#include "avx512_masks.h"
#include "gemm_kernels.h"

namespace ktjax {

namespace {

// acc + the pairwise products of a and b, lane by lane (16 lanes, 2 pairs each).
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

}  // namespace

// The f32 micro-kernel's loop (gemm_avx512.cc) with pairs for values: per pair step, two B vectors of
// 16 pairs and each A pair broadcast once for both; 12 accumulators in registers.
void microkernel_pairs_avx512bf16(int64_t kp, const uint32_t* a, const uint32_t* b, float* const* c, int mr,
                                  int nr, float alpha, bool acc) {
  constexpr int MR = 6, NR = 32;
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t p = 0; p < kp; ++p) {
    const __m512i b0 = _mm512_loadu_si512(b + p * NR), b1 = _mm512_loadu_si512(b + p * NR + 16);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m512i ai = _mm512_set1_epi32(static_cast<int>(a[p * MR + i]));
      c0[i] = dot_pairs(c0[i], ai, b0);
      c1[i] = dot_pairs(c1[i], ai, b1);
    }
  }
  store_tile6x32(c0, c1, c, mr, nr, alpha, acc);
}

namespace {

// MB token rows against 4 weight rows (w[0..3], the missing ones of nw < 4 pointing at a real row and
// their sums dropped), 32 values of k per step: one load per weight row and per token row, MB * 4
// accumulators. The last block of 32 reads the weights with a mask (the token rows are zero-padded).
// The next 8 weight rows (the driver's next two calls) are prefetched into L2 at the steps of 32 k
// selected by `slice`: at the pair kernel's rate the next call's 4 rows arrive too late.
template <int MB>
void pair_dot_tile(int64_t kc, const uint16_t* a, int64_t lda, const uint16_t* const* w, const uint16_t* next,
                   int64_t ldw, int nw, float* const* c, float alpha, bool acc, PrefetchSlice slice) {
  __m512 s[4][MB];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
#pragma GCC unroll 6
    for (int i = 0; i < MB; ++i) s[j][i] = _mm512_setzero_ps();
  }
  int until_prefetch = slice.phase;
  for (int64_t k = 0; k < kc; k += 32) {
    if (until_prefetch-- == 0) {
      for (int j = 0; j < 8; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldw + k), _MM_HINT_T1);
      until_prefetch = slice.period - 1;
    }
    const __mmask32 mask = first_lanes32(kc - k);
    __m512i wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, w[j] + k);
#pragma GCC unroll 6
    for (int i = 0; i < MB; ++i) {
      const __m512i av = _mm512_loadu_si512(a + i * lda + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) s[j][i] = dot_pairs(s[j][i], av, wv[j]);
    }
  }
  store_dot_sums<MB>(s, nw, c, alpha, acc);
}

// MR rows of pairs against NH blocks of 32 columns of B [K, N] read in place; see PairDirectKernel in
// gemm.h. Each pair step loads the same columns of stored rows 2p and 2p + 1 (masked past nr) and
// interleaves them into pairs (or reads them from the copy); the accumulators stay in registers.
template <int MR, int NH, bool kFromCopy>
void pair_direct_tile(int64_t kc, const uint32_t* a, const uint16_t* w, int64_t ldw, float* const* c, int nr,
                      float alpha, bool acc, const DirectRows& rows) {
  __m512 s[2 * NH][MR];
#pragma GCC unroll 4
  for (int j = 0; j < 2 * NH; ++j) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) s[j][i] = _mm512_setzero_ps();
  }
  // locals: the copy's stores could alias `rows` for the compiler
  auto* const copy = reinterpret_cast<uint32_t*>(
      kFromCopy || rows.copy_mode == DirectRows::Copy::kWrite ? rows.copy : nullptr);
  const uint16_t* next = rows.prefetch;
  const int64_t next_ld = rows.prefetch_ld;
  const int period = rows.slice.period;
  int until_prefetch = next != nullptr ? rows.slice.phase : -1;
  __mmask32 cols[NH];
  for (int h = 0; h < NH; ++h) cols[h] = first_lanes32(nr - 32 * h);
  const int64_t kp = (kc + 1) / 2;
  for (int64_t p = 0; p < kp; ++p, a += 6) {
    if (until_prefetch-- == 0) {
      for (int h = 0; h < NH; ++h) {
        _mm_prefetch(reinterpret_cast<const char*>(next + 2 * p * next_ld + 32 * h), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(next + (2 * p + 1) * next_ld + 32 * h), _MM_HINT_T1);
      }
      until_prefetch = period - 1;
    }
    __m512i wv[2 * NH];
    if constexpr (kFromCopy) {
#pragma GCC unroll 4
      for (int j = 0; j < 2 * NH; ++j) wv[j] = _mm512_loadu_si512(copy + p * kDirectCols + 16 * j);
    } else {
      const bool odd_end = 2 * p + 1 == kc;  // an odd kc's last pair: no second row
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) {
        const __m512i r0 = _mm512_maskz_loadu_epi16(cols[h], w + 2 * p * ldw + 32 * h);
        const __m512i r1 = _mm512_maskz_loadu_epi16(odd_end ? 0 : cols[h], w + (2 * p + 1) * ldw + 32 * h);
        wv[2 * h] = pairs_first(r0, r1);
        wv[2 * h + 1] = pairs_second(r0, r1);
        if (copy != nullptr) {
          _mm512_storeu_si512(copy + p * kDirectCols + 32 * h, wv[2 * h]);
          _mm512_storeu_si512(copy + p * kDirectCols + 32 * h + 16, wv[2 * h + 1]);
        }
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m512i ai = _mm512_set1_epi32(static_cast<int>(a[i]));
#pragma GCC unroll 4
      for (int j = 0; j < 2 * NH; ++j) s[j][i] = dot_pairs(s[j][i], ai, wv[j]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  __mmask16 m[2 * NH];
  for (int q = 0; q < 2 * NH; ++q) m[q] = first_lanes(nr - 16 * q);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 2 * NH; ++j) {
      float* p = c[i] + 16 * j;
      __m512 r = _mm512_mul_ps(s[j][i], va);
      if (acc) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m[j], p));
      _mm512_mask_storeu_ps(p, m[j], r);
    }
  }
}

}  // namespace

void pair_direct_avx512bf16(int64_t kc, const uint32_t* a, const uint16_t* w, int64_t ldw, float* const* c, int mr,
                            int nr, float alpha, bool acc, const DirectRows& rows) {
  const bool from_copy = rows.copy_mode == DirectRows::Copy::kRead;
  with_tile_rows(mr, [&](auto MR) {
    if (nr > 32 && from_copy) pair_direct_tile<MR, 2, true>(kc, a, w, ldw, c, nr, alpha, acc, rows);
    else if (nr > 32) pair_direct_tile<MR, 2, false>(kc, a, w, ldw, c, nr, alpha, acc, rows);
    else if (from_copy) pair_direct_tile<MR, 1, true>(kc, a, w, ldw, c, nr, alpha, acc, rows);
    else pair_direct_tile<MR, 1, false>(kc, a, w, ldw, c, nr, alpha, acc, rows);
  });
}

void pair_dot_avx512bf16(int64_t kc, const uint16_t* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                         int nw, float* const* c, float alpha, bool acc) {
  const uint16_t* rows[4];
  for (int j = 0; j < 4; ++j) rows[j] = w + (j < nw ? j : 0) * ldw;
  // Every tile reads the same 4 weight rows; each prefetches its share of the next 8 (prefetches past
  // the weights' end are harmless: they never fault).
  const uint16_t* next = w + 4 * ldw;
  const int tiles = (m + 5) / 6;
  int i = 0;
  for (; i + 6 <= m; i += 6) {
    pair_dot_tile<6>(kc, a + i * lda, lda, rows, next, ldw, nw, c + i, alpha, acc, PrefetchSlice{i / 6, tiles});
  }
  if (i < m) {
    const PrefetchSlice last{i / 6, tiles};
    with_tile_rows(m - i, [&](auto MB) {
      pair_dot_tile<MB>(kc, a + i * lda, lda, rows, next, ldw, nw, c + i, alpha, acc, last);
    });
  }
}

}  // namespace ktjax
