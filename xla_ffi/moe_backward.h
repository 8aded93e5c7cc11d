// FFI handler symbol of the expert backward (registered as "ktjax_moe_backward").
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ktjax {

// Bits of the backward's `needs` attribute: which gradients to compute. Mirrored in ktjax/ops/moe_experts.py.
enum Need : int64_t {
  kNeedX = 1 << 0,
  kNeedWeights = 1 << 1,
  kNeedGate = 1 << 2,
  kNeedUp = 1 << 3,
  kNeedDown = 1 << 4,
  kNeedLoraGateA = 1 << 5,
  kNeedLoraGateB = 1 << 6,
  kNeedLoraUpA = 1 << 7,
  kNeedLoraUpB = 1 << 8,
  kNeedLoraDownA = 1 << 9,
  kNeedLoraDownB = 1 << 10,
  kNeedAll = (1 << 11) - 1,
};

}  // namespace ktjax

XLA_FFI_DECLARE_HANDLER_SYMBOL(KtjaxMoeBackward);
