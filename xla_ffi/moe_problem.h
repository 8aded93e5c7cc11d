// The inputs of one MoE expert call, checked and turned into GEMM operand views.
//
//   x [T, H]; topk_ids [T, K] s32; topk_weights [T, K] f32; gate, up [E, I, H]; down [E, H, I]
//   LoRA per projection p in {gate, up, down}: A [E, r_p, in_p], B [E, out_p, r_p]; r_p = 0 = absent.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "gemm.h"
#include "moe_contract.h"
#include "xla/ffi/api/ffi.h"

namespace ktjax {

namespace ffi = xla::ffi;

// Expert weights stacked over experts: expert e's stored [rows, cols] matrix starts at e*rows*cols;
// a quantized one (dtype kQuant) is `quant` for expert 0, its data and scales the strides' bytes apart.
struct Stacked {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0;
  QuantWeight quant;
  int64_t quant_data_stride = 0, quant_scales_stride = 0;  // bytes

  MatView expert(int64_t e) const {
    MatView v;
    v.dtype = dtype;
    v.ld = cols;
    if (dtype == DType::kQuant) {
      v.quant = quant;
      v.quant.data += e * quant_data_stride;
      v.quant.scales = static_cast<const char*>(quant.scales) + e * quant_scales_stride;
      return v;
    }
    v.data = static_cast<const char*>(data) + e * rows * cols * dtype_bytes(dtype);
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
  Intermediates intermediates = Intermediates::kF32;

  bool bf16_intermediates() const { return intermediates == Intermediates::kBF16; }
  bool quantized(int proj) const { return w[proj].dtype == DType::kQuant; }

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

// The FFI element type of a DType.
inline ffi::DataType ffi_dtype(DType d) { return d == DType::kBF16 ? ffi::DataType::BF16 : ffi::DataType::F32; }
// A buffer's dimensions as text, e.g. "[2, 3]".
std::string dims_str(ffi::AnyBuffer::Dimensions d);
// Float type of a buffer, or an error naming it.
ffi::Error float_dtype(const char* name, const ffi::AnyBuffer& b, DType* out);
// Error unless b has exactly the given dimensions; `doc` names them, e.g. "[E, I, H]".
ffi::Error expect_shape(const char* name, const ffi::AnyBuffer& b, std::initializer_list<int64_t> dims,
                        const char* doc);
// Error unless b is either the full shape (when `needed`) or empty (when not).
ffi::Error expect_output(const char* name, const ffi::AnyBuffer& b, bool needed,
                         std::initializer_list<int64_t> dims);

// Adds what parse_problem reads to an FFI binding, in the contract's order (moe_contract.h): the
// fixed arguments x, topk_ids, topk_weights, gate, up, down, the adapters' A and B, the scales of the
// quantized weights, and the attributes lora_scale, adapters, quant and intermediates.
template <typename Binding>
auto bind_problem(Binding b) {
  using B = ffi::AnyBuffer;
  return std::move(b).template Arg<B>().template Arg<B>().template Arg<B>()  // x, topk_ids, topk_weights
      .template Arg<B>().template Arg<B>().template Arg<B>()       // gate, up, down
      .RemainingArgs()                                             // A, B of each adapter
      .template Attr<float>("lora_scale")
      .template Attr<std::string_view>("adapters")
      .template Attr<std::string_view>("quant")
      .template Attr<std::string_view>("intermediates");
}

// Checks the arguments bind_problem binds and fills p.
ffi::Error parse_problem(const ffi::AnyBuffer& x, const ffi::AnyBuffer& ids, const ffi::AnyBuffer& weights,
                         const ffi::AnyBuffer& gate, const ffi::AnyBuffer& up, const ffi::AnyBuffer& down,
                         const ffi::RemainingArgs& more, float lora_scale, std::string_view adapters,
                         std::string_view quant, std::string_view intermediates, MoeProblem* p);

// Readies an output buffer before a kernel writes it:
// - asks Linux to back its 2 MiB-aligned interior with transparent huge pages (KTJAX_HUGE_PAGES=0
//   turns this off): XLA hands the custom calls fresh output buffers on every call, so without them
//   every 4 KiB page of a large weight gradient faults on its first write. Only a hint: where
//   transparent huge pages are off, or the buffer is small, nothing changes;
// - fills it with NaN when KTJAX_DEBUG_POISON=1, so a test sees any element a kernel forgot to write.
void prepare_output(ffi::AnyBuffer b);

}  // namespace ktjax
