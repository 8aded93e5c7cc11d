// Single-threaded blocked GEMM used by every expert kernel: C[M,N] (+)= alpha * op(A)[M,K] op(B)[K,N].
//
// Operands are views over row-major buffers of f32 or bf16 with optional row indirection (to read an
// expert's tokens straight out of x without gathering them) and optional per-row scale (router
// weights). Packing widens bf16 to f32, so one f32 micro-kernel per ISA serves both types, and every
// product is accumulated in f32; where both operands are bf16 and the CPU has AVX512_BF16, the pair
// path (PairKernel below) multiplies them as bf16 pairs instead, still into f32 sums. With few rows of
// A against bf16 weights, the ISA's small-batch kernels (DotKernel, DirectKernel below) read the weights
// in place instead of packing them. Callers parallelise over (expert, tile) work items.
#pragma once

#include <cstdint>

#include "activation.h"
#include "dtype.h"
#include "quant.h"
#include "stats.h"

namespace ktjax {

// A view of a stored row-major matrix S; element (r, c) is data[row(r) * ld + c] * scale(r).
// The logical operand is S, or S transposed when `trans` is set.
struct MatView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t ld = 0;
  const int32_t* rows = nullptr;     // stored row r lives at buffer row rows[r]
  const float* row_scale = nullptr;  // stored row r is multiplied by row_scale[r]
  bool trans = false;
  QuantWeight quant;  // dtype kQuant: the stored matrix (data and ld unused), dequantized when packed

  int64_t row(int64_t r) const { return rows ? rows[r] : r; }
  float scale(int64_t r) const { return row_scale ? row_scale[r] : 1.0f; }
  // The same matrix without its first r0 stored rows / c0 stored columns.
  MatView skip_rows(int64_t r0) const;
  MatView skip_cols(int64_t c0) const;
  MatView t() const {
    MatView v = *this;
    v.trans = !v.trans;
    return v;
  }
};

// f32 output; logical row i is stored at data[row(i) * ld]. Rows may repeat only when accumulating.
struct OutView {
  float* data = nullptr;
  int64_t ld = 0;
  const int32_t* rows = nullptr;

  float* row_ptr(int64_t i) const { return data + (rows ? rows[i] : i) * ld; }
  OutView skip_rows(int64_t r0) const;
  OutView skip_cols(int64_t c0) const;
};

// Micro-kernel: c[i][0:nr] = (acc ? c[i][0:nr] : 0) + alpha * sum_k a[k][i] b[k][0:nr] for i < mr.
using MicroKernel = void (*)(int64_t kc, const float* a, const float* b, float* const* c, int mr,
                             int nr, float alpha, bool acc);

// Packs one full panel of w stored rows, transposed (and widened from bf16):
// dst[k * w + j] = rows[j][k] * scale[j] for j < w, k < kc, with w = nr (B side: a weight slice) or
// w = 6 (A side: token rows). The ISA's vectorised versions of the packing's common cases.
using Bf16PanelPacker = void (*)(const uint16_t* const* rows, const float* scale, int64_t kc, float* dst);
using F32PanelPacker = void (*)(const float* const* rows, const float* scale, int64_t kc, float* dst);
// Packs one stored row into the k-slice of consecutive panels that it fills when the operand is stored
// transposed: dst[p * stride + j] = src[p * width + j] * scale for j < width, zero past n.
using RowPanelPacker = void (*)(const void* src, DType dtype, float scale, int64_t n, int64_t width,
                                int64_t stride, float* dst);

// Which steps of a small-M kernel's reduction loop prefetch the weights the driver reads next: those
// with step % period == phase. Several row tiles read the same weights one after the other; with one
// phase each, the next weights are requested evenly over all of them, not in one burst (which stalled
// on the memory system while the other tiles' loads were cache hits).
struct PrefetchSlice {
  int phase = 0, period = 1;
};

