// What every phase of an expert kernel call shares: the pool, the ISA, per-worker scratch, and the
// (expert, tile) work lists the phases are parallelised over.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "moe_problem.h"
#include "routing.h"
#include "scratch.h"
#include "thread_pool.h"

namespace ktjax {

inline constexpr int64_t kTile = 128;  // rows per product in the weight-gradient phases
inline constexpr int64_t kTileBlockFloats = 128 * 1024;  // 512 KiB: half of a 1 MiB L2 (token_blocks)
// Per-worker room for a packed B operand reused across products (KernelContext::reuse_b): 12 MiB, i.e.
// 1536 token rows of H = 2048 in f32. An expert with more tokens takes the unpacked path.
inline constexpr int64_t kReuseFloats = int64_t{3} << 20;

inline int64_t num_tiles(int64_t n, int64_t width = kTile) { return (n + width - 1) / width; }

struct KernelContext {
  ffi::ThreadPool& pool;
  const Isa& isa;
  int workers;
  int64_t tile_floats;  // per-worker f32 tile for outputs stored in bf16
  Scratch scratch;      // every buffer of this call, borrowed from the pool (scratch.h)
  float* gemm_space;    // workers * gemm_scratch_floats()
  float* tile_space;    // workers * tile_floats
  float* reuse_space = nullptr;  // workers * reuse_floats (reserve_reuse)
  int64_t reuse_floats = 0;

  KernelContext(ffi::ThreadPool& p, const Isa& i, int64_t tile_floats_per_worker)
      : pool(p), isa(i), workers(num_workers(p)), tile_floats(tile_floats_per_worker),
        gemm_space(scratch.floats(workers * gemm_scratch_floats())),
        tile_space(scratch.floats(workers * tile_floats_per_worker)) {}

  // n floats of scratch for this call (uninitialised; see Scratch::floats).
  float* alloc(int64_t n) { return scratch.floats(n); }
  // n bf16 values of scratch for this call (uninitialised).
  uint16_t* alloc_bf16(int64_t n) { return reinterpret_cast<uint16_t*>(scratch.floats((n + 1) / 2)); }

  // Column blocks of `width` covering `cols`, a remainder narrower than 32 columns joined to the last
  // block: a product narrower than the kernels' tile is computed transposed (gemm.cc, few_columns),
  // with its sums in another order, so such a block would make results depend on the worker count.
  struct ColumnBlocks {
    int64_t cols, width;
    int64_t count() const {
      const int64_t n = num_tiles(cols, width);
      return n > 1 && cols - (n - 1) * width < 32 ? n - 1 : n;
    }
    int64_t start(int64_t b) const { return b * width; }
    int64_t size(int64_t b) const { return b + 1 == count() ? cols - b * width : width; }
  };

  // The column blocks, one per work item, of a [rows, cols] f32 block that each item accumulates over
  // all experts (the forward's down projection, dx): 4 items per worker, each packing its token rows
  // once for many columns, or wider, down to one item per worker, while an item's block stays within
  // kTileBlockFloats (half of L2). Few rows (small batches) thus read each weight row in long runs,
  // which the hardware prefetchers follow. Widths are multiples of 32 (the kernels' tile width), so
  // with many workers narrower than kTile: every worker gets items, at the price of packing the token
  // rows once per narrower item.
  ColumnBlocks token_blocks(int64_t cols, int64_t rows) const {
    const int64_t balanced = block_width(cols, 4 * static_cast<int64_t>(workers));
    const int64_t fits = kTileBlockFloats / std::max<int64_t>(rows, 1) / 32 * 32;
    return {cols, std::max(balanced, std::min(fits, block_width(cols, workers)))};
  }

  // Width of `parts` column blocks covering `cols`: a multiple of 32 (the kernels' tile width), at
  // most cols.
  static int64_t block_width(int64_t cols, int64_t parts) {
    return std::min(cols, ((cols + parts - 1) / parts + 31) / 32 * 32);
  }

  // A work item: units [start, start + count) of expert e's work (columns, or blocks of rows).
  struct ExpertSpan {
    int32_t e;
    int64_t start, count;
  };

