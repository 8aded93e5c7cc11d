// Portable micro-kernel: the only one where the build has no x86 kernels (e.g. aarch64), the fallback
// for x86 CPUs without AVX2/FMA, and a check on the others. Written with GCC/Clang vector types of 4
// floats, which compile to the target's own SIMD (NEON on aarch64, SSE on x86-64): the 6x16 tile's 24
// accumulators fit NEON's 32 registers, where the plain loops it replaces kept them in memory.
#include <cstring>

#include "gemm_kernels.h"

namespace ktjax {
namespace {

typedef float Vec4 __attribute__((vector_size(16)));

inline Vec4 load4(const float* p) {
  Vec4 v;
  std::memcpy(&v, p, sizeof v);  // no alignment assumed
  return v;
}

}  // namespace

void microkernel_generic(int64_t kc, const float* a, const float* b, float* const* c, int mr, int nr,
                         float alpha, bool acc) {
  constexpr int MR = 6, NR = 16, NV = NR / 4;
  Vec4 sum[MR][NV] = {};
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
    Vec4 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load4(b + 4 * j);
    for (int i = 0; i < MR; ++i) {
      const Vec4 ai = {a[i], a[i], a[i], a[i]};
      for (int j = 0; j < NV; ++j) sum[i][j] += ai * bv[j];
    }
  }
  for (int i = 0; i < mr; ++i) {
    float row[NR];
    std::memcpy(row, sum[i], sizeof row);
    for (int j = 0; j < nr; ++j) c[i][j] = (acc ? c[i][j] : 0.0f) + alpha * row[j];
  }
}

}  // namespace ktjax