// Small-M kernel that reads bf16 weights in place, without packing them. Weights stored [N, K] with k
// contiguous (every forward projection: W [out, in]) are multiplied against a few token rows, 4 stored
// weight rows at a time:
//   c[i][j] = (acc ? c[i][j] : 0) + alpha * sum_{k < kc} A(i, k0 + k) * w[j * ldw + k],  i < m, j < nw <= 4.
// k0 and kc are multiples of 32 and all 4 rows are readable for kc elements (the driver pads the edges).
// A is in the dot layout written by DotRowPacker, lda floats per row (a multiple of 32): rows in tiles
// of 6 (the last tile has the remaining mb rows), tile t at a + 6 * t * lda, and in a tile of mb rows
// the values k in [32 b, 32 b + 32) of its row i at tile + (b * mb + i) * 32: the 16 even-k ones, then
// the 16 odd-k ones. Even/odd is the order in which one 64-byte load of 32 bf16 weights widens to f32
// with a single shift (even) or mask (odd), so a weight costs half an instruction to widen instead of
// a packed f32 copy; the interleaved tiles let one pointer walk all of a tile's rows. The 4 stored rows
// after the last one (the driver's next call) are prefetched into L2 on the way, each tile of 6 token
// rows taking its PrefetchSlice of the steps of 32 k.
using DotKernel = void (*)(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const uint16_t* w,
                           int64_t ldw, int nw, float* const* c, float alpha, bool acc);
// Writes n values of one stored row (widened, times scale) in the dot layout, zero-padded to a
// multiple of 32: its block b (values 32 b .. 32 b + 31) at dst + b * stride.
using DotRowPacker = void (*)(const void* src, DType dtype, float scale, int64_t n, int64_t stride,
                              float* dst);

// The other small-M kernel: bf16 weights stored [K, N] with n contiguous (the input-gradient chain of
// the backward: dy Down_e, dg Gate_e) are read in place as the micro-kernel's B panel, one row segment
// of up to kDirectCols columns per k, widened in registers (even and odd columns of each 32, put back
// in order once per tile):
//   c[i][0:nr] = (acc ? c[i][0:nr] : 0) + alpha * sum_k a[k * 6 + i] * w[k * ldw + 0:nr],  i < mr, nr <= 64.
// Segments are read whole (32 columns when nr <= 32, else 64): the driver pads the last block. It runs
// on short blocks of rows (kc = 32) across all column blocks, so that the rows' pages stay in the TLB:
// one segment per 4 KiB page and k would otherwise miss the TLB on every load. What it does besides,
// set by the driver in DirectRows:
// - copy_mode kWrite: each segment read is also written to `copy`, in a layout of the ISA's choosing
//   (x86: widened to f32, in their even/odd order; generic: widened, in column order). Several row tiles
//   read the same block one after the other; the first copies it, and the others (kRead: w and ldw
//   unused) read the contiguous copy, because stored rows 4 KiB apart fall into one L1 set and evict
//   each other, and, where the copy is widened, they need not widen again.
// - prefetch != null: the segments at prefetch + k * prefetch_ld (the same columns of the next block of
//   rows) are fetched into L2 at the steps of k that `slice` selects (each row tile its own phase).
constexpr int64_t kDirectCols = 64;
struct DirectRows {
  enum class Copy { kNone, kWrite, kRead };
  Copy copy_mode = Copy::kNone;
  float* copy = nullptr;  // kc * kDirectCols floats
  const uint16_t* prefetch = nullptr;
  int64_t prefetch_ld = 0;
  PrefetchSlice slice;
};
using DirectKernel = void (*)(int64_t kc, const float* a, const uint16_t* w, int64_t ldw, float* const* c,
                              int mr, int nr, float alpha, bool acc, const DirectRows& rows);

// The small-M path for a quantized weight stored [N, K] (every forward projection of a quantized base):
// each group of 4 stored rows is dequantized (QuantRowReader), a block of columns at a time, into an
// f32 buffer that stays in L1, and the token rows are multiplied against it there, so each weight is
// dequantized once per product whatever the token count, and no dequantized copy exceeds that buffer.
// F32DotKernel is DotKernel with f32 weights (w: 4 rows, ldw floats apart, readable for kc values) and the
// values of each block of 32 in column order, in A's layout as in the weights' (the even/odd order
// exists to widen bf16; F32DotRowPacker writes it this way):
//   c[i][j] = (acc ? c[i][j] : 0) + alpha * sum_{k < kc} A(i, k0 + k) * w[j * ldw + k],  i < m, j < nw <= 4.
using F32DotKernel = void (*)(int64_t k0, int64_t kc, const float* a, int64_t lda, int m, const float* w,
                              int64_t ldw, int nw, float* const* c, float alpha, bool acc);