  // How many work items expert e's work is split into: in proportion to its share of the slots,
  // aiming at 4 items per worker overall, between 1 and max_parts.
  int64_t expert_parts(const Routing& r, int64_t e, int64_t max_parts) const {
    const int64_t S = std::max<int64_t>(r.kept(), 1);
    return std::clamp<int64_t>((r.count(e) * 4 * workers + S - 1) / S, 1, max_parts);
  }

  // Column blocks of every busy expert's [tokens, cols] output as work items of about equal cost
  // (blocks of 32 columns or more, see expert_parts). With even routing over many experts an item
  // is a whole expert (its token rows packed once); a dominant expert is split so that every worker
  // shares it.
  std::vector<ExpertSpan> balanced_blocks(const Routing& r, int64_t E, int64_t cols) const {
    std::vector<ExpertSpan> items;
    for (int64_t e = 0; e < E; ++e) {
      if (r.count(e) == 0) continue;
      const ColumnBlocks blocks{cols, block_width(cols, expert_parts(r, e, (cols + 31) / 32))};
      for (int64_t b = 0; b < blocks.count(); ++b) {
        items.push_back({static_cast<int32_t>(e), blocks.start(b), blocks.size(b)});
      }
    }
    return items;
  }

  // Groups of the row blocks of every expert's weight gradient (`blocks` per expert) as work items of
  // about equal cost: one item per expert (its token rows packed once for all its blocks, see
  // reuse_b) unless it holds more than about a quarter of a worker's share of the slots (see
  // expert_parts). Experts without tokens are included: their zero gradients are written too.
  std::vector<ExpertSpan> expert_block_groups(const Routing& r, int64_t E, int64_t blocks) const {
    std::vector<ExpertSpan> items;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t parts = expert_parts(r, e, blocks), per = (blocks + parts - 1) / parts;
      for (int64_t b0 = 0; b0 < blocks; b0 += per) {
        items.push_back({static_cast<int32_t>(e), b0, std::min(per, blocks - b0)});
      }
    }
    return items;
  }

  // The B operand [K, N] of several products in a row, packed once (PackedB) when the worker's reuse
  // buffer holds it, else left as a view that each product packs itself. Packed as bf16 pairs where
  // `pairs` asks for it and B can be a pair operand: for products whose A can be one too.
  struct ReusedB {
    MatView view;
    int64_t K, N;
    PackedB packed;  // packed.data == nullptr: not packed
  };
  // Sets aside each worker's reuse buffer: room for the largest B [r.count(e), N] that fits in
  // kReuseFloats. Call before the phase's run().
  void reserve_reuse(const Routing& r, int64_t E, int64_t N) {
    int64_t most = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t f = packed_b_floats(isa, r.count(e), N);
      if (f <= kReuseFloats) most = std::max(most, f);
    }
    if (most > reuse_floats) {
      reuse_space = alloc(workers * most);
      reuse_floats = most;
    }
  }
  ReusedB reuse_b(int worker, int64_t K, int64_t N, const MatView& B, bool pairs) {
    ReusedB out{B, K, N, PackedB{}};
    if (packed_b_floats(isa, K, N) <= reuse_floats) {
      out.packed = pack_b(isa, K, N, B, pairs, reuse_space + worker * reuse_floats);
    }
    return out;
  }

  float* gemm_scratch(int worker) { return gemm_space + worker * gemm_scratch_floats(); }
  float* tile(int worker) { return tile_space + worker * tile_floats; }

  template <typename F>
  void run(int64_t n, const F& fn) {
    parallel_for(pool, workers, n, fn);
  }

  void gemm(int worker, int64_t M, int64_t N, int64_t K, float alpha, const MatView& A,
            const MatView& B, const OutView& C, bool accumulate, Work work) {
    ktjax::gemm(isa, M, N, K, alpha, A, B, C, accumulate, gemm_scratch(worker), work);
  }
  // C[M, B.N] = (accumulate ? C : 0) + alpha * op(A) B. B packed as pairs against an A that cannot be
  // a pair operand is read through its view instead.
  void gemm(int worker, int64_t M, float alpha, const MatView& A, const ReusedB& B, const OutView& C,
            bool accumulate, Work work) {
    if (B.packed.data != nullptr && (!B.packed.pairs || pair_operands(isa, A))) {
      gemm_packed(isa, M, alpha, A, B.packed, C, accumulate, gemm_scratch(worker), work);
    } else {
      ktjax::gemm(isa, M, B.N, B.K, alpha, A, B.view, C, accumulate, gemm_scratch(worker), work);
    }
  }
};

