// GEMM driver: cache blocking, packing (bf16 -> f32 widening, row gather, row scale), ISA dispatch,
// the small-batch paths that read bf16 weights in place (gemm_dot, gemm_direct), and the bf16 pair path
// for products of two bf16 operands (gemm_pair_dot, gemm_pair_direct, gemm_pairs).
#include "gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "gemm_kernels.h"

namespace ktjax {
namespace {

constexpr int64_t kMR = 6;    // every micro-kernel's row count
constexpr int64_t kMaxNR = 32;
// Depth of one packed block. The micro-kernel keeps one kc x 32 f32 B micro-panel while it walks the A
// panels: at kc = 128 (16 KiB) it stays in L1, which pays for up to a few hundred rows of A; with more
// rows the C tile's extra passes (one per depth block) cost more than L1 misses, so kc = 256.
constexpr int64_t kKC = 256;
constexpr int64_t kKCFewRows = 128;
constexpr int64_t kFewRows = 256;
constexpr int64_t kMC = 96;   // rows of A packed at once (multiple of kMR)
constexpr int64_t kNC = 512;  // columns of B packed at once (multiple of every NR)

// Products of few rows against bf16 weights read them in place (gemm.h): the dot path (DotKernel, up
// to kDotMaxRows rows) in blocks of the reduction (dot_depth) whose packed token rows stay in L2
// while the weight rows stream past; the direct path (DirectKernel, up to kDirectMaxRows rows) in
// blocks of kDirectKC rows. The limits are the row counts up to which these paths beat the packed path
// (docs/performance-log.md has the measurements).
constexpr int64_t kDotMaxRows = 96;
constexpr int64_t kDirectMaxRows = 96;
// The dot path's reduction blocks are as deep as keeps the packed token rows within kDotAFloats (256 KiB,
// a quarter of a 1 MiB L2), between kDotMinKC and kDotMaxKC, and of equal depth: for a few tokens at
// the usual widths that is whole weight rows, so each group of 4 rows is read as one stretch of memory.
constexpr int64_t kDotAFloats = 64 * 1024;
constexpr int64_t kDotMinKC = 1024;
constexpr int64_t kDotMaxKC = 8192;
constexpr int64_t kDotAScratch = std::max(kDotAFloats, kDotMaxRows * kDotMinKC);
// The quantized dot path dequantizes 4 weight rows of kQuantDotKC values at a time: 8 KiB of f32, in L1
// beside the token values they meet.
constexpr int64_t kQuantDotKC = 512;
// The quantized pair path multiplies up to this many token rows at a time by each block of codes (more
// are taken this many at a time): the codes cost less the more rows share them, and the rows of a
// reduction block of kQuantDotKC values fit the dot path's scratch.
constexpr int64_t kQuantPairRows = 384;
// Packing a quantized B stored [K, N] fetches the stored row this many rows ahead.
constexpr int64_t kQuantAhead = 4;
constexpr int64_t kDirectKC = 32;
// The direct path's scratch, in this order: its packed token rows (whole panels of kMR rows, the last one
// zero-padded), a zero-padded bf16 copy of a last column block narrower than kDirectCols, and the
// row tiles' copy of each weight block (DirectRows).
constexpr int64_t kDirectAFloats = (kDirectMaxRows + kMR - 1) / kMR * kMR * kDirectKC;
constexpr int64_t kDirectBlockFloats = kDirectKC * kDirectCols / 2;
constexpr int64_t kDirectCopyFloats = kDirectKC * kDirectCols;

#ifdef KTJAX_X86_KERNELS  // defined where the build compiles the x86 kernels (*_avx2.cc, *_avx512*.cc)
const Isa kAvx512 = {"avx512",
                     32,
                     microkernel_avx512,
                     pack_bf16_panel_avx512,
                     pack_f32_panel_avx512,
                     pack_bf16_a_panel_avx512,
                     pack_f32_a_panel_avx512,
                     pack_row_panels_avx512,
                     dot_bf16_avx512,
                     pack_dot_row_avx512,
                     direct_bf16_avx512,
                     round_bf16_avx512,
                     silu_mul_avx512,
                     silu_mul_grad_avx512,
                     row_max_avx512,
                     exp_shift_avx512,
                     dequant_row_avx2,
                     dot_f32_avx2};
// AVX-512 with the bf16 pair path (vdpbf16ps) on top.
Isa avx512_with_pairs() {
  Isa isa = kAvx512;
  isa.name = "avx512_bf16";
  isa.pair_kernel = microkernel_pairs_avx512bf16;
  isa.pack_pair_panel = pack_pair_panel_avx512;
  isa.pack_pair_a_panel = pack_pair_a_panel_avx512;
  isa.pack_pair_rows = pack_pair_rows_avx512;
  isa.pair_dot = pair_dot_avx512bf16;
  isa.pair_direct = pair_direct_avx512bf16;
  isa.quant_codes = quant_codes_avx512bf16;
  isa.quant_pair_dot = quant_pair_dot_avx512bf16;
  isa.quant_pair_rows = quant_pair_rows_avx512bf16;
  return isa;
}
const Isa kAvx512Bf16 = avx512_with_pairs();
const Isa kAvx2 = {"avx2",
                   16,
                   microkernel_avx2,
                   pack_bf16_panel_avx2,
                   pack_f32_panel_avx2,
                   pack_bf16_a_panel_avx2,
                   pack_f32_a_panel_avx2,
                   pack_row_panels_avx2,
                   dot_bf16_avx2,
                   pack_dot_row_avx2,
                   direct_bf16_avx2,
                   round_bf16_avx2,
                   silu_mul_avx2,
                   silu_mul_grad_avx2,
                   row_max_avx2,
                   exp_shift_avx2,
                   dequant_row_avx2,
                   dot_f32_avx2};
#endif
// Portable: the micro-kernel and the small-batch kernels, no vectorised packers or rounder.
const Isa kGeneric = {"generic",
                      16,
                      microkernel_generic,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr,
                      dot_bf16_generic,
                      pack_dot_row_generic,
                      direct_bf16_generic,
                      nullptr,
                      silu_mul_portable,
                      silu_mul_grad_portable,
                      row_max_portable,
                      exp_shift_portable,
                      dequant_row_generic,
                      dot_f32_generic};

// The ISAs this build has, best first.
#ifdef KTJAX_X86_KERNELS
const Isa* const kIsas[] = {&kAvx512Bf16, &kAvx512, &kAvx2, &kGeneric};
#else
const Isa* const kIsas[] = {&kGeneric};
#endif

bool cpu_has(const Isa& isa) {
#ifdef KTJAX_X86_KERNELS
  if (&isa == &kAvx512Bf16) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx512bf16");
  }
  if (&isa == &kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  if (&isa == &kAvx2) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
#endif
  return &isa == &kGeneric;
}

// Fetches elements [k0, k0 + kc) of stored rows [r0, r0 + n) of A into L1. The next A panel's token
// rows are gathered from anywhere in x, so no hardware prefetcher sees them coming, and the A-side
// packer would stall on their first loads.
template <typename T>
void prefetch_rows(const MatView& A, int64_t r0, int64_t n, int64_t k0, int64_t kc) {
  const T* d = static_cast<const T*>(A.data);
  for (int64_t r = r0; r < r0 + n; ++r) {
    const T* src = d + A.row(r) * A.ld + k0;
    for (int64_t k = 0; k < kc; k += 64 / sizeof(T)) __builtin_prefetch(src + k);
  }
}

// Packs logical A[i0:i0+mc, k0:k0+kc] into panels of `width` rows, zero-padded:
// buf[(p*kc + k)*width + ii] = A(i0 + p*width + ii, k0 + k). The same layout serves both operands:
// the A side uses width kMR, and B [K, N] packs as B^T in panels of the micro-kernel's nr columns.
// Loops run panel by panel so no index needs a division in an inner loop.
// `fast` (may be null) packs full panels of `width` stored rows (T = uint16_t: bf16, T = float: f32);
// `row_fast` (may be null) packs one stored row of the transposed operand.
template <typename T, typename Packer>
void pack_panels(const MatView& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int64_t width, float* buf,
                 Packer fast, RowPanelPacker row_fast) {
  const T* d = static_cast<const T*>(A.data);
  const int64_t panels = (mc + width - 1) / width;
  if (!A.trans) {  // stored (i, k): walk each row along k, writing with stride `width`
    for (int64_t p = 0; p < panels; ++p) {
      float* panel = buf + p * kc * width;
      if (width == kMR && p + 1 < panels) {  // the A side: the next panel's rows
        prefetch_rows<T>(A, i0 + (p + 1) * width, std::min(width, mc - (p + 1) * width), k0, kc);
      }
      if (fast != nullptr && (p + 1) * width <= mc) {  // the ISA's transposing packer
        const T* rows[kMaxNR];
        float scales[kMaxNR];
        for (int64_t ii = 0; ii < width; ++ii) {
          rows[ii] = d + A.row(i0 + p * width + ii) * A.ld + k0;
          scales[ii] = A.scale(i0 + p * width + ii);
        }
        fast(rows, scales, kc, panel);
        continue;
      }
      for (int64_t ii = 0; ii < width; ++ii) {
        const int64_t i = p * width + ii;
        float* dst = panel + ii;
        if (i >= mc) {
          for (int64_t k = 0; k < kc; ++k) dst[k * width] = 0.0f;
          continue;
        }
        const T* src = d + A.row(i0 + i) * A.ld + k0;
        const float s = A.scale(i0 + i);
        for (int64_t k = 0; k < kc; ++k) dst[k * width] = widen1(src[k]) * s;
      }
    }
  } else {  // stored (k, i): each stored row fills one k-slice of every panel, contiguously
    constexpr int64_t kAhead = 4;  // rows prefetched ahead: each is a new page, often gathered
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t k = 0; k < kc; ++k) {
      if (k + kAhead < kc) {
        const T* next = d + A.row(k0 + k + kAhead) * A.ld + i0;
        for (int64_t c = 0; c < mc; c += kLine) __builtin_prefetch(next + c);
      }
      const T* src = d + A.row(k0 + k) * A.ld + i0;
      const float s = A.scale(k0 + k);
      if (row_fast != nullptr) {
        row_fast(src, A.dtype, s, mc, width, kc * width, buf + k * width);
        continue;
      }
      for (int64_t p = 0; p < panels; ++p) {
        float* dst = buf + (p * kc + k) * width;
        const int64_t w = std::min(width, mc - p * width);
        for (int64_t ii = 0; ii < w; ++ii) dst[ii] = widen1(src[p * width + ii]) * s;
        for (int64_t ii = w; ii < width; ++ii) dst[ii] = 0.0f;
      }
    }
  }
}

// Fetches into L2 the bytes of values [c, c + n) of the stored rows [r, r + rows) of a quantized weight.
void prefetch_quant_rows(const QuantWeight& q, int64_t r, int64_t rows, int64_t c, int64_t n) {
  const int64_t span = q.span_bytes(n);
  for (int64_t j = 0; j < rows; ++j) {
    const uint8_t* bytes = q.row_bytes(r + j, c);
    for (int64_t b = 0; b < span; b += 64) __builtin_prefetch(bytes + b, 0, 2);
  }
}

// pack_panels for a quantized weight (no row gather): each stored row's slice is dequantized into an
// L1-sized buffer and written into the panels from there; full panels of stored (i, k) rows go through
// the ISA's transposing f32 packer (`fast`, may be null) from `width` dequantized rows.
void pack_quant_panels(const Isa& isa, const MatView& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
                       int64_t width, float* buf, F32PanelPacker fast) {
  float row[std::max(kKC, kNC)];
  const int64_t panels = (mc + width - 1) / width;
  if (!A.trans) {  // stored (i, k): row i0 + i, columns [k0, k0 + kc), written with stride `width`
    alignas(64) float tile[kMaxNR * kKC];
    const float* rows[kMaxNR];
    float ones[kMaxNR];
    std::fill_n(ones, kMaxNR, 1.0f);
    for (int64_t p = 0; p < panels; ++p) {
      float* panel = buf + p * kc * width;
      if (fast != nullptr && (p + 1) * width <= mc && kc <= kKC) {
        for (int64_t ii = 0; ii < width; ++ii) {
          const int64_t i = p * width + ii;
          isa.dequant_row(A.quant, i0 + i, k0, kc, A.scale(i0 + i), tile + ii * kKC);
          rows[ii] = tile + ii * kKC;
        }
        fast(rows, ones, kc, panel);
        continue;
      }
      for (int64_t ii = 0; ii < width; ++ii) {
        const int64_t i = p * width + ii;
        float* dst = panel + ii;
        if (i < mc) isa.dequant_row(A.quant, i0 + i, k0, kc, A.scale(i0 + i), row);
        for (int64_t k = 0; k < kc; ++k) dst[k * width] = i < mc ? row[k] : 0.0f;
      }
    }
    return;
  }
  // stored (k, i): row k0 + k fills one k-slice of every panel, in runs of whole panels that fit `row`;
  // the bytes of the row kQuantAhead on are fetched into L2 first (rows are read in slices, far apart)
  const int64_t run = kNC / width * width;
  for (int64_t k = 0; k < kc; ++k) {
    if (k + kQuantAhead < kc) prefetch_quant_rows(A.quant, k0 + k + kQuantAhead, 1, i0, mc);
    for (int64_t c = 0; c < mc; c += run) {
      const int64_t n = std::min(run, mc - c);
      isa.dequant_row(A.quant, k0 + k, i0 + c, n, A.scale(k0 + k), row);
      for (int64_t p = c / width; p * width < c + n; ++p) {
        float* dst = buf + (p * kc + k) * width;
        const int64_t w = std::min(width, mc - p * width);
        const float* src = row + (p * width - c);
        if (w == 16) {  // a whole panel of the AVX2 / portable tile: a copy of constant size, inlined
          std::memcpy(dst, src, 16 * sizeof(float));
        } else if (w == 32) {  // the AVX-512 tile's
          std::memcpy(dst, src, 32 * sizeof(float));
        } else {
          std::copy_n(src, w, dst);
        }
        std::fill(dst + w, dst + width, 0.0f);
      }
    }
  }
}

// Packs with the ISA's vectorised packers where it has them: width is kMR (A side) or isa.nr (B side).
void pack_any(const Isa& isa, const MatView& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int64_t width,
              float* buf) {
  const bool a_side = width == kMR;
  if (A.dtype == DType::kQuant) {
    return pack_quant_panels(isa, A, i0, mc, k0, kc, width, buf, a_side ? isa.pack_f32_a_panel : isa.pack_f32_panel);
  }
  if (A.dtype == DType::kF32) {
    pack_panels<float>(A, i0, mc, k0, kc, width, buf, a_side ? isa.pack_f32_a_panel : isa.pack_f32_panel,
                       isa.pack_row_panels);
  } else {
    pack_panels<uint16_t>(A, i0, mc, k0, kc, width, buf, a_side ? isa.pack_bf16_a_panel : isa.pack_bf16_panel,
                          isa.pack_row_panels);
  }
}

// Whether C = op(A) op(B) can read B in place: few rows, and B a bf16 weight (no row gather or
// scale), with an ISA that has the small-batch kernels. B stored [N, K] (transposed) then takes the
// dot path (A not transposed), B stored [K, N] the direct path. The dot path needs a reduction of at
// least one block of 32: a shorter one (LoRA's B products at rank < 32) would pay a zero-padded block
// and a horizontal sum for every 4 outputs, more work than packing B (docs/performance-log.md).
bool small_batch(const Isa& isa, int64_t M, int64_t K, const MatView& B) {
  const bool has_kernel = B.trans ? isa.dot_bf16 != nullptr && K >= 32 : isa.direct_bf16 != nullptr;
  return has_kernel && M <= (B.trans ? kDotMaxRows : kDirectMaxRows) &&
         B.dtype == DType::kBF16 && B.rows == nullptr && B.row_scale == nullptr;
}

// The row tiles of one block of weights on a direct path (gemm_direct, gemm_pair_direct): each tile of
// kMR rows (the last one shorter) runs tile(ir, mr, crow, rows) on the same block. With `copy`, the
// first tile copies the block (when others follow) and the others read the copy; without, every tile
// reads the block. Each tile fetches its share of the same columns of the next block (PrefetchSlice).
template <typename Tile>
void direct_row_tiles(int64_t M, const OutView& C, int64_t jc, DirectRows rows, bool copy, Tile tile) {
  using Copy = DirectRows::Copy;
  const int tiles = static_cast<int>((M + kMR - 1) / kMR);
  float* crow[kMR];
  for (int64_t ir = 0; ir < M; ir += kMR) {
    const int mr = static_cast<int>(std::min(kMR, M - ir));
    for (int i = 0; i < mr; ++i) crow[i] = C.row_ptr(ir + i) + jc;
    rows.slice = PrefetchSlice{static_cast<int>(ir / kMR), tiles};
    rows.copy_mode = !copy ? Copy::kNone : ir > 0 ? Copy::kRead : tiles > 1 ? Copy::kWrite : Copy::kNone;
    tile(ir, mr, static_cast<float* const*>(crow), rows);
  }
}

// The direct path: A packed in micro-kernel panels per block of kDirectKC, each block of kDirectCols
// columns of B read from its stored rows by the first row tile and from its copy by the others (the
// last, partial block from a zero-padded copy made here).
void gemm_direct(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
                 const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  const auto* w = static_cast<const uint16_t*>(B.data);
  float* apack = scratch;
  auto* block = reinterpret_cast<uint16_t*>(scratch + kDirectAFloats);
  float* copy = scratch + kDirectAFloats + kDirectBlockFloats;
  for (int64_t pc = 0; pc < K; pc += kDirectKC) {
    const int64_t kc = std::min(kDirectKC, K - pc);
    const bool acc = accumulate || pc > 0;
    pack_any(isa, A, 0, M, pc, kc, kMR, apack);
    for (int64_t jc = 0; jc < N; jc += kDirectCols) {
      const int nb = static_cast<int>(std::min(kDirectCols, N - jc));
      const uint16_t* b = w + pc * B.ld + jc;
      const bool padded = nb < kDirectCols;
      if (padded) {
        const int64_t width = nb <= 32 ? 32 : kDirectCols;
        for (int64_t k = 0; k < kc; ++k) {
          std::copy_n(b + k * B.ld, nb, block + k * kDirectCols);
          std::fill_n(block + k * kDirectCols + nb, width - nb, uint16_t{0});
        }
      }
      DirectRows rows;
      rows.copy = copy;
      rows.prefetch = pc + kc < K ? b + kc * B.ld : nullptr;
      rows.prefetch_ld = B.ld;
      // A padded block: every tile reads `block`. Else the first reads the weights, the others its copy.
      direct_row_tiles(M, C, jc, rows, !padded, [&](int64_t ir, int mr, float* const* crow, const DirectRows& r) {
        isa.direct_bf16(kc, apack + ir * kc, padded ? block : b, padded ? kDirectCols : B.ld, crow, mr, nb, alpha,
                        acc, r);
      });
    }
  }
}

// The depth of the dot path's reduction blocks for M token rows packed with value_bytes per value (4: the
// f32 dot path, 2: the pair path's bf16 rows; see kDotAFloats): a multiple of 32, and the last block the
// rest.
int64_t dot_depth(int64_t M, int64_t K, int64_t value_bytes) {
  const int64_t most = std::clamp(kDotAFloats * 4 / value_bytes / M / 32 * 32, kDotMinKC, kDotMaxKC);
  const int64_t blocks = (K + most - 1) / most;
  return ((K + blocks - 1) / blocks + 31) / 32 * 32;
}

// Packs A's M rows, values [pc, pc + kc), into the dot layout's tiles (DotKernel in gemm.h; kc32 floats
// per row): pack(src, scale, stride, dst) writes one row, starting at src, as blocks of 32 that are
// stride floats apart from dst on.
template <typename PackRow>
void pack_dot_tiles(const MatView& A, int64_t M, int64_t pc, int64_t kc32, float* apack, PackRow pack) {
  for (int64_t i = 0; i < M; ++i) {
    const void* src = static_cast<const char*>(A.data) + (A.row(i) * A.ld + pc) * dtype_bytes(A.dtype);
    const int64_t tile = i / 6, mb = std::min<int64_t>(6, M - 6 * tile);
    pack(src, A.scale(i), mb * 32, apack + 6 * tile * kc32 + (i % 6) * 32);
  }
}

// The dot path: A's rows packed once per block of the reduction, the weights read where they are.
// Edges (the last N % 4 rows, the last K % 32 columns) go through a zero-padded copy.
void gemm_dot(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
              const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  const auto* w = static_cast<const uint16_t*>(B.data);
  const int64_t depth = dot_depth(M, K, 4);
  float* apack = scratch;  // M * kc32 <= kDotAScratch floats
  auto* wpad = reinterpret_cast<uint16_t*>(scratch + kDotAScratch);
  float* crow[kDotMaxRows];
  for (int64_t pc = 0; pc < K; pc += depth) {
    const int64_t kc = std::min(depth, K - pc), kc32 = (kc + 31) / 32 * 32, kfull = kc / 32 * 32;
    const bool acc = accumulate || pc > 0;
    pack_dot_tiles(A, M, pc, kc32, apack, [&](const void* src, float scale, int64_t stride, float* dst) {
      isa.pack_dot_row(src, A.dtype, scale, kc, stride, dst);
    });
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      const int nw = static_cast<int>(std::min<int64_t>(4, N - n0));
      for (int64_t i = 0; i < M; ++i) crow[i] = C.row_ptr(i) + n0;
      const uint16_t* rows = w + n0 * B.ld + pc;
      const bool in_place = nw == 4 && kfull > 0;
      if (in_place) isa.dot_bf16(0, kfull, apack, kc32, static_cast<int>(M), rows, B.ld, 4, crow, alpha, acc);
      if (nw == 4 && kfull == kc) continue;
      const int64_t k0 = in_place ? kfull : 0, len = kc - k0, len32 = (len + 31) / 32 * 32;
      std::fill_n(wpad, 4 * len32, uint16_t{0});
      for (int j = 0; j < nw; ++j) std::copy_n(rows + j * B.ld + k0, len, wpad + j * len32);
      isa.dot_bf16(k0, len32, apack, kc32, static_cast<int>(M), wpad, len32, nw, crow, alpha,
                   in_place || acc);
    }
  }
}

