// Quantized frozen expert weights (ktjax/quant): how one expert's [rows, cols] weight (layout [out, in],
// as Hugging Face stores it) is stored, and its values dequantized to f32 where the GEMM driver reads
// them (packing), so that no dequantized copy of a weight exists outside a packed panel.
//
//   int8  data [rows, cols] int8; scales [rows] f32:                   w[r, c] = q * scale[r]
//   int4  data [rows, ceil(cols / 2)] uint8, column 2j in the low nibble, 2j + 1 in the high one;
//         scales [rows, ceil(cols / G), 2] bf16 (scale, min) per group of G columns:
//                                                                     w[r, c] = q * scale + min, q in 0..15
//   fp8   data [rows, cols] float8_e4m3fn; scales [ceil(rows / B0), ceil(cols / B1)] f32 per block of
//         B0 x B1 (the last blocks ragged), as DeepSeek-V3's checkpoints store weight_scale_inv:
//                                                                     w[r, c] = e4m3(q) * scale[r / B0, c / B1]
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dtype.h"

namespace ktjax {

enum class QuantFormat : uint8_t { kInt8, kInt4, kFp8 };


// f32 value of an e4m3fn byte (sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities,
// 0x7f and 0xff are NaN), exact.
inline float fp8_e4m3_to_f32(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80) << 24;
  const uint32_t exp = (b >> 3) & 0xf, man = b & 0x7;
  uint32_t bits;
  if (exp == 0xf && man == 0x7) {
    bits = sign | 0x7fc00000u;  // NaN
  } else if (exp != 0) {
    bits = sign | (exp + 120) << 23 | man << 20;  // bias 7 -> 127
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: man * 2^-9
    float f = static_cast<float>(man) * (1.0f / 512.0f);
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The 256 e4m3fn values, indexed by byte (built once, read-only).
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) value[b] = fp8_e4m3_to_f32(static_cast<uint8_t>(b));
  }
};

// One expert's quantized weight, seen from stored row r0 and column c0 on (views skip rows and columns
// by moving r0 / c0: an int4 row cannot be cut at an odd column by moving a pointer).
struct QuantWeight {
  QuantFormat format = QuantFormat::kInt8;
  const uint8_t* data = nullptr;   // this expert's data
  const void* scales = nullptr;    // this expert's scales: f32 (int8, fp8) or bf16 pairs (int4)
  int64_t rows = 0, cols = 0;     // the whole expert weight
  int64_t group = 0;              // int4: G columns per scale; fp8: B0 rows per block
  int64_t block_cols = 0;         // fp8: B1 columns per block
  int64_t r0 = 0, c0 = 0;

  int64_t data_ld() const { return format == QuantFormat::kInt4 ? (cols + 1) / 2 : cols; }
  // Bytes of one stored scale value: int4's (scale, min) pairs are bf16, the others' scales f32.
  int64_t scale_bytes() const { return format == QuantFormat::kInt4 ? 2 : 4; }
  const float* f32_scales() const { return static_cast<const float*>(scales); }
  // int4: (scale, min) of stored row r's group g, exact in f32.
  void int4_pair(int64_t r, int64_t g, float* scale, float* min) const {
    const uint16_t* p = static_cast<const uint16_t*>(scales) + (r * ((cols + group - 1) / group) + g) * 2;
    *scale = bf16_to_f32(p[0]);
    *min = bf16_to_f32(p[1]);
  }
  // The bytes that hold values c .. c + n - 1 of stored row r (view coordinates): from row_bytes(r, c), at
  // most span_bytes(n) of them.
  const uint8_t* row_bytes(int64_t r, int64_t c) const {
    const int64_t col = c0 + c;
    return data + (r0 + r) * data_ld() + (format == QuantFormat::kInt4 ? col / 2 : col);
  }
  int64_t span_bytes(int64_t n) const { return format == QuantFormat::kInt4 ? n / 2 + 1 : n; }

