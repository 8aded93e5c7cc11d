// k-masks shared by the AVX-512 translation units (gemm_avx512.cc, activation_avx512.cc); include only
// from files compiled with -mavx512f.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ktjax {

// The k-mask of the first n of 16 lanes (none for n <= 0, all for n >= 16): edge tiles and row tails.
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

}  // namespace ktjax
