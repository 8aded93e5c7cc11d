// Portable micro-kernel: the fallback for CPUs without AVX2/FMA (and a check on the others).
#include "gemm_kernels.h"

namespace ktjax {

void microkernel_generic(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                         float alpha, bool acc) {
  constexpr int MR = 6, NR = 16;
  float sum[MR][NR] = {};
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NR; ++j) sum[i][j] += a[i] * b[j];
    }
  }
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) c[i][j] = (acc ? c[i][j] : 0.0f) + alpha * sum[i][j];
  }
}

}  // namespace ktjax