  // The same values as codes times segment scales, for the kernels that multiply codes (the quantized
  // pair path, gemm.h): w[r, c] = code(r, c) * scale + min, with one (scale, min) per segment of
  // segment_cols() stored columns (segment g: stored columns [g S, (g + 1) S); the whole row for int8,
  // whose segment_cols() is 0). Every code is exact in bf16: int8's -128..127, int4's 0..15 and every
  // e4m3 value (3 mantissa bits, exponents within bf16's).
  int64_t segment_cols() const {
    return format == QuantFormat::kInt8 ? 0 : format == QuantFormat::kInt4 ? group : block_cols;
  }
  // Code of w[r, c] (view coordinates).
  float code(int64_t r, int64_t c) const {
    const uint8_t* b = row_bytes(r, c);
    switch (format) {
      case QuantFormat::kInt8: return static_cast<float>(static_cast<int8_t>(*b));
      case QuantFormat::kInt4: return static_cast<float>((c0 + c) % 2 == 0 ? *b & 0xf : *b >> 4);
      case QuantFormat::kFp8: return fp8_e4m3_to_f32(*b);
    }
    return 0.0f;
  }
  // Scales and mins of view row r's segments g0 .. g0 + count - 1 (g0 = 0, count = 1 for int8), times mul.
  void segment_scales(int64_t r, int64_t g0, int64_t count, float mul, float* scale, float* min) const {
    r += r0;
    switch (format) {
      case QuantFormat::kInt8:
        scale[0] = f32_scales()[r] * mul;
        min[0] = 0.0f;
        return;
      case QuantFormat::kInt4: {
        for (int64_t g = 0; g < count; ++g) {
          int4_pair(r, g0 + g, scale + g, min + g);
          scale[g] *= mul;
          min[g] *= mul;
        }
        return;
      }
      case QuantFormat::kFp8: {
        const float* s = f32_scales() + r / group * ((cols + block_cols - 1) / block_cols) + g0;
        for (int64_t g = 0; g < count; ++g) {
          scale[g] = s[g] * mul;
          min[g] = 0.0f;
        }
        return;
      }
    }
  }

  // dst[0:n] = w[r, c .. c + n) (view coordinates: stored row r0 + r, column c0 + c) times `mul`.
  void dequantize_row(int64_t r, int64_t c, int64_t n, float mul, float* dst) const {
    r += r0;
    c += c0;
    const uint8_t* row = data + r * data_ld();
    switch (format) {
      case QuantFormat::kInt8: {
        const float s = f32_scales()[r] * mul;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(static_cast<int8_t>(row[c + j])) * s;
        return;
      }
      case QuantFormat::kInt4: {  // group by group: one (scale, min) pair, then bytes two columns at a time
        for (int64_t j = 0; j < n;) {
          const int64_t col = c + j, g = col / group;
          const int64_t len = std::min(n - j, (g + 1) * group - col);
          float s, m;
          int4_pair(r, g, &s, &m);
          float* out = dst + j;
          int64_t k = 0;
          if (col & 1) {  // an odd first column: its high nibble alone
            out[0] = (static_cast<float>(row[col / 2] >> 4) * s + m) * mul;
            k = 1;
          }
          const uint8_t* bytes = row + (col + k) / 2;
          const int64_t pairs = (len - k) / 2;
          for (int64_t b = 0; b < pairs; ++b) {
            out[k + 2 * b] = (static_cast<float>(bytes[b] & 0xf) * s + m) * mul;
            out[k + 2 * b + 1] = (static_cast<float>(bytes[b] >> 4) * s + m) * mul;
          }
          if (k + 2 * pairs < len) out[len - 1] = (static_cast<float>(bytes[pairs] & 0xf) * s + m) * mul;
          j += len;
        }
        return;
      }
      case QuantFormat::kFp8: {  // block by block, each byte through a table of the 256 e4m3 values
        static const Fp8Table table;
        const int64_t blocks = (cols + block_cols - 1) / block_cols;
        const float* s = f32_scales() + r / group * blocks;
        for (int64_t j = 0; j < n;) {
          const int64_t col = c + j, b = col / block_cols;
          const int64_t len = std::min(n - j, (b + 1) * block_cols - col);
          const float scale = s[b] * mul;
          for (int64_t k = 0; k < len; ++k) dst[j + k] = table.value[row[col + k]] * scale;
          j += len;
        }
        return;
      }
    }
  }
};

}  // namespace ktjax
