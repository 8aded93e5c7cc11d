// Per-ISA GEMM micro-kernels (see gemm.h for the contract). Each lives in its own translation unit,
// compiled with that ISA's flags; gemm.cc picks one at run time from what the CPU supports.
#pragma once

#include <cstdint>

namespace ktjax {

void microkernel_avx512(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                        float alpha, bool acc);  // MR=6, NR=32
void microkernel_avx2(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                      float alpha, bool acc);  // MR=6, NR=16
void microkernel_generic(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                         float alpha, bool acc);  // MR=6, NR=16

}  // namespace ktjax