// The quantized dot path (F32DotKernel in gemm.h): A's rows packed per block of the reduction in the dot
// layout's tiles with each block of 32 in column order, then each group of 4 weight rows dequantized
// kQuantDotKC columns at a time into an f32 buffer (L1-sized, zero past the edges) and multiplied there.
void gemm_quant_dot(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
                    const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  const int64_t depth = dot_depth(M, K, 4);
  float* apack = scratch;  // M * kc32 <= kDotAScratch floats
  float* wbuf = scratch + kDotAScratch;
  float* crow[kDotMaxRows];
  for (int64_t pc = 0; pc < K; pc += depth) {
    const int64_t kc = std::min(depth, K - pc), kc32 = (kc + 31) / 32 * 32;
    const bool acc = accumulate || pc > 0;
    // each block of 32 in column order: the row packer's panels of width 32, where the ISA has one
    pack_dot_tiles(A, M, pc, kc32, apack, [&](const void* src, float scale, int64_t stride, float* dst) {
      if (isa.pack_row_panels != nullptr) return isa.pack_row_panels(src, A.dtype, scale, kc, 32, stride, dst);
      for (int64_t k = 0; k < kc32; ++k) dst[k / 32 * stride + k % 32] = k < kc ? load_f32(src, A.dtype, k) * scale : 0.0f;
    });
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      const int nw = static_cast<int>(std::min<int64_t>(4, N - n0));
      for (int64_t i = 0; i < M; ++i) crow[i] = C.row_ptr(i) + n0;
      for (int64_t k0 = 0; k0 < kc; k0 += kQuantDotKC) {
        const int64_t len = std::min(kQuantDotKC, kc - k0), len32 = (len + 31) / 32 * 32;
        // the next step's bytes (these 4 rows' next columns, else the next 4 rows' first), into L2 while
        // these are multiplied (as the bf16 dot kernel fetches its next rows: the hardware prefetchers miss
        // the jump from row to row)
        const bool same_rows = k0 + kQuantDotKC < kc;
        const int64_t r = same_rows ? n0 : n0 + 4, next_k0 = same_rows ? k0 + kQuantDotKC : 0;
        if (r < N) {
          prefetch_quant_rows(B.quant, r, std::min<int64_t>(4, N - r), pc + next_k0,
                              std::min(kQuantDotKC, kc - next_k0));
        }
        for (int j = 0; j < 4; ++j) {
          float* row = wbuf + j * kQuantDotKC;
          const int64_t n = j < nw ? len : 0;
          if (n > 0) isa.dequant_row(B.quant, n0 + j, pc + k0, n, B.scale(n0 + j), row);
          std::fill(row + n, row + len32, 0.0f);
        }
        isa.dot_f32(k0, len32, apack, kc32, static_cast<int>(M), wbuf, kQuantDotKC, nw, crow, alpha, acc || k0 > 0);
      }
    }
  }
}

