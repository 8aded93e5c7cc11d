// Element types the expert kernels read and write, and bf16 <-> f32 conversion.
//
// XLA hands bf16 buffers over as raw 16-bit patterns; every kernel computes in f32, so bf16 values are
// widened exactly on load and rounded to nearest-even once, when a result is stored.
#pragma once

#include <cstdint>
#include <cstring>

namespace ktjax {

// kQuant: a quantized weight (quant.h), read only through MatView::quant.
enum class DType : uint8_t { kF32, kBF16, kQuant };

inline int64_t dtype_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }

inline float bf16_to_f32(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// One stored value as f32, either dtype (for templated packers).
inline float widen1(uint16_t v) { return bf16_to_f32(v); }
inline float widen1(float v) { return v; }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

// Pair p of a row of n bf16 values as one 32-bit word (the bf16 pair path, gemm.h): values 2p (low
// half) and 2p + 1 (high half, zero past n).
inline uint32_t bf16_pair(const uint16_t* row, int64_t p, int64_t n) {
  const uint32_t lo = row[2 * p], hi = 2 * p + 1 < n ? row[2 * p + 1] : 0;
  return lo | hi << 16;
}

// Reads element i of a buffer of either type as f32.
inline float load_f32(const void* data, DType t, int64_t i) {
  return t == DType::kF32 ? static_cast<const float*>(data)[i]
                          : bf16_to_f32(static_cast<const uint16_t*>(data)[i]);
}

// Writes n f32 values into a buffer of either type.
inline void store_row(const float* src, void* dst, DType t, int64_t n) {
  if (t == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    auto* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  }
}

}  // namespace ktjax
