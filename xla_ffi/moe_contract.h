// The expert op's contract between the FFI handlers and ktjax/ops/moe_experts.py. Python does not
// mirror it: it reads these lists from the extension (module.cc: moe_contract()) and builds its calls
// from them by name, so a change here that Python does not follow fails at the first call.
//
//   ktjax_moe_forward(x, topk_ids, topk_weights, gate, up, down, adapters..., scales...)
//       attributes lora_scale: f32, adapters: str, quant: str, intermediates: str, save_preact: bool
//       results    y, g_saved, u_saved
//   ktjax_moe_backward(dy, g_saved, u_saved, x, topk_ids, topk_weights, gate, up, down, adapters...,
//                      scales...)
//       attributes lora_scale: f32, adapters: str, quant: str, intermediates: str, needs: s64
//       results    the gradients of kGradNames, in that order (empty where not needed)
//
// `adapters` names the projections that carry a LoRA adapter, comma-separated in projection order
// (e.g. "gate,down", or ""); their A and B follow the fixed arguments in that order. `quant` names the
// projections whose base is quantized (quant.h), in projection order: "gate:int8", "up:int4:G",
// "down:fp8:B0:B1"; such a projection's argument is its data, and its scales follow the adapters.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace ktjax {

enum Proj : int { kGate = 0, kUp = 1, kDown = 2 };
inline constexpr const char* kProjNames[] = {"gate", "up", "down"};

// The fixed arguments of both handlers (the backward's come after dy, g_saved, u_saved).
inline constexpr const char* kProblemArgNames[] = {"x", "topk_ids", "topk_weights", "gate", "up", "down"};
inline constexpr const char* kBackwardLeadArgNames[] = {"dy", "g_saved", "u_saved"};
inline constexpr const char* kForwardResultNames[] = {"y", "g_saved", "u_saved"};

// The differentiable inputs: bit i of the backward's `needs` asks for the gradient of kGradNames[i],
// which is the backward's result i.
inline constexpr const char* kGradNames[] = {"x",           "topk_weights", "gate",        "up",
                                             "down",        "lora_gate_a",  "lora_gate_b", "lora_up_a",
                                             "lora_up_b",   "lora_down_a",  "lora_down_b"};
inline constexpr int kNumGrads = sizeof(kGradNames) / sizeof(kGradNames[0]);
enum Need : int64_t {
  kNeedX = 1 << 0,
  kNeedWeights = 1 << 1,
  kNeedGate = 1 << 2,  // kNeedGate << j: the base weight of projection j
  kNeedLoraGateA = 1 << 5,  // kNeedLoraGateA << (2 j + b): A (b = 0) or B (b = 1) of projection j
  kNeedAll = (int64_t{1} << kNumGrads) - 1,
};
inline constexpr int64_t need_base(int proj) { return int64_t{kNeedGate} << proj; }
inline constexpr int64_t need_lora(int proj, int b) { return int64_t{kNeedLoraGateA} << (2 * proj + b); }

// The precision of the intermediates of the expert chain (ops/moe_experts.py, `intermediates`).
enum class Intermediates { kF32, kBF16 };
inline constexpr const char* kIntermediatesNames[] = {"f32", "bf16"};
inline constexpr const char* kQuantFormatNames[] = {"int8", "int4", "fp8"};

// Parses the `intermediates` attribute; false for an unknown name.
inline bool parse_intermediates(std::string_view name, Intermediates* out) {
  for (int i = 0; i < 2; ++i) {
    if (name == kIntermediatesNames[i]) {
      *out = static_cast<Intermediates>(i);
      return true;
    }
  }
  return false;
}

}  // namespace ktjax
