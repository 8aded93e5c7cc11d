#include "moe_context.h"

#include <string>

namespace ktjax {

void compute_preactivations(KernelContext& ctx, const MoeProblem& p, const Routing& r, float* g,
                            float* u, float* h, uint16_t* hw, Work work) {
  const int64_t S = r.kept(), H = p.H, I = p.I;
  const Lora& lg = p.lora[kGate];
  const Lora& lu = p.lora[kUp];
  // LoRA A products z = x A^T: [S, r], small, one work item per expert.
  float* zg = ctx.alloc(S * lg.rank);
  float* zu = ctx.alloc(S * lu.rank);
  const std::vector<int32_t> experts = busy_experts(r, p.E);
  if (lg.rank > 0 || lu.rank > 0) {
    ctx.run(experts.size(), [&](int64_t item, int worker) {
      const int64_t e = experts[item], off = r.offsets[e], n = r.count(e);
      const MatView xe = p.x_rows(r.token.data() + off);
      if (lg.rank > 0) {
        ctx.gemm(worker, n, lg.rank, H, 1.0f, xe, lg.A.expert(e).t(),
                 f32_out(zg + off * lg.rank, lg.rank), false, work);
      }
      if (lu.rank > 0) {
        ctx.gemm(worker, n, lu.rank, H, 1.0f, xe, lu.A.expert(e).t(),
                 f32_out(zu + off * lu.rank, lu.rank), false, work);
      }
    });
  }
  const auto items = ctx.balanced_blocks(r, p.E, I);
  ctx.run(items.size(), [&](int64_t item, int worker) {
    const int64_t e = items[item].e, i0 = items[item].start, ni = items[item].count;
    const int64_t off = r.offsets[e], n = r.count(e);
    const MatView xe = p.x_rows(r.token.data() + off);
    float* gt = g + off * I + i0;
    float* ut = u + off * I + i0;
    ctx.gemm(worker, n, ni, H, 1.0f, xe, p.w[kGate].expert(e).skip_rows(i0).t(), f32_out(gt, I), false,
             work);
    ctx.gemm(worker, n, ni, H, 1.0f, xe, p.w[kUp].expert(e).skip_rows(i0).t(), f32_out(ut, I), false,
             work);
    if (lg.rank > 0) {
      ctx.gemm(worker, n, ni, lg.rank, p.lora_scale, f32_view(zg + off * lg.rank, lg.rank),
               lg.B.expert(e).skip_rows(i0).t(), f32_out(gt, I), true, work);
    }
    if (lu.rank > 0) {
      ctx.gemm(worker, n, ni, lu.rank, p.lora_scale, f32_view(zu + off * lu.rank, lu.rank),
               lu.B.expert(e).skip_rows(i0).t(), f32_out(ut, I), true, work);
    }
    for (int64_t s = 0; s < n && (h != nullptr || hw != nullptr); ++s) {
      float* hs = h != nullptr ? h + (off + s) * I + i0 : ctx.tile(worker);
      ctx.isa.silu_mul(gt + s * I, ut + s * I, hs, ni);
      if (hw != nullptr) {
        store_scaled_bf16(ctx.isa, hs, r.weight[off + s], hw + (off + s) * I + i0, ni, ctx.tile(worker) + I);
      }
    }
  });
}

void store_scaled_bf16(const Isa& isa, const float* src, float scale, uint16_t* dst, int64_t n, float* tmp) {
  for (int64_t i = 0; i < n; ++i) tmp[i] = scale * src[i];
  store_row(isa, tmp, dst, DType::kBF16, n);
}

ffi::Error pick_isa(const Isa** isa) {
  *isa = select_isa();
  if (*isa != nullptr) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("KTJAX_ISA names an ISA this CPU or build cannot run; available: ") +
                                     available_isas());
}

TokenAccumulator::TokenAccumulator(KernelContext& ctx, ffi::AnyBuffer& out, DType dtype, int64_t T,
                                   int64_t H)
    : out_(out), dtype_(dtype), T_(T), H_(H) {
  acc_ = dtype == DType::kF32 ? static_cast<float*>(out.untyped_data()) : ctx.alloc(T * H);
}

void TokenAccumulator::finish(KernelContext& ctx) {
  if (dtype_ == DType::kF32) return;
  constexpr int64_t kRows = 64;
  ctx.run((T_ + kRows - 1) / kRows, [&](int64_t chunk, int) {
    const int64_t t0 = chunk * kRows, nt = std::min(kRows, T_ - t0);
    store_row(ctx.isa, acc_ + t0 * H_, static_cast<uint16_t*>(out_.untyped_data()) + t0 * H_, dtype_, nt * H_);
  });
}

void store_expert_rows(const Isa& isa, const float* src, void* dst, DType dtype, int64_t e,
                       int64_t rows_per_expert, int64_t cols, int64_t r0, int64_t rows) {
  char* base = static_cast<char*>(dst) + ((e * rows_per_expert + r0) * cols) * dtype_bytes(dtype);
  store_row(isa, src, base, dtype, rows * cols);
}

}  // namespace ktjax