// Whether the quantized pair path (QuantPairDotKernel in gemm.h) can take B: its segments start on whole
// blocks of 32 columns and divide the path's blocks of kQuantDotKC columns (int8's whole rows always do).
bool quant_pairs_fit(const Isa& isa, const MatView& B) {
  const int64_t seg = B.quant.segment_cols();
  return isa.quant_pair_dot != nullptr && B.quant.c0 % 32 == 0 &&
         (seg == 0 || (seg % 32 == 0 && kQuantDotKC % seg == 0 && B.quant.c0 % seg == 0));
}

// The quantized pair path: A's rows (bf16) copied as the pair dot path copies them, then each group of 4
// weight rows read as codes kQuantDotKC columns at a time into a bf16 buffer (L1-sized, zero past the
// edges) with their segments' scales, and multiplied by vdpbf16ps. Reduction blocks are whole multiples
// of kQuantDotKC, so that segments never straddle one; int4's mins meet the token rows' sums over each
// segment, taken once per reduction block.
void gemm_quant_pair_rows(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
                          const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  static_assert(kQuantDotKC == 32 * kQuantSegments, "a block of the quantized pair path holds 16 segments at most");
  static_assert(kQuantPairRows * kQuantDotKC <= 2 * kDotAScratch, "a block of token rows fits the scratch");
  const QuantWeight& q = B.quant;
  const auto* x = static_cast<const uint16_t*>(A.data);
  const int64_t fit = std::min(dot_depth(M, K, 2), 2 * kDotAScratch / M);
  const int64_t depth = fit >= K ? K : std::max(kQuantDotKC, fit / kQuantDotKC * kQuantDotKC);
  const int64_t seg_cols = q.segment_cols() == 0 ? kQuantDotKC : q.segment_cols();
  const bool with_mins = q.format == QuantFormat::kInt4;
  auto* apack = reinterpret_cast<uint16_t*>(scratch);  // M * kc32 <= 2 * kDotAScratch values
  auto* codes = reinterpret_cast<uint16_t*>(scratch + kDotAScratch);  // 4 rows of kQuantDotKC
  float* scale = scratch + kDotAScratch + 2 * kQuantDotKC;            // [4][kQuantSegments]
  float* mins = scale + 4 * kQuantSegments;                           // [4][kQuantSegments]
  float* sums = mins + 4 * kQuantSegments;  // [M][blocks of kQuantDotKC][kQuantSegments]: one per 32 values
  float* crow[kQuantPairRows];
  for (int64_t pc = 0; pc < K; pc += depth) {
    const int64_t kc = std::min(depth, K - pc), kc32 = (kc + 31) / 32 * 32;
    const int64_t ld_sums = (kc + kQuantDotKC - 1) / kQuantDotKC * kQuantSegments;
    const bool acc = accumulate || pc > 0;
    for (int64_t i = 0; i < M; ++i) {
      const uint16_t* src = x + A.row(i) * A.ld + pc;
      std::copy_n(src, kc, apack + i * kc32);
      std::fill(apack + i * kc32 + kc, apack + (i + 1) * kc32, uint16_t{0});
      if (!with_mins) continue;
      // segment g of block b at row_sums[b * kQuantSegments + g], summed in 32 lanes (vectorised), then
      // across them; the row's zero padding adds nothing
      float* row_sums = sums + i * ld_sums;
      std::fill_n(row_sums, ld_sums, 0.0f);
      const uint16_t* padded = apack + i * kc32;
      for (int64_t k = 0; k < kc32; k += seg_cols) {
        float lanes[32] = {};
        for (int64_t c = k; c < std::min(kc32, k + seg_cols); c += 32) {
          for (int l = 0; l < 32; ++l) lanes[l] += bf16_to_f32(padded[c + l]);
        }
        float t = 0.0f;
        for (float v : lanes) t += v;
        row_sums[k / kQuantDotKC * kQuantSegments + k % kQuantDotKC / seg_cols] = t;
      }
    }
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      const int nw = static_cast<int>(std::min<int64_t>(4, N - n0));
      for (int64_t i = 0; i < M; ++i) crow[i] = C.row_ptr(i) + n0;
      for (int64_t k0 = 0; k0 < kc; k0 += kQuantDotKC) {
        const int64_t len = std::min(kQuantDotKC, kc - k0), len32 = (len + 31) / 32 * 32;
        const int64_t segs = (len + seg_cols - 1) / seg_cols;
        const int64_t first_seg = q.segment_cols() == 0 ? 0 : (q.c0 + pc + k0) / seg_cols;  // stored segment
        std::fill_n(scale, 8 * kQuantSegments, 0.0f);  // scale and mins: zero past the segments and rows
        for (int j = 0; j < nw; ++j) {
          uint16_t* row = codes + j * kQuantDotKC;
          isa.quant_codes(q, n0 + j, pc + k0, len, row);
          std::fill(row + len, row + len32, uint16_t{0});
          q.segment_scales(n0 + j, first_seg, segs, B.scale(n0 + j), scale + j * kQuantSegments,
                           mins + j * kQuantSegments);
        }
        for (int j = nw; j < 4; ++j) std::fill_n(codes + j * kQuantDotKC, len32, uint16_t{0});
        QuantScales sc{scale, nullptr, nullptr, 0};
        if (with_mins) sc = QuantScales{scale, mins, sums + k0 / kQuantDotKC * kQuantSegments, ld_sums};
        isa.quant_pair_dot(len32, apack + k0, kc32, static_cast<int>(M), codes, kQuantDotKC, nw, seg_cols, sc, crow,
                           alpha, acc || k0 > 0);
      }
    }
  }
}

