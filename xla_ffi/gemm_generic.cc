// Portable kernels: the only ones where the build has no x86 kernels (e.g. aarch64), the fallback for
// x86 CPUs without AVX2/FMA, and a check on the others. Written with GCC/Clang vector types of 4 floats,
// which compile to the target's own SIMD (NEON on aarch64, SSE on x86-64): the tiles' accumulators (24
// at most) fit NEON's 32 registers, where plain loops kept them in memory. The micro-kernel, and the small-batch
// kernels that read bf16 weights in place for a few token rows (DotKernel with its row packer, and
// DirectKernel, in gemm.h).
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "gemm_kernels.h"

namespace ktjax {
namespace {

typedef float Vec4 __attribute__((vector_size(16)));
typedef uint32_t U32x4 __attribute__((vector_size(16)));
typedef uint16_t U16x4 __attribute__((vector_size(8)));

inline Vec4 load4(const float* p) {
  Vec4 v;
  std::memcpy(&v, p, sizeof v);  // no alignment assumed
  return v;
}
inline U32x4 load_u32x4(const uint16_t* p) {
  U32x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// 8 bf16 values read as 4 words, widened to f32: the even ones (k, k + 2, ...: each word's low half,
// shifted up) and the odd ones (its high half, in place). The dot layout's order (gemm.h).
inline Vec4 bf16_even(U32x4 w) {
  const U32x4 bits = w << 16;
  Vec4 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline Vec4 bf16_odd(U32x4 w) {
  const U32x4 bits = w & 0xffff0000u;
  Vec4 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
// 4 consecutive bf16 values widened to f32, in order.
inline Vec4 widen4(const uint16_t* p) {
  U16x4 h;
  std::memcpy(&h, p, sizeof h);
  const U32x4 bits = __builtin_convertvector(h, U32x4) << 16;
  Vec4 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// MB token rows against the 4 weight rows; see DotKernel in gemm.h. Per block of 32 values, 4 steps of
// 8: one 16-byte load per weight row, widened to its even and odd halves, each multiplied by the token
// rows' matching 4 values (the dot layout keeps a block's 16 even values, then its 16 odd ones); a row's
// next block is block_stride floats on. The next 4 weight rows are prefetched at the steps of 32 k that
// `slice` selects, as the x86 kernels do.
template <int MB, typename W>
void dot_tile(int64_t kc, const float* a, int64_t block_stride, const W* w, int64_t ldw, int nw,
              float* const* c, float alpha, bool acc, PrefetchSlice slice) {
  Vec4 s[MB][4] = {};
  // wv = 4 weight vectors, then s += the MB token vectors at offset `at` of their block times them
  const auto multiply = [&s](const float* a, int at, const Vec4 (&wv)[4]) {
    for (int i = 0; i < MB; ++i) {
      const Vec4 av = load4(a + i * 32 + at);
      for (int j = 0; j < 4; ++j) s[i][j] += av * wv[j];
    }
  };
  const W* next = w + 4 * ldw;
  int until_prefetch = slice.phase;
  for (int64_t k = 0; k < kc; k += 32, a += block_stride) {
    Vec4 wv[4];
    if constexpr (std::is_same_v<W, float>) {  // F32DotKernel: values in column order
      for (int q = 0; q < 8; ++q) {
        for (int j = 0; j < 4; ++j) wv[j] = load4(w + j * ldw + k + 4 * q);
        multiply(a, 4 * q, wv);
      }
    } else {
      if (until_prefetch-- == 0) {
        for (int j = 0; j < 4; ++j) __builtin_prefetch(next + j * ldw + k);
        until_prefetch = slice.period - 1;
      }
      for (int q = 0; q < 4; ++q) {
        for (int j = 0; j < 4; ++j) wv[j] = bf16_even(load_u32x4(w + j * ldw + k + 8 * q));
        multiply(a, 4 * q, wv);
        for (int j = 0; j < 4; ++j) wv[j] = bf16_odd(load_u32x4(w + j * ldw + k + 8 * q));
        multiply(a, 16 + 4 * q, wv);
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < nw; ++j) {
      const float sum = (s[i][j][0] + s[i][j][1]) + (s[i][j][2] + s[i][j][3]);
      c[i][j] = (acc ? c[i][j] : 0.0f) + alpha * sum;
    }
  }
}

// The dot kernels (DotKernel, F32DotKernel): each tile of 6 rows (the layout's) in parts of kDotRows: 24
// accumulators with the values they need do not fit NEON's 32 registers (gcc spilled 10 of them in the
// loop), 12 do. Every part reads the same 4 weight rows (from L1 after the first) and (bf16) prefetches
// its share of the next 4.
template <typename W>
void dot_tiles(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const W* w, int64_t ldw, int nw,
               float* const* c, float alpha, bool acc) {
  constexpr int kDotRows = 3;
  const int parts = (m + kDotRows - 1) / kDotRows;
  for (int t = 0; t < m; t += 6) {
    const int mb = std::min(6, m - t);
    for (int r = 0; r < mb; r += kDotRows) {
      const PrefetchSlice slice{(t + r) / kDotRows, parts};
      with_tile_rows(std::min(kDotRows, mb - r), [&](auto MB) {
        dot_tile<MB>(kc, a + t * lda + k0 * mb + r * 32, mb * 32, w, ldw, nw, c + t + r, alpha, acc, slice);
      });
    }
  }
}

// MR rows of A (packed 6 apart) against columns [col, col + 16) of B [K, N] read in place (widened, and
// written to the copy in column order when the tile copies), or from the copy; see DirectKernel in gemm.h.
// The quarter at col 0 prefetches the segment's next rows at the steps of k that `rows.slice` selects.
template <int MR, bool kFromCopy>
void direct_cols(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int col, int nr,
                 float alpha, bool acc, const DirectRows& rows) {
  Vec4 s[MR][4] = {};
  float* const copy = kFromCopy || rows.copy_mode == DirectRows::Copy::kWrite ? rows.copy : nullptr;
  const uint16_t* next = col == 0 ? rows.prefetch : nullptr;
  int until_prefetch = next != nullptr ? rows.slice.phase : -1;
  for (int64_t k = 0; k < kc; ++k, a += 6) {
    if (until_prefetch-- == 0) {
      __builtin_prefetch(next + k * rows.prefetch_ld);
      if (nr > 32) __builtin_prefetch(next + k * rows.prefetch_ld + 32);
      until_prefetch = rows.slice.period - 1;
    }
    Vec4 wv[4];
    float* const copy_k = copy != nullptr ? copy + k * kDirectCols + col : nullptr;
    for (int j = 0; j < 4; ++j) {
      if constexpr (kFromCopy) {
        wv[j] = load4(copy_k + 4 * j);
      } else {
        wv[j] = widen4(w + k * ldw + col + 4 * j);
        if (copy_k != nullptr) std::memcpy(copy_k + 4 * j, &wv[j], sizeof wv[j]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const Vec4 ai = {a[i], a[i], a[i], a[i]};
      for (int j = 0; j < 4; ++j) s[i][j] += ai * wv[j];
    }
  }
  const int n = std::min(16, nr - col);
  for (int i = 0; i < MR; ++i) {
    float row[16];
    std::memcpy(row, s[i], sizeof row);
    for (int j = 0; j < n; ++j) c[i][col + j] = (acc ? c[i][col + j] : 0.0f) + alpha * row[j];
  }
}

}  // namespace

void microkernel_generic(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                         float alpha, bool acc) {
  constexpr int MR = 6, NR = 16, NV = NR / 4;
  Vec4 sum[MR][NV] = {};
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
    Vec4 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load4(b + 4 * j);
    for (int i = 0; i < MR; ++i) {
      const Vec4 ai = {a[i], a[i], a[i], a[i]};
      for (int j = 0; j < NV; ++j) sum[i][j] += ai * bv[j];
    }
  }
  for (int i = 0; i < mr; ++i) {
    float row[NR];
    std::memcpy(row, sum[i], sizeof row);
    for (int j = 0; j < nr; ++j) c[i][j] = (acc ? c[i][j] : 0.0f) + alpha * row[j];
  }
}

void dot_bf16_generic(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                      int nw, float* const* c, float alpha, bool acc) {
  dot_tiles(k0, kc, a, lda, m, w, ldw, nw, c, alpha, acc);
}

void dot_f32_generic(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const float* w, int64_t ldw,
                     int nw, float* const* c, float alpha, bool acc) {
  dot_tiles(k0, kc, a, lda, m, w, ldw, nw, c, alpha, acc);
}

void dequant_row_generic(const QuantWeight& w, int64_t r, int64_t c, int64_t n, float mul, float* dst) {
  w.dequantize_row(r, c, n, mul, dst);
}

void direct_bf16_generic(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int mr,
                         int nr, float alpha, bool acc, const DirectRows& rows) {
  // In quarters of 16 columns: 6 rows by 64 columns would be 96 accumulators of 4 floats, 6 by 16 are 24.
  const bool from_copy = rows.copy_mode == DirectRows::Copy::kRead;
  with_tile_rows(mr, [&](auto MR) {
    for (int col = 0; col < nr; col += 16) {
      if (from_copy) direct_cols<MR, true>(kc, a, w, ldw, c, col, nr, alpha, acc, rows);
      else direct_cols<MR, false>(kc, a, w, ldw, c, col, nr, alpha, acc, rows);
    }
  });
}

void pack_dot_row_generic(const void* src, DType dtype, float scale, int64_t n, int64_t stride, float* dst) {
  for (int64_t k = 0; k < n; k += 32) {
    pack_dot_block(src, dtype, scale, k, std::min<int64_t>(32, n - k), dst + k / 32 * stride);
  }
}

}  // namespace ktjax
