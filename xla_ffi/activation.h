// The expert MLP's gating, h = silu(g) * u with silu(v) = v * sigmoid(v), and its gradients: elementwise
// over the [slots, I] f32 pre-activations; and the attention kernels' softmax rows (attention.h). One
// portable version, and AVX-512 and AVX2 versions (their own exp, the same bits); the kernel set (Isa in
// gemm.h) names the one a call uses.
#pragma once

#include <cstdint>

namespace ktjax {

// h[i] = silu(g[i]) * u[i] for i < n.
using SiluMul = void (*)(const float* g, const float* u, float* h, int64_t n);
// The gradients of h = silu(g) * u, scaled by the router weight w: with d = w * dh[i],
//   du[i] = d * silu(g[i]),  dg[i] = d * u[i] * silu'(g[i]),  silu'(v) = sigmoid(v) (1 + v (1 - sigmoid(v))).
using SiluMulGrad = void (*)(const float* g, const float* u, const float* dh, float w, float* dg, float* du,
                             int64_t n);

// The vector versions' exp(x), shared so that their bits agree: x clamped to [kExpMin, kExpMax] (past
// which expf is 0 or inf), x = n ln2 + r with ln2 in two parts (r exact, |r| <= ln2 / 2), exp(r) by Cephes'
// degree-6 polynomial 1 + r + r^2 (kExpPoly[0] r^5 + ... + kExpPoly[5]), times 2^n.
inline constexpr float kExpMin = -104.0f, kExpMax = 89.0f;
inline constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
inline constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                      4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// The softmax of one row of f32 attention scores (masked scores are -inf):
// RowMax: the largest of m and s[0:n].
using RowMax = float (*)(const float* s, int64_t n, float m);
// ExpShift: p[i] = exp(s[i] - m) for i < n (p may be s), and returns their sum. m is finite, or +inf
// (every p[i] 0); exp(-inf) is 0.
using ExpShift = float (*)(const float* s, float m, float* p, int64_t n);

float row_max_portable(const float* s, int64_t n, float m);
float exp_shift_portable(const float* s, float m, float* p, int64_t n);
float row_max_avx512(const float* s, int64_t n, float m);
float exp_shift_avx512(const float* s, float m, float* p, int64_t n);
float row_max_avx2(const float* s, int64_t n, float m);
float exp_shift_avx2(const float* s, float m, float* p, int64_t n);

void silu_mul_portable(const float* g, const float* u, float* h, int64_t n);
void silu_mul_grad_portable(const float* g, const float* u, const float* dh, float w, float* dg, float* du,
                            int64_t n);
// 16 lanes at a time, exp by range reduction and a degree-6 polynomial: silu within 2.6 ulp of float64
// (2.3 through glibc's expf); NaN, infinities, overflow and underflow as expf gives them.
void silu_mul_avx512(const float* g, const float* u, float* h, int64_t n);
void silu_mul_grad_avx512(const float* g, const float* u, const float* dh, float w, float* dg, float* du,
                          int64_t n);
// The same arithmetic in 8 lanes (2^n applied as two exact factors, as AVX2 has no vscalefps).
void silu_mul_avx2(const float* g, const float* u, float* h, int64_t n);
void silu_mul_grad_avx2(const float* g, const float* u, const float* dh, float w, float* dg, float* du,
                        int64_t n);

}  // namespace ktjax