// dst[0:n] = stored row r's values c .. c + n - 1 of a quantized weight (view coordinates), times mul:
// exactly QuantWeight::dequantize_row's values, vectorised.
using QuantRowReader = void (*)(const QuantWeight& w, int64_t r, int64_t c, int64_t n, float mul, float* dst);

// Rounds n f32 values to bf16 (nearest even, NaN kept quiet), as f32_to_bf16 does one by one.
using Bf16Rounder = void (*)(const float* src, uint16_t* dst, int64_t n);

// Products whose operands are both bf16 and unscaled (pair_operands below; e.g. token rows A [M, K] and
// a weight B stored [N, K], the forward's gate and up projections, or [K, N], the backward's
// dy Down_e, with dy bf16 where x is), on a CPU with AVX512_BF16: vdpbf16ps
// multiplies pairs of bf16 values (each product exact in f32) and adds both to an f32 accumulator,
// twice the work of an f32 FMA per instruction, without widening or an f32 copy of either operand.
// Operands are packed as pairs of consecutive k in one 32-bit word (k even: low half; an odd K's
// last pair has a zero high half), in the layouts of the f32 path with pairs for values:
//   PairKernel: c[i][0:nr] = (acc ? c[i][0:nr] : 0) + alpha * sum_{p < kp} a[p][i] . b[p][0:nr],  i < mr,
// with a[p * 6 + i] and b[p * 32 + j] (nr <= 32) the pairs p of A's row i and B's stored row j.
// PairPanelPacker packs one full panel (6 or 32 stored rows) of kc values per row:
// dst[p * width + j] = pair p of rows[j], p < (kc + 1) / 2. PairRowPacker packs a B stored [K, N]: two
// stored rows k and k + 1 (r1 null past an odd K: zero high halves) into the pair slice they fill of
// consecutive panels: dst[p * stride + j] = r0[p * width + j] | r1[p * width + j] << 16, zero past n.
// PairDotKernel is the dot kernel (DotKernel) for m <= 96 token rows stored one after the other, lda
// bf16 values apart and zero-padded to a multiple of 32, against nw <= 4 weight rows read in place from
// ldw apart (the 8 after them prefetched into L2); kc values, the last block of 32 read with a mask:
//   c[i][j] = (acc ? c[i][j] : 0) + alpha * sum_{k < kc} a[i * lda + k] * w[j * ldw + k].
// PairDirectKernel is the direct kernel (DirectKernel) for a B stored [K, N] with pairs: A one panel of
// mr <= 6 rows of pairs (a[p * 6 + i]), kc <= 32 values of B's stored rows read in place, up to
// kDirectCols columns (masked past nr), each two rows interleaved into pairs in registers; `rows` as
// for DirectKernel, the copy holding the interleaved pairs ((kc + 1) / 2 * kDirectCols words).
//   c[i][0:nr] = (acc ? c[i][0:nr] : 0) + alpha * sum_{k < kc} A(i, k) * w[k * ldw + 0:nr].
// Subnormal bf16 inputs and f32 results of vdpbf16ps count as zero (below 1.2e-38 in magnitude).
using PairKernel = void (*)(int64_t kp, const uint32_t* a, const uint32_t* b, float* const* c, int mr, int nr,
                            float alpha, bool acc);
using PairPanelPacker = void (*)(const uint16_t* const* rows, int64_t kc, uint32_t* dst);
using PairRowPacker = void (*)(const uint16_t* r0, const uint16_t* r1, int64_t n, int64_t width, int64_t stride,
                               uint32_t* dst);
using PairDotKernel = void (*)(int64_t kc, const uint16_t* a, int64_t lda, int m, const uint16_t* w, int64_t ldw,
                               int nw, float* const* c, float alpha, bool acc);
using PairDirectKernel = void (*)(int64_t kc, const uint32_t* a, const uint16_t* w, int64_t ldw, float* const* c,
                                  int mr, int nr, float alpha, bool acc, const DirectRows& rows);

