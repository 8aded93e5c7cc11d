// Per-ISA GEMM micro-kernels (see gemm.h for the contract). Each lives in its own translation unit,
// compiled with that ISA's flags; gemm.cc picks one at run time from what the CPU supports.
#pragma once

#include <cstdint>
#include <type_traits>

#include "dtype.h"
#include "gemm.h"

namespace ktjax {

// Calls tile(std::integral_constant<int, MR>{}) with MR = mr (1 to 6, larger counts as 6): the small-M
// kernels instantiate their tile once per row count, so that its accumulators stay in registers.
template <typename Tile>
inline void with_tile_rows(int mr, const Tile& tile) {
  switch (mr) {
    case 1: return tile(std::integral_constant<int, 1>{});
    case 2: return tile(std::integral_constant<int, 2>{});
    case 3: return tile(std::integral_constant<int, 3>{});
    case 4: return tile(std::integral_constant<int, 4>{});
    case 5: return tile(std::integral_constant<int, 5>{});
    default: return tile(std::integral_constant<int, 6>{});
  }
}

void microkernel_avx512(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                        float alpha, bool acc);  // MR=6, NR=32
void microkernel_avx2(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                      float alpha, bool acc);  // MR=6, NR=16
void microkernel_generic(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                         float alpha, bool acc);  // MR=6, NR=16
// The portable small-batch kernels (gemm.h): the dot kernel and its row packer, in the AVX-512 and AVX2
// kernels' layout, and the direct kernel (its copy: the widened weights in column order).
void dot_bf16_generic(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                      int nw, float* const* c, float alpha, bool acc);
void dot_f32_generic(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const float* w, int64_t ldw,
                     int nw, float* const* c, float alpha, bool acc);
void dequant_row_generic(const QuantWeight& w, int64_t r, int64_t c, int64_t n, float mul, float* dst);
void pack_dot_row_generic(const void* src, DType dtype, float scale, int64_t n, int64_t stride, float* dst);
void direct_bf16_generic(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int mr,
                         int nr, float alpha, bool acc, const DirectRows& rows);

// AVX-512 panel packers for nr = 32: 16x16 in-register transposes instead of strided scalar stores.
void pack_bf16_panel_avx512(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst);
void pack_f32_panel_avx512(const float* const* rows, const float* scale, int64_t kc, float* dst);
// The same for the A side's panels of 6 rows (permutes that interleave 6 rows of 16 values).
void pack_bf16_a_panel_avx512(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst);
void pack_f32_a_panel_avx512(const float* const* rows, const float* scale, int64_t kc, float* dst);
// Masked 16-lane copies of one stored row into panel slices (RowPanelPacker in gemm.h).
void pack_row_panels_avx512(const void* src, DType dtype, float scale, int64_t n, int64_t width,
                            int64_t stride, float* dst);

// AVX-512 small-M kernels against bf16 weights read in place, and the dot kernel's row packer (gemm.h).
void direct_bf16_avx512(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int mr,
                        int nr, float alpha, bool acc, const DirectRows& rows);
void dot_bf16_avx512(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                     int nw, float* const* c, float alpha, bool acc);
void round_bf16_avx512(const float* src, uint16_t* dst, int64_t n);

// One block of 32 of a stored row in the dot layout (DotRowPacker in gemm.h): values k0 .. k0 + len - 1
// (len <= 32, zero past), times scale, the even ones at dst[0:16], the odd ones at dst[16:32]. The
// AVX-512 packer's partial last block; every block of the AVX2 one.
inline void pack_dot_block(const void* src, DType dtype, float scale, int64_t k0, int64_t len, float* dst) {
  float block[32] = {};
  for (int64_t t = 0; t < len; ++t) block[t] = load_f32(src, dtype, k0 + t) * scale;
  for (int t = 0; t < 16; ++t) {
    dst[t] = block[2 * t];
    dst[16 + t] = block[2 * t + 1];
  }
}

// AVX2 small-M kernels and the dot kernel's row packer (the same layouts as the AVX-512 ones).
void direct_bf16_avx2(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c, int mr, int nr,
                      float alpha, bool acc, const DirectRows& rows);
void dot_bf16_avx2(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                   int nw, float* const* c, float alpha, bool acc);
// Quantized weights: the dot kernel against f32 rows in column order (F32DotKernel), and the row
// dequantizer (QuantRowReader, in quant_avx2.cc). The AVX-512 ISAs use them too.
void dot_f32_avx2(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const float* w, int64_t ldw, int nw,
                  float* const* c, float alpha, bool acc);
void dequant_row_avx2(const QuantWeight& w, int64_t r, int64_t c, int64_t n, float mul, float* dst);
void pack_dot_row_avx2(const void* src, DType dtype, float scale, int64_t n, int64_t stride, float* dst);
void round_bf16_avx2(const float* src, uint16_t* dst, int64_t n);
// AVX2 panel packers for nr = 16 and the A side's 6 rows (8x8 in-register transposes), and the packer
// of a transposed operand's stored rows.
void pack_bf16_panel_avx2(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst);
void pack_f32_panel_avx2(const float* const* rows, const float* scale, int64_t kc, float* dst);
void pack_bf16_a_panel_avx2(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst);
void pack_f32_a_panel_avx2(const float* const* rows, const float* scale, int64_t kc, float* dst);
void pack_row_panels_avx2(const void* src, DType dtype, float scale, int64_t n, int64_t width, int64_t stride,
                          float* dst);
void pack_dot_row_avx512(const void* src, DType dtype, float scale, int64_t n, int64_t stride, float* dst);

// The bf16 pair path (PairKernel in gemm.h). Its packers need only AVX-512F/BW (gemm_avx512.cc): full
// panels of 32 stored rows (B side) and 6 (A side), by the f32 packers' transposes of 32-bit words, and
// pairs of stored rows of a B stored [K, N] (PairRowPacker), interleaved by two-source permutes.
void pack_pair_panel_avx512(const uint16_t* const* rows, int64_t kc, uint32_t* dst);
void pack_pair_a_panel_avx512(const uint16_t* const* rows, int64_t kc, uint32_t* dst);
void pack_pair_rows_avx512(const uint16_t* r0, const uint16_t* r1, int64_t n, int64_t width, int64_t stride,
                           uint32_t* dst);
// Its kernels need AVX512_BF16 (gemm_avx512_bf16.cc): the 6x32 micro-kernel, the dot and direct kernels.
void microkernel_pairs_avx512bf16(int64_t kp, const uint32_t* a, const uint32_t* b, float* const* c, int mr,
                                  int nr, float alpha, bool acc);
void pair_dot_avx512bf16(int64_t kc, const uint16_t* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                         int nw, float* const* c, float alpha, bool acc);
void pair_direct_avx512bf16(int64_t kc, const uint32_t* a, const uint16_t* w, int64_t ldw, float* const* c, int mr,
                            int nr, float alpha, bool acc, const DirectRows& rows);

// The quantized pair path (QuantCodeReader, QuantPairDotKernel in gemm.h; quant_avx512_bf16.cc).
void quant_codes_avx512bf16(const QuantWeight& w, int64_t r, int64_t c, int64_t n, uint16_t* dst);
void quant_pair_rows_avx512bf16(const QuantWeight& w, int64_t k, bool two, int64_t c, int64_t n, float mul0,
                                float mul1, int64_t stride, uint32_t* dst);
void quant_pair_dot_avx512bf16(int64_t kc, const uint16_t* a, int64_t lda, int m, const uint16_t* q, int64_t ldq,
                               int nw, int64_t seg, const QuantScales& sc, float* const* c, float alpha, bool acc);

}  // namespace ktjax
