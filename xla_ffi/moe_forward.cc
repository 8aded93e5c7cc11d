// Forward of the routed experts:
//   y[t] = sum_k w[t,k] * Down_e(silu(Gate_e(x[t])) * Up_e(x[t])),  e = topk_ids[t,k]
// Slots are grouped by expert; each expert's projections are GEMMs over its token group. Optionally
// saves the gate/up pre-activations [T*K, I] f32 (sorted slot order) for the backward ("retain").
// With bf16 intermediates (bf16 tokens only), the down projection reads w h rounded to bf16, so that
// it runs on the bf16 pair path where the CPU has one (ops/moe_experts.py: `intermediates`).
#include "moe_forward.h"

#include <algorithm>

#include "moe_context.h"

namespace ktjax {

ffi::Error moe_forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weights,
                       ffi::AnyBuffer gate, ffi::AnyBuffer up, ffi::AnyBuffer down, ffi::RemainingArgs more,
                       float lora_scale, std::string_view adapters, std::string_view quant,
                       std::string_view intermediates,
                       bool save_preact, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> g_saved,
                       ffi::Result<ffi::AnyBuffer> u_saved) {
  MoeProblem p;
  if (auto e = parse_problem(x, ids, weights, gate, up, down, more, lora_scale, adapters, quant, intermediates,
                             &p);
      e.failure()) {
    return e;
  }
  const int64_t T = p.T, K = p.K, H = p.H, I = p.I, E = p.E;
  if (y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("y must have the dtype of x");
  }
  if (auto e = expect_shape("y", *y, {T, H}, "[T, H]"); e.failure()) return e;
  if (auto e = expect_output("g_saved", *g_saved, save_preact, {T * K, I}); e.failure()) return e;
  if (auto e = expect_output("u_saved", *u_saved, save_preact, {T * K, I}); e.failure()) return e;
  if (save_preact && (g_saved->element_type() != ffi::DataType::F32 ||
                      u_saved->element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("g_saved and u_saved must be float32");
  }
  const Isa* isa = nullptr;
  if (auto e = pick_isa(&isa); e.failure()) return e;
  Routing r;
  if (std::string msg = build_routing(p.ids, p.weights, T, K, E, &r); !msg.empty()) {
    return ffi::Error::InvalidArgument(msg);
  }
  prepare_output(*y);
  prepare_output(*g_saved);
  prepare_output(*u_saved);
  stats().forward_calls.fetch_add(1, std::memory_order_relaxed);

  const int64_t S = r.kept();
  const Lora& ld = p.lora[kDown];
  const bool bf16 = p.bf16_intermediates();
  KernelContext ctx(pool, *isa, bf16 ? 2 * I : 0);
  float* g = nullptr;
  float* u = nullptr;
  if (save_preact) {
    g = static_cast<float*>(g_saved->untyped_data());
    u = static_cast<float*>(u_saved->untyped_data());
    // Rows past the kept slots are never read; zero them so the saved buffers are fully defined.
    std::fill(g + S * I, g + T * K * I, 0.0f);
    std::fill(u + S * I, u + T * K * I, 0.0f);
  } else {
    g = ctx.alloc(S * I);
    u = ctx.alloc(S * I);
  }
  // h: the down projection's A, and LoRA's; with bf16 intermediates, hw = bf16(w h) is that A, and h
  // is kept only for LoRA (zd below stays f32).
  float* h = !bf16 || ld.rank > 0 ? ctx.alloc(S * I) : nullptr;
  uint16_t* hw = bf16 ? ctx.alloc_bf16(S * I) : nullptr;
  compute_preactivations(ctx, p, r, g, u, h, hw, Work::kForward);

  // LoRA A of down: zd = h A^T, [S, r_down].
  const std::vector<int32_t> experts = busy_experts(r, E);
  float* zd = ctx.alloc(S * ld.rank);
  if (ld.rank > 0) {
    ctx.run(experts.size(), [&](int64_t item, int worker) {
      const int64_t e = experts[item], off = r.offsets[e];
      ctx.gemm(worker, r.count(e), ld.rank, I, 1.0f, f32_view(h + off * I, I), ld.A.expert(e).t(),
               f32_out(zd + off * ld.rank, ld.rank), false, Work::kForward);
    });
  }

  // Down projection, weighted and scattered into y.
  accumulate_per_token(ctx, *y, p.x_dtype, T, H, r, experts,
                       [&](int worker, int64_t e, int64_t h0, int64_t nh, const OutView& out) {
    const int64_t off = r.offsets[e], n = r.count(e);
    MatView he = hw != nullptr ? bf16_view(hw + off * I, I) : f32_view(h + off * I, I);
    if (hw == nullptr) he.row_scale = r.weight.data() + off;  // else w is in hw
    ctx.gemm(worker, n, nh, I, 1.0f, he, p.w[kDown].expert(e).skip_rows(h0).t(), out, true, Work::kForward);
    if (ld.rank > 0) {
      MatView ze = f32_view(zd + off * ld.rank, ld.rank);
      ze.row_scale = r.weight.data() + off;
      ctx.gemm(worker, n, nh, ld.rank, p.lora_scale, ze, ld.B.expert(e).skip_rows(h0).t(), out, true,
               Work::kForward);
    }
  });
  return ffi::Error::Success();
}

}  // namespace ktjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeForward, ktjax::moe_forward,
                              ktjax::bind_problem(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>())
                                  .Attr<bool>("save_preact")
                                  .Ret<xla::ffi::AnyBuffer>()    // y
                                  .Ret<xla::ffi::AnyBuffer>()    // g_saved
                                  .Ret<xla::ffi::AnyBuffer>());  // u_saved
