// Kernel introspection: GEMM FLOPs done per kind of work, summed over the life of the process.
//
// These counters are the one piece of global state in the kernels besides XLA's pool. They exist so
// that tests can prove a frozen weight costs no gradient work and users can see where the time goes.
// Each GEMM adds its 2*M*N*K once, with a relaxed atomic add.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

namespace ktjax {

enum class Work : int {
  kForward = 0,    // forward projections (gate, up, down, LoRA A and B)
  kRecompute = 1,  // forward projections redone in backward (policy "recompute", LoRA A for grads)
  kInputGrad = 2,  // dx and the chain leading to it (d hidden, through down and LoRA B)
  kLoraGrad = 3,   // gradients of LoRA A and B
  kBaseGrad = 4,   // gradients of the base weights gate, up, down
  kAttention = 5,  // the attention kernels' products, forward and backward (attention.h)
  kCount = 6,
};

inline constexpr const char* kWorkNames[] = {"forward", "recompute", "input_grad", "lora_grad",
                                             "base_grad", "attention"};

// The ways gemm (gemm.h) computes a product, each counted in Stats::path_flops so that tests can force
// every one of them on every ISA (tests/test_kernel_paths.py lists a case for each name here).
enum class GemmPath : int {
  kPacked = 0,           // both operands packed per product, the ISA's f32 micro-kernel
  kDot = 1,              // few rows against bf16 weights stored [N, K], read in place (DotKernel)
  kDirect = 2,           // few rows against bf16 weights stored [K, N], read in place (DirectKernel)
  kPairs = 3,            // two bf16 operands packed as pairs, the pair micro-kernel (vdpbf16ps)
  kPairDot = 4,          // the pair path's dot kernel
  kPairDirect = 5,       // the pair path's direct kernel
  kTransposed = 6,       // a product narrower than the tile computed as C^T (then one of the above)
  kPackedOnce = 7,       // B packed once for several products (gemm_packed), f32
  kPackedOncePairs = 8,  // the same with B packed as bf16 pairs
  kQuantDot = 9,         // few rows against a quantized weight stored [N, K], dequantized in L1 (F32DotKernel)
  kQuantPairDot = 10,    // the same with bf16 token rows, multiplied as bf16 pairs (QuantPairDotKernel)
  kQuantPairs = 11,      // bf16 rows against a quantized weight stored [K, N] rounded to bf16 pairs (gemm_pairs)
  kCount = 12,
};

inline constexpr const char* kGemmPathNames[] = {"packed",     "dot",         "direct",
                                                 "pairs",      "pair_dot",    "pair_direct",
                                                 "transposed", "packed_once", "packed_once_pairs",
                                                 "quant_dot",  "quant_pair_dot", "quant_pairs"};

struct Stats {
  std::array<std::atomic<int64_t>, static_cast<int>(Work::kCount)> flops{};
  std::atomic<int64_t> forward_calls{0};
  std::atomic<int64_t> backward_calls{0};
  std::atomic<int64_t> small_batch_flops{0};  // the part done on the small-batch paths, dot and direct (gemm.h)
  std::atomic<int64_t> packed_once_flops{0};  // the part done against a B packed once (gemm_packed)
  std::atomic<int64_t> bf16_pair_flops{0};    // the part done on the bf16 pair path (vdpbf16ps, gemm.h)
  std::array<std::atomic<int64_t>, static_cast<int>(GemmPath::kCount)> path_flops{};
};

Stats& stats();

inline void add_flops(Work w, int64_t flops) {
  stats().flops[static_cast<int>(w)].fetch_add(flops, std::memory_order_relaxed);
}

inline void add_path_flops(GemmPath p, int64_t flops) {
  stats().path_flops[static_cast<int>(p)].fetch_add(flops, std::memory_order_relaxed);
}

}  // namespace ktjax