// The quantized dot path with pairs (AVX512_BF16): bf16 token rows against a quantized weight stored
// [N, K] (the forward's projections of a quantized base with bf16 tokens) multiplied as bf16 pairs,
// exactly: each group of 4 weight rows is read as its codes (QuantWeight::code, all exact in bf16) into
// an L1 buffer, and vdpbf16ps multiplies them by the token values (each product exact in f32); the
// scales apply to the sums of each segment, and the driver adds the int4 mins times the token sums.
// QuantCodeReader: dst[0:n] = the bf16 codes of view row r, columns c .. c + n - 1 (c0 + c even).
// QuantPairDotKernel: m token rows (the driver passes up to 384; as PairDotKernel's a: lda values apart,
// zero-padded past the codes' end) against nw <= 4 rows of codes q (ldq apart, kc <= 32 kQuantSegments values, a multiple of
// 32, zero-padded), segment g being the values [g seg, (g + 1) seg) (seg a multiple of 32; seg >= kc: one
// segment), with QuantScales sc:
//   c[i][j] = (acc ? c[i][j] : 0) + alpha * sum_g (scale[j][g] * sum_{k in segment g} a[i * lda + k] q[j * ldq + k]
//                                                 + mins[j][g] * sums[i][g]).
using QuantCodeReader = void (*)(const QuantWeight& w, int64_t r, int64_t c, int64_t n, uint16_t* dst);
constexpr int64_t kQuantSegments = 16;
struct QuantScales {
  const float* scale = nullptr;  // [4][kQuantSegments]: weight row j's scale of segment g
  const float* mins = nullptr;   // [4][kQuantSegments] or null (no mins): weight row j's min of segment g
  const float* sums = nullptr;   // with mins: token row i's sum over segment g at sums[i * ld_sums + g],
  int64_t ld_sums = 0;           // kQuantSegments of them readable (zero past the last segment)
};
using QuantPairDotKernel = void (*)(int64_t kc, const uint16_t* a, int64_t lda, int m, const uint16_t* q,
                                    int64_t ldq, int nw, int64_t seg, const QuantScales& sc, float* const* c,
                                    float alpha, bool acc);
// QuantPairRowPacker: PairRowPacker (width 32) for a quantized weight stored [K, N] (the chain to dx with
// bf16 intermediates): view rows k and k + 1 (the second only if `two`) dequantized as
// QuantWeight::dequantize_row does (times mul0 / mul1), rounded to bf16 (nearest even) and interleaved:
// dst[p * stride + j] = bf16(w[k][c + 32 p + j]) | bf16(w[k + 1][c + 32 p + j]) << 16, zero past n.
using QuantPairRowPacker = void (*)(const QuantWeight& w, int64_t k, bool two, int64_t c, int64_t n, float mul0,
                                    float mul1, int64_t stride, uint32_t* dst);

struct Isa {
  const char* name;
  int nr;  // columns of the micro-kernel tile; its rows are always 6
  MicroKernel kernel;
  // Vectorised packing, each null where the ISA has none (the portable loops then pack): full panels
  // of nr stored rows (B side), full panels of 6 stored rows (A side), and stored rows of a
  // transposed operand.
  Bf16PanelPacker pack_bf16_panel;
  F32PanelPacker pack_f32_panel;
  Bf16PanelPacker pack_bf16_a_panel;
  F32PanelPacker pack_f32_a_panel;
  RowPanelPacker pack_row_panels;
  // The small-M kernels, each null where the ISA has none (that path's products are then packed): the
  // dot kernel with its row packer (both or neither), and the direct kernel.
  DotKernel dot_bf16;
  DotRowPacker pack_dot_row;
  DirectKernel direct_bf16;
  Bf16Rounder round_bf16;  // null: the portable loop of store_row (dtype.h)
  // The SiLU gating (activation.h), never null.
  SiluMul silu_mul;
  SiluMulGrad silu_mul_grad;
  // The attention kernels' softmax rows (activation.h), never null.
  RowMax row_max;
  ExpShift exp_shift;
  // Quantized weights (quant.h), never null: the row dequantizer every product reading one uses, and
  // the quantized dot path's kernel.
  QuantRowReader dequant_row;
  F32DotKernel dot_f32;
  // The bf16 pair path (PairKernel above), all null where the ISA has none (an initialiser may leave
  // them out): the micro-kernel, its packers of full B panels (nr rows), A panels (6 rows) and of a B
  // stored [K, N], the dot kernel and the direct kernel.
  PairKernel pair_kernel = nullptr;
  PairPanelPacker pack_pair_panel = nullptr;
  PairPanelPacker pack_pair_a_panel = nullptr;
  PairRowPacker pack_pair_rows = nullptr;
  PairDotKernel pair_dot = nullptr;
  PairDirectKernel pair_direct = nullptr;
  // The quantized pair path (QuantPairDotKernel above): both or neither.
  QuantCodeReader quant_codes = nullptr;
  QuantPairDotKernel quant_pair_dot = nullptr;
  // The quant_pairs path's packer of a quantized B, for nr = 32 (null: no quant_pairs path).
  QuantPairRowPacker quant_pair_rows = nullptr;
};

