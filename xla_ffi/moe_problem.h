// The inputs of one MoE expert call, checked and turned into GEMM operand views.
//
//   x [T, H]; topk_ids [T, K] s32; topk_weights [T, K] f32; gate, up [E, I, H]; down [E, H, I]
//   LoRA per projection p in {gate, up, down}: A [E, r_p, in_p], B [E, out_p, r_p]; r_p = 0 = absent.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "gemm.h"
#include "xla/ffi/api/ffi.h"

namespace ktjax {

namespace ffi = xla::ffi;

enum Proj : int { kGate = 0, kUp = 1, kDown = 2 };
inline constexpr const char* kProjNames[] = {"gate", "up", "down"};

// Expert weights stacked over experts: expert e's stored [rows, cols] matrix starts at e*rows*cols.
struct Stacked {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0;

  MatView expert(int64_t e) const {
    MatView v;
    v.data = static_cast<const char*>(data) + e * rows * cols * dtype_bytes(dtype);
    v.dtype = dtype;
    v.ld = cols;
    return v;
  }
};

struct Lora {
  Stacked A;  // [E, r, in]
  Stacked B;  // [E, out, r]
  int64_t rank = 0;
};

struct MoeProblem {
  int64_t T = 0, K = 0, E = 0, H = 0, I = 0;
  const void* x = nullptr;
  DType x_dtype = DType::kF32;
  const int32_t* ids = nullptr;
  const float* weights = nullptr;
  Stacked w[3];  // gate [E, I, H], up [E, I, H], down [E, H, I]
  Lora lora[3];
  float lora_scale = 1.0f;

  // x rows of the tokens routed to one expert: rows = the expert's slice of Routing::token.
  MatView x_rows(const int32_t* token_rows) const {
    MatView v;
    v.data = x;
    v.dtype = x_dtype;
    v.ld = H;
    v.rows = token_rows;
    return v;
  }
  int64_t max_rank() const;
};

// Float type of a buffer, or an error naming it.
ffi::Error float_dtype(const char* name, const ffi::AnyBuffer& b, DType* out);
// Error unless b has exactly the given dimensions; `doc` names them, e.g. "[E, I, H]".
ffi::Error expect_shape(const char* name, const ffi::AnyBuffer& b, std::initializer_list<int64_t> dims,
                        const char* doc);
// Error unless b is either the full shape (when `needed`) or empty (when not).
ffi::Error expect_output(const char* name, const ffi::AnyBuffer& b, bool needed,
                         std::initializer_list<int64_t> dims);

// Adds the 12 buffers parse_problem reads to an FFI binding, in its order: x, topk_ids, topk_weights,
// gate, up, down, then A and B of the gate, up and down adapters.
template <typename Binding>
auto bind_problem(Binding b) {
  using B = ffi::AnyBuffer;
  return std::move(b).template Arg<B>().template Arg<B>().template Arg<B>()  // x, topk_ids, topk_weights
      .template Arg<B>().template Arg<B>().template Arg<B>()       // gate, up, down
      .template Arg<B>().template Arg<B>()                         // LoRA gate A, B
      .template Arg<B>().template Arg<B>()                         // LoRA up A, B
      .template Arg<B>().template Arg<B>();                        // LoRA down A, B
}

ffi::Error parse_problem(const ffi::AnyBuffer& x, const ffi::AnyBuffer& ids, const ffi::AnyBuffer& weights,
                         const ffi::AnyBuffer& gate, const ffi::AnyBuffer& up, const ffi::AnyBuffer& down,
                         const ffi::AnyBuffer* lora_ab /* 6: A,B of gate, up, down */, float lora_scale,
                         MoeProblem* p);

// Readies an output buffer before a kernel writes it:
// - asks Linux to back its 2 MiB-aligned interior with transparent huge pages (KTJAX_HUGE_PAGES=0
//   turns this off). XLA hands the custom calls fresh output buffers on every call (glibc maps large
//   ones anew), so every 4 KiB page faulted on its first write: 147K faults per S1 full-mode step for
//   its 600 MB of bf16 weight gradients, ~27% of the step's samples in fault handling and zeroing.
//   With huge pages it takes ~2K faults. Only a hint: where transparent huge pages are off, or the
//   buffer is small, nothing changes;
// - fills it with NaN when KTJAX_DEBUG_POISON=1, so a test sees any element a kernel forgot to write.
void prepare_output(ffi::AnyBuffer b);

}  // namespace ktjax