inline std::vector<int32_t> busy_experts(const Routing& r, int64_t E) {
  std::vector<int32_t> out;
  for (int64_t e = 0; e < E; ++e) {
    if (r.count(e) > 0) out.push_back(static_cast<int32_t>(e));
  }
  return out;
}

// f32 matrix [rows, ld] as a GEMM operand / output.
inline MatView f32_view(const float* data, int64_t ld) {
  MatView v;
  v.data = data;
  v.ld = ld;
  return v;
}
inline OutView f32_out(float* data, int64_t ld) { return OutView{data, ld, nullptr}; }
// bf16 matrix [rows, ld] as a GEMM operand.
inline MatView bf16_view(const uint16_t* data, int64_t ld) {
  MatView v;
  v.data = data;
  v.dtype = DType::kBF16;
  v.ld = ld;
  return v;
}

// The bf16 copy of a scaled intermediate (bf16 intermediates: w h): dst[0:n] = bf16(scale * src[0:n]);
// tmp holds n floats.
void store_scaled_bf16(const Isa& isa, const float* src, float scale, uint16_t* dst, int64_t n, float* tmp);

// g, u: [S, I] f32 pre-activations in sorted slot order; h = silu(g) * u [S, I] when h != nullptr, and
// hw = bf16(w h) [S, I] (w: the slot's router weight) when hw != nullptr, through the worker's tile
// (2 * I floats) while g and u are in cache. Computes the gate and up projections (with LoRA) of every
// kept slot.
void compute_preactivations(KernelContext& ctx, const MoeProblem& p, const Routing& r, float* g,
                            float* u, float* h, uint16_t* hw, Work work);

// The micro-kernel for this call (see select_isa), or an error naming KTJAX_ISA.
ffi::Error pick_isa(const Isa** isa);

// A [T, H] f32 accumulator for a per-token output (y, dx): the output buffer itself when it is f32,
// else scratch that finish() rounds into the bf16 output.
class TokenAccumulator {
 public:
  TokenAccumulator(KernelContext& ctx, ffi::AnyBuffer& out, DType dtype, int64_t T, int64_t H);
  float* data() { return acc_; }
  void finish(KernelContext& ctx);

 private:
  ffi::AnyBuffer& out_;
  DType dtype_;
  int64_t T_, H_;
  float* acc_;
};

// out [T, H] (y, dx; f32 or bf16) = the sum over the busy experts of what add_expert(worker, e, h0, nh,
// o) accumulates into o: columns [h0, h0 + nh) of the rows of expert e's tokens (an OutView whose rows
// are the expert's slice of Routing::token). A work item owns a block of columns of every token
// (token_blocks), so the scatter-add needs no atomics, and the experts are added in one fixed order.
template <typename AddExpert>
void accumulate_per_token(KernelContext& ctx, ffi::AnyBuffer& out, DType dtype, int64_t T, int64_t H,
                          const Routing& r, const std::vector<int32_t>& experts, const AddExpert& add_expert) {
  TokenAccumulator acc(ctx, out, dtype, T, H);
  float* sum = acc.data();
  const auto blocks = ctx.token_blocks(H, T);
  ctx.run(blocks.count(), [&](int64_t b, int worker) {
    const int64_t h0 = blocks.start(b), nh = blocks.size(b);
    for (int64_t t = 0; t < T; ++t) std::fill_n(sum + t * H + h0, nh, 0.0f);
    for (int32_t e : experts) {
      add_expert(worker, e, h0, nh, OutView{sum, H, r.token.data() + r.offsets[e]}.skip_cols(h0));
    }
  });
  acc.finish(ctx);
}

// Writes a [rows, cols] f32 result into a stacked output of either dtype, expert e, starting at row r0.
void store_expert_rows(const Isa& isa, const float* src, void* dst, DType dtype, int64_t e,
                       int64_t rows_per_expert, int64_t cols, int64_t r0, int64_t rows);

}  // namespace ktjax