// The micro-kernel for this CPU, or the one named by KTJAX_ISA ("avx512_bf16", "avx512", "avx2",
// "generic") when set and supported: "avx512" is "avx512_bf16" without its pair path. A build without the
// x86 kernels (not x86-64, or KTJAX_X86_KERNELS off in CMake) has "generic" alone. Returns nullptr
// only when KTJAX_ISA names an ISA this CPU or build lacks, or an unknown one.
const Isa* select_isa();
// Comma-separated ISAs this CPU can run, best first.
const char* available_isas();

// Writes n f32 values into a buffer of either type, rounding to bf16 with the ISA's rounder if any.
void store_row(const Isa& isa, const float* src, void* dst, DType t, int64_t n);

// Floats of packing scratch one gemm() call needs (a fixed amount, independent of the shapes).
int64_t gemm_scratch_floats();

// C[M,N] = (accumulate ? C : 0) + alpha * op(A) op(B). K == 0 yields 0 (or leaves C when accumulating).
// A product with fewer columns than the micro-kernel's tile and more rows (LoRA's rank-r products) is
// computed as C^T = op(B)^T op(A)^T, whose few rows waste less of the tiles, and added into C.
void gemm(const Isa& isa, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
          const MatView& B, const OutView& C, bool accumulate, float* scratch, Work work);

// Whether a view can be an operand of the bf16 pair path on this ISA: bf16 and unscaled. gemm() takes the
// pair path when both operands can; its small-M pair kernels (dot, direct) besides need A not transposed
// and B not gathered, and other such products are packed as pairs (gemm_pairs).
bool pair_operands(const Isa& isa, const MatView& v);

// B [K, N] packed whole, for several products against it (the token rows of a weight gradient, one
// product per block of its rows): depth blocks of kc rows, block pc at data + pc * round_up(N, nr),
// each the panels of nr columns that gemm() packs per block. With `pairs`, the same in words of bf16
// pairs (PairKernel): blocks twice as deep in values, block pc at words + pc / 2 * round_up(N, nr).
// Built by pack_b, read by gemm_packed.
struct PackedB {
  const float* data = nullptr;
  int64_t K = 0, N = 0, kc = 0;
  bool pairs = false;
};

// Floats pack_b writes for B [K, N] (either way: a pair of values takes the room of one f32 value).
int64_t packed_b_floats(const Isa& isa, int64_t K, int64_t N);
// Packs B [K, N] (widened, row-gathered and scaled as its view says) into dst, packed_b_floats long;
// as bf16 pairs when `pairs` is asked for and B can be a pair operand (pair_operands).
PackedB pack_b(const Isa& isa, int64_t K, int64_t N, const MatView& B, bool pairs, float* dst);
// C[M,N] = (accumulate ? C : 0) + alpha * op(A) B, with B packed by pack_b; as gemm() otherwise. Each
// block of A is packed once, for all of B's columns. B packed as pairs needs an A that can be a pair
// operand (pair_operands; the caller checks).
void gemm_packed(const Isa& isa, int64_t M, float alpha, const MatView& A, const PackedB& B,
                 const OutView& C, bool accumulate, float* scratch, Work work);

}  // namespace ktjax