// The quantized pair path for any number of token rows: kQuantPairRows at a time.
void gemm_quant_pair_dot(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
                         const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  for (int64_t m0 = 0; m0 < M; m0 += kQuantPairRows) {
    gemm_quant_pair_rows(isa, std::min(kQuantPairRows, M - m0), N, K, alpha, A.skip_rows(m0), B, C.skip_rows(m0),
                         accumulate, scratch);
  }
}

// Columns of B once packed: N rounded up to whole panels of nr.
int64_t padded_cols(const Isa& isa, int64_t N) { return (N + isa.nr - 1) / isa.nr * isa.nr; }

// C = 0 unless accumulating: the product of an empty reduction (K == 0).
void clear_unless_accumulating(int64_t M, int64_t N, const OutView& C, bool accumulate) {
  if (accumulate) return;
  for (int64_t i = 0; i < M; ++i) std::fill_n(C.row_ptr(i), N, 0.0f);
}

// Fetches C[i0:i0+m, j0:j0+n] into L1 for writing. C's rows lie far apart (gathered, or 4 KiB and
// more apart) and a large C does not stay in cache between depth blocks, so the epilogue of each
// micro-kernel call would miss on them.
void prefetch_tile(const OutView& C, int64_t i0, int64_t m, int64_t j0, int64_t n) {
  for (int64_t i = i0; i < i0 + m; ++i) {
    const float* row = C.row_ptr(i) + j0;
    for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(row + j, 1);
  }
}

