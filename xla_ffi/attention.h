// Flash attention on the CPU: causal softmax attention over packed sequences, by tiles of queries and
// keys with an online softmax, forward and backward (ktjax/ops/attention.py, backend "cpu"):
//   out[b, s, n] = sum_t p[b, n, s, t] v[b, t, g(n)],
//   p[b, n, s, :] = softmax over the visible t of scale * q[b, s, n] . k[b, t, g(n)],
// visible(s, t): t <= s, segment_ids[b, t] == segment_ids[b, s] > 0, and with window > 0, s - t < window.
// Query heads share key/value heads in groups (g(n) = n / (N / G)); Dk may differ from Dv.
//
// Nothing of size S x S exists: a work item holds one [block, block] f32 tile of scores at a time. Tiles
// that no query of theirs can see (above the diagonal, before the window, or with no segment in common)
// are skipped, and tiles that every query sees whole are not masked. The products run on the GEMM driver
// (gemm.h): with bf16 inputs the probabilities and score gradients are rounded to bf16, so that every
// product multiplies two bf16 operands (the pair path where the CPU has AVX512_BF16), as flash attention
// does on accelerators; with f32 inputs everything is f32.
//
// "ktjax_attention_forward": q [B, S, N, Dk], k [B, S, G, Dk], v [B, S, G, Dv] (all bf16 or all f32),
// segment_ids [B, S] int32; attributes scale (f32), window (i64, 0: none), block (i64: the tile's rows
// and columns) -> out [B, S, N, Dv] f32 and lse [B, N, S] f32, the log of each row's sum of exp(scores).
// A query that sees nothing (segment 0) gets out 0 and lse +inf. Work items: (b, n, query block).
//
// "ktjax_attention_backward": q, k, v, segment_ids, lse, dout [B, S, N, Dv] (q's dtype), delta [B, N, S]
// f32 (sum over Dv of dout * out), the same attributes -> dq, dk, dv f32 in q's, k's and v's shapes.
// One pass: the tiles of each key block j against the query blocks that see it give dk_j and dv_j,
// accumulated in place, and add into dq. Work items: (b, g, chunk), a chunk being every C-th key block,
// so that dk and dv are each written by one item; C > 1 (only when B G items are fewer than twice the
// workers) gives each chunk its own f32 copy of dq, summed at the end.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(KtjaxAttentionForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KtjaxAttentionBackward);