// C[0:mc, 0:nc] (+)= alpha * A B for one packed block of A (mc rows, panels of kMR) and of B (nc
// columns, panels of nr), both of depth kc. With prefetch_c, each micro-kernel call is preceded by a
// prefetch of the C rows of the next one in its column panel: for a large output C (gemm), not for a
// worker's L2-resident tile (gemm_packed), where the prefetches only wait on fill buffers.
// `kernel` is the f32 micro-kernel (T = float, steps = kc) or the pair kernel (T = uint32_t, steps =
// the kc / 2 pairs, rounded up).
template <typename T, typename Kernel>
void macro_kernel(Kernel kernel, int64_t nr, int64_t mc, int64_t nc, int64_t steps, float alpha, const T* apack,
                  const T* bpack, const OutView& C, bool acc, bool prefetch_c) {
  float* crow[kMR];
  for (int64_t jr = 0; jr < nc; jr += nr) {
    const int n_tile = static_cast<int>(std::min(nr, nc - jr));
    for (int64_t ir = 0; ir < mc; ir += kMR) {
      const int m_tile = static_cast<int>(std::min(kMR, mc - ir));
      for (int i = 0; i < m_tile; ++i) crow[i] = C.row_ptr(ir + i) + jr;
      if (prefetch_c && ir + kMR < mc) prefetch_tile(C, ir + kMR, std::min(kMR, mc - ir - kMR), jr, n_tile);
      kernel(steps, apack + (ir / kMR) * steps * kMR, bpack + (jr / nr) * steps * nr, crow, m_tile, n_tile, alpha,
             acc);
    }
  }
}

// Whether a product with these operands takes the small-M pair kernels (dot, direct): besides
// pair_operands, A [M, K] not transposed and B read in place (not gathered).
bool pair_in_place(const MatView& A, const MatView& B) { return !A.trans && B.rows == nullptr; }

// Packs logical rows [i0, i0 + mc) of A (bf16), values [k0, k0 + kc), into panels of `width` rows of
// pairs, zero-padded: buf[(p * kp + q) * width + ii] = pair q of row i0 + p * width + ii, kp = (kc + 1) / 2.
// Stored (i, k): full panels through the ISA's panel packer, the last partial one word by word. Stored
// (k, i) (B [K, N] packed as B^T): each two stored rows through its row packer; a quantized B's through
// the ISA's quantized row packer (dequantized, rounded to bf16 and interleaved).
void pack_pairs(const Isa& isa, const MatView& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int64_t width,
                uint32_t* buf) {
  const auto* d = static_cast<const uint16_t*>(A.data);
  const int64_t panels = (mc + width - 1) / width, kp = (kc + 1) / 2;
  if (A.dtype == DType::kQuant) {  // stored (k, i): the quant_pairs path's B (Isa::quant_pair_rows, width 32)
    for (int64_t q = 0; q < kp; ++q) {
      const int64_t k = k0 + 2 * q;
      const bool two = k + 1 < k0 + kc;
      if (k + 2 * kQuantAhead < k0 + kc) prefetch_quant_rows(A.quant, k + 2 * kQuantAhead, 2, i0, mc);
      isa.quant_pair_rows(A.quant, k, two, i0, mc, A.scale(k), two ? A.scale(k + 1) : 1.0f, kp * width,
                          buf + q * width);
    }
    return;
  }
  if (A.trans) {
    constexpr int64_t kAhead = 4;  // pairs of rows prefetched ahead, as pack_panels does for f32
    for (int64_t q = 0; q < kp; ++q) {
      for (int64_t k = k0 + 2 * (q + kAhead); k < std::min(k0 + kc, k0 + 2 * (q + kAhead) + 2); ++k) {
        for (int64_t c = 0; c < mc; c += 32) __builtin_prefetch(d + A.row(k) * A.ld + i0 + c);
      }
      const uint16_t* r0 = d + A.row(k0 + 2 * q) * A.ld + i0;
      const uint16_t* r1 = 2 * q + 1 < kc ? d + A.row(k0 + 2 * q + 1) * A.ld + i0 : nullptr;
      isa.pack_pair_rows(r0, r1, mc, width, kp * width, buf + q * width);
    }
    return;
  }
  const PairPanelPacker fast = width == kMR ? isa.pack_pair_a_panel : isa.pack_pair_panel;
  const uint16_t* rows[kMaxNR];
  for (int64_t p = 0; p < panels; ++p) {
    uint32_t* panel = buf + p * kp * width;
    const int64_t n = std::min(width, mc - p * width);
    if (width == kMR && p + 1 < panels) {  // the A side: the next panel's rows (see prefetch_rows)
      prefetch_rows<uint16_t>(A, i0 + (p + 1) * width, std::min(width, mc - (p + 1) * width), k0, kc);
    }
    for (int64_t ii = 0; ii < n; ++ii) rows[ii] = d + A.row(i0 + p * width + ii) * A.ld + k0;
    if (n == width) {
      fast(rows, kc, panel);
      continue;
    }
    for (int64_t q = 0; q < kp; ++q) {
      for (int64_t ii = 0; ii < width; ++ii) panel[q * width + ii] = ii < n ? bf16_pair(rows[ii], q, kc) : 0;
    }
  }
}

// The pair path's dot kernel for up to kDotMaxRows token rows: per reduction block, the rows copied one
// after the other (zero-padded to a multiple of 32), and the weights read in place, 4 rows at a time.
void gemm_pair_dot(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
                   const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  const auto* w = static_cast<const uint16_t*>(B.data);
  const auto* x = static_cast<const uint16_t*>(A.data);
  const int64_t depth = dot_depth(M, K, 2);
  auto* apack = reinterpret_cast<uint16_t*>(scratch);  // M * kc32 <= 2 * kDotAScratch values
  float* crow[kDotMaxRows];
  for (int64_t pc = 0; pc < K; pc += depth) {
    const int64_t kc = std::min(depth, K - pc), kc32 = (kc + 31) / 32 * 32;
    for (int64_t i = 0; i < M; ++i) {
      std::copy_n(x + A.row(i) * A.ld + pc, kc, apack + i * kc32);
      std::fill(apack + i * kc32 + kc, apack + (i + 1) * kc32, uint16_t{0});
    }
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      const int nw = static_cast<int>(std::min<int64_t>(4, N - n0));
      for (int64_t i = 0; i < M; ++i) crow[i] = C.row_ptr(i) + n0;
      isa.pair_dot(kc, apack, kc32, static_cast<int>(M), w + n0 * B.ld + pc, B.ld, nw, crow, alpha,
                   accumulate || pc > 0);
    }
  }
}

// The pair path's direct kernel for up to kDirectMaxRows token rows against a B stored [K, N]: gemm_direct
// with pairs. Per block of kDirectKC rows of B, the token rows packed as pairs, and each block of
// kDirectCols columns read in place (masked at the edges) by the first row tile and from its copy by
// the others.
void gemm_pair_direct(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
                      const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  const auto* w = static_cast<const uint16_t*>(B.data);
  auto* apack = reinterpret_cast<uint32_t*>(scratch);  // kDirectAFloats: M rounded up to kMR, times kDirectKC / 2
  float* copy = scratch + kDirectAFloats + kDirectBlockFloats;  // kDirectKC / 2 * kDirectCols words
  for (int64_t pc = 0; pc < K; pc += kDirectKC) {
    const int64_t kc = std::min(kDirectKC, K - pc), kp = (kc + 1) / 2;
    const bool acc = accumulate || pc > 0;
    pack_pairs(isa, A, 0, M, pc, kc, kMR, apack);
    for (int64_t jc = 0; jc < N; jc += kDirectCols) {
      const int nb = static_cast<int>(std::min(kDirectCols, N - jc));
      const uint16_t* b = w + pc * B.ld + jc;
      DirectRows rows;
      rows.copy = copy;
      rows.prefetch = pc + kc < K ? b + kc * B.ld : nullptr;
      rows.prefetch_ld = B.ld;
      direct_row_tiles(M, C, jc, rows, true, [&](int64_t ir, int mr, float* const* crow, const DirectRows& r) {
        isa.pair_direct(kc, apack + ir * kp, b, B.ld, crow, mr, nb, alpha, acc, r);
      });
    }
  }
}

// The pair path's packed GEMM: gemm()'s blocking, twice as deep in values (the same bytes of pairs as of
// f32 values, so the same scratch), both operands packed as pairs.
void gemm_pairs(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
                const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  const int64_t nr = isa.nr;
  const int64_t depth = 2 * (M <= kFewRows ? kKCFewRows : kKC);
  auto* apack = reinterpret_cast<uint32_t*>(scratch);
  auto* bpack = reinterpret_cast<uint32_t*>(scratch + kMC * kKC);
  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    for (int64_t pc = 0; pc < K; pc += depth) {
      const int64_t kc = std::min(depth, K - pc), kp = (kc + 1) / 2;
      pack_pairs(isa, B.t(), jc, nc, pc, kc, nr, bpack);
      for (int64_t ic = 0; ic < M; ic += kMC) {
        const int64_t mc = std::min(kMC, M - ic);
        pack_pairs(isa, A, ic, mc, pc, kc, kMR, apack);
        macro_kernel(isa.pair_kernel, nr, mc, nc, kp, alpha, apack, bpack, C.skip_rows(ic).skip_cols(jc),
                     accumulate || pc > 0, true);
      }
    }
  }
}

// The scratch of gemm_any: the largest of its paths'.
int64_t any_scratch_floats() {
  const int64_t packed = kMC * kKC + kKC * kNC + kMR * kMaxNR;
  const int64_t dot = kDotAScratch + 4 * kDotMaxKC / 2;  // token rows + padded bf16 weight rows
  static_assert(4 * kQuantDotKC <= 4 * kDotMaxKC / 2, "the quantized dot path's rows fit the dot path's scratch");
  // the quantized pair path's codes, scales, mins and token sums (one a 32 values of apack's, whose rows
  // are padded to whole blocks of kQuantDotKC for them: at most kQuantDotKC / 32 more a row)
  static_assert(2 * kQuantDotKC + 8 * kQuantSegments + 2 * kDotAScratch / 32 + kQuantPairRows * kQuantSegments <=
                    4 * kDotMaxKC / 2,
                "the quantized pair path fits the dot path's scratch");
  const int64_t direct = kDirectAFloats + kDirectBlockFloats + kDirectCopyFloats;
  return std::max({packed, dot, direct});
}

// The paths of gemm_any: the pair path's packed GEMM and small-M kernels, the f32 small-M kernels, or the
// packed f32 micro-kernel (GemmPath in stats.h).
using Path = GemmPath;

Path choose_path(const Isa& isa, int64_t M, int64_t K, const MatView& A, const MatView& B) {
  if (pair_operands(isa, A) && pair_operands(isa, B)) {
    if (!pair_in_place(A, B) || M > (B.trans ? kDotMaxRows : kDirectMaxRows)) return Path::kPairs;
    return B.trans ? Path::kPairDot : Path::kPairDirect;
  }
  const bool dot = B.trans && !A.trans, direct = !B.trans;
  if ((dot || direct) && small_batch(isa, M, K, B)) return dot ? Path::kDot : Path::kDirect;
  if (dot && B.dtype == DType::kQuant && K >= 32 && pair_operands(isa, A) && quant_pairs_fit(isa, B)) {
    return Path::kQuantPairDot;
  }
  if (dot && B.dtype == DType::kQuant && M <= kDotMaxRows && K >= 32) return Path::kQuantDot;
  // a quantized weight stored [K, N] (the chain to dx) against bf16 rows: read as a bf16 copy, as bf16
  // intermediates read every operand that would mix f32 and bf16 (gemm_pairs, pack_pairs)
  if (direct && B.dtype == DType::kQuant && pair_operands(isa, A) && isa.quant_pair_rows != nullptr) {
    return Path::kQuantPairs;
  }
  return Path::kPacked;
}

// C[M,N] = (accumulate ? C : 0) + alpha * op(A) op(B) for K > 0, on the path choose_path picks.
void gemm_any(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
              const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  const Path path = choose_path(isa, M, K, A, B);
  add_path_flops(path, 2 * M * N * K);
  if (path == Path::kPairs || path == Path::kPairDot || path == Path::kPairDirect || path == Path::kQuantPairDot ||
      path == Path::kQuantPairs) {
    stats().bf16_pair_flops.fetch_add(2 * M * N * K, std::memory_order_relaxed);
  }
  if (path != Path::kPairs && path != Path::kPacked && path != Path::kQuantPairs) {  // the small-batch paths
    stats().small_batch_flops.fetch_add(2 * M * N * K, std::memory_order_relaxed);
  }
  switch (path) {
    case Path::kPairs:
    case Path::kQuantPairs: return gemm_pairs(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
    case Path::kPairDot: return gemm_pair_dot(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
    case Path::kPairDirect: return gemm_pair_direct(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
    case Path::kDot: return gemm_dot(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
    case Path::kDirect: return gemm_direct(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
    case Path::kQuantDot: return gemm_quant_dot(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
    case Path::kQuantPairDot: return gemm_quant_pair_dot(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
    case Path::kPacked: break;
    default: break;  // the other GemmPath values name callers of gemm_any, never its choice
  }
  const int64_t nr = isa.nr;
  const int64_t depth = M <= kFewRows ? kKCFewRows : kKC;
  float* apack = scratch;
  float* bpack = scratch + kMC * kKC;
  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    for (int64_t pc = 0; pc < K; pc += depth) {
      const int64_t kc = std::min(depth, K - pc);
      pack_any(isa, B.t(), jc, nc, pc, kc, nr, bpack);  // B [K, N] = panels of nr rows of B^T
      for (int64_t ic = 0; ic < M; ic += kMC) {
        const int64_t mc = std::min(kMC, M - ic);
        pack_any(isa, A, ic, mc, pc, kc, kMR, apack);
        macro_kernel(isa.kernel, nr, mc, nc, kc, alpha, apack, bpack, C.skip_rows(ic).skip_cols(jc),
                     accumulate || pc > 0, true);
      }
    }
  }
}

// Whether C = op(A) op(B) is cheaper computed transposed (gemm_transposed): LoRA's products with the
// rank as N (z = x A^T, d B, dB = d^T z; r = 8 or 16) fill 8 or 16 of the micro-kernel's 32 columns (the
// direct kernels': of 32 or 64), so half or more of their work is padding; transposed, those columns are
// rows, padded only to the tile's 6. Taken where the tiles' area shrinks by more than a quarter, and not
// where a dot kernel takes the product (it reads B's rows 4 at a time: nothing wasted on a narrow N).
bool few_columns(const Isa& isa, int64_t M, int64_t N, int64_t K, const MatView& A, const MatView& B) {
  if (N >= isa.nr || N >= M) return false;
  const Path path = choose_path(isa, M, K, A, B);
  if (path == Path::kPairDot || path == Path::kDot || path == Path::kQuantDot || path == Path::kQuantPairDot) {
    return false;
  }
  auto area = [&](int64_t rows, int64_t cols) {
    return (rows + kMR - 1) / kMR * kMR * ((cols + isa.nr - 1) / isa.nr * isa.nr);
  };
  return 4 * area(N, M) < 3 * area(M, N);
}

// C = op(A) op(B) as C^T = op(B)^T op(A)^T, in blocks of kNC rows of C: each block's C^T [N, mc] is
// computed into the scratch past gemm_any's and added into C transposed.
void gemm_transposed(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
                     const MatView& B, const OutView& C, bool accumulate, float* scratch) {
  float* ct = scratch + any_scratch_floats();  // N * kNC floats, N < isa.nr
  add_path_flops(Path::kTransposed, 2 * M * N * K);
  for (int64_t m0 = 0; m0 < M; m0 += kNC) {
    const int64_t mc = std::min(kNC, M - m0);
    const MatView a_rows = A.trans ? A.skip_cols(m0) : A.skip_rows(m0);  // rows [m0, m0 + mc) of op(A)
    gemm_any(isa, N, mc, K, alpha, B.t(), a_rows.t(), OutView{ct, mc}, false, scratch);
    for (int64_t i = 0; i < mc; ++i) {
      float* row = C.row_ptr(m0 + i);
      for (int64_t j = 0; j < N; ++j) row[j] = (accumulate ? row[j] : 0.0f) + ct[j * mc + i];
    }
  }
}

}  // namespace

MatView MatView::skip_rows(int64_t r0) const {
  MatView v = *this;
  if (dtype == DType::kQuant) {
    v.quant.r0 += r0;
  } else if (rows) {
    v.rows = rows + r0;
  } else {
    v.data = static_cast<const char*>(data) + r0 * ld * dtype_bytes(dtype);
  }
  if (row_scale) v.row_scale = row_scale + r0;
  return v;
}

MatView MatView::skip_cols(int64_t c0) const {
  MatView v = *this;
  if (dtype == DType::kQuant) {
    v.quant.c0 += c0;
  } else {
    v.data = static_cast<const char*>(data) + c0 * dtype_bytes(dtype);
  }
  return v;
}

OutView OutView::skip_rows(int64_t r0) const {
  OutView v = *this;
  if (rows) v.rows = rows + r0;
  else v.data = data + r0 * ld;
  return v;
}

OutView OutView::skip_cols(int64_t c0) const {
  OutView v = *this;
  v.data = data + c0;
  return v;
}

const Isa* select_isa() {
  const char* want = std::getenv("KTJAX_ISA");
  for (const Isa* isa : kIsas) {
    if (want && *want) {
      if (std::strcmp(want, isa->name) == 0) return cpu_has(*isa) ? isa : nullptr;
    } else if (cpu_has(*isa)) {
      return isa;
    }
  }
  return nullptr;
}

const char* available_isas() {
  static const std::string names = [] {
    std::string out;
    for (const Isa* isa : kIsas) {
      if (cpu_has(*isa)) out += (out.empty() ? "" : ",") + std::string(isa->name);
    }
    return out;
  }();
  return names.c_str();
}

void store_row(const Isa& isa, const float* src, void* dst, DType t, int64_t n) {
  if (t == DType::kBF16 && isa.round_bf16 != nullptr) {
    isa.round_bf16(src, static_cast<uint16_t*>(dst), n);
  } else {
    store_row(src, dst, t, n);
  }
}

int64_t gemm_scratch_floats() { return any_scratch_floats() + kMaxNR * kNC; }

void gemm(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
          const MatView& B, const OutView& C, bool accumulate, float* scratch, Work work) {
  if (M <= 0 || N <= 0) return;
  add_flops(work, 2 * M * N * K);
  if (K <= 0) return clear_unless_accumulating(M, N, C, accumulate);
  if (few_columns(isa, M, N, K, A, B)) {
    return gemm_transposed(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
  }
  gemm_any(isa, M, N, K, alpha, A, B, C, accumulate, scratch);
}

bool pair_operands(const Isa& isa, const MatView& v) {
  return isa.pair_kernel != nullptr && v.dtype == DType::kBF16 && v.row_scale == nullptr;
}

int64_t packed_b_floats(const Isa& isa, int64_t K, int64_t N) {
  return std::max<int64_t>(K, 0) * padded_cols(isa, N);
}

PackedB pack_b(const Isa& isa, int64_t K, int64_t N, const MatView& B, bool pairs, float* dst) {
  const int64_t n_padded = padded_cols(isa, N);
  if (pairs && pair_operands(isa, B)) {  // blocks of 2 * kKCFewRows values: the bytes of an f32 block
    auto* words = reinterpret_cast<uint32_t*>(dst);
    for (int64_t pc = 0; pc < K; pc += 2 * kKCFewRows) {
      pack_pairs(isa, B.t(), 0, N, pc, std::min(2 * kKCFewRows, K - pc), isa.nr, words + pc / 2 * n_padded);
    }
    return PackedB{dst, K, N, 2 * kKCFewRows, true};
  }
  for (int64_t pc = 0; pc < K; pc += kKCFewRows) {
    pack_any(isa, B.t(), 0, N, pc, std::min(kKCFewRows, K - pc), isa.nr, dst + pc * n_padded);
  }
  return PackedB{dst, K, N, kKCFewRows, false};
}

void gemm_packed(const Isa& isa, int64_t M, float alpha, const MatView& A, const PackedB& B,
                 const OutView& C, bool accumulate, float* scratch, Work work) {
  const int64_t N = B.N, K = B.K;
  if (M <= 0 || N <= 0) return;
  add_flops(work, 2 * M * N * K);
  stats().packed_once_flops.fetch_add(2 * M * N * K, std::memory_order_relaxed);
  if (K <= 0) return clear_unless_accumulating(M, N, C, accumulate);
  const int64_t n_padded = padded_cols(isa, N);
  // Each depth block of B against the rows of A that one packing buffer holds at that depth, packed by
  // pack_a; `values` per packed word: 1 (f32) or 2 (bf16 pairs, B's block pc at pc / 2 words).
  auto run = [&](auto kernel, auto* apack, const auto* b, int64_t values, const auto& pack_a) {
    const int64_t rows = kMC * kKC / (B.kc / values) / kMR * kMR;
    for (int64_t pc = 0; pc < K; pc += B.kc) {
      const int64_t kc = std::min(B.kc, K - pc);
      for (int64_t ic = 0; ic < M; ic += rows) {
        const int64_t mc = std::min(rows, M - ic);
        pack_a(ic, mc, pc, kc, apack);
        macro_kernel(kernel, isa.nr, mc, N, (kc + values - 1) / values, alpha, apack, b + pc / values * n_padded,
                     C.skip_rows(ic), accumulate || pc > 0, false);
      }
    }
  };
  add_path_flops(B.pairs ? Path::kPackedOncePairs : Path::kPackedOnce, 2 * M * N * K);
  if (B.pairs) {
    stats().bf16_pair_flops.fetch_add(2 * M * N * K, std::memory_order_relaxed);
    run(isa.pair_kernel, reinterpret_cast<uint32_t*>(scratch), reinterpret_cast<const uint32_t*>(B.data), 2,
        [&](int64_t ic, int64_t mc, int64_t pc, int64_t kc, uint32_t* buf) {
          pack_pairs(isa, A, ic, mc, pc, kc, kMR, buf);
        });
  } else {
    run(isa.kernel, scratch, B.data, 1, [&](int64_t ic, int64_t mc, int64_t pc, int64_t kc, float* buf) {
      pack_any(isa, A, ic, mc, pc, kc, kMR, buf);
    });
  }
}

}  // namespace ktjax
