// Backward of the routed experts. For slot (t, k) on expert e with router weight w, pre-activations
// g, u, hidden h = silu(g) * u and upstream gradient dy = dy[t]:
//   dh_full = Down_e^T dy              d topk_weights[t,k] = dh_full . h
//   dh = w dh_full;  du = dh * silu(g);  dg = dh * u * silu'(g)
//   dx[t] += Gate_e^T dg + Up_e^T du   (with LoRA: P^T d = W^T d + s A^T (B^T d))
//   d Down_e = sum (w dy) h^T,  d Gate_e = sum dg x^T,  d Up_e = sum du x^T       (f32 accumulation)
//   LoRA of P with z = A v:  dB = s sum d z^T,  dA = s sum (B^T d) v^T
// Only the gradients named in `needs` are computed; the others are empty outputs and cost nothing.
// With bf16_intermediates (bf16 tokens only), the products of the base weights' chain read bf16 copies
// of their f32 operands, so that they run on the bf16 pair path where the CPU has one: dg and du
// rounded for dx and d Gate_e / d Up_e, and d Down_e = sum dy hw^T with hw = bf16(w h), as in the
// forward. d topk_weights and every LoRA product keep the f32 values.
#include "moe_backward.h"

#include <algorithm>

#include "moe_context.h"

namespace ktjax {
namespace {

struct Grads {
  ffi::AnyBuffer* base[3];  // d gate, d up, d down
  ffi::AnyBuffer* lora[6];  // dA, dB of gate, up, down
};

}  // namespace

ffi::Error moe_backward(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer ids,
                        ffi::AnyBuffer weights, ffi::AnyBuffer gate, ffi::AnyBuffer up, ffi::AnyBuffer down,
                        ffi::AnyBuffer a_gate, ffi::AnyBuffer b_gate, ffi::AnyBuffer a_up, ffi::AnyBuffer b_up,
                        ffi::AnyBuffer a_down, ffi::AnyBuffer b_down, ffi::AnyBuffer g_saved,
                        ffi::AnyBuffer u_saved, float lora_scale, int64_t needs, bool bf16_intermediates,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dweights,
                        ffi::Result<ffi::AnyBuffer> dgate, ffi::Result<ffi::AnyBuffer> dup,
                        ffi::Result<ffi::AnyBuffer> ddown, ffi::Result<ffi::AnyBuffer> da_gate,
                        ffi::Result<ffi::AnyBuffer> db_gate, ffi::Result<ffi::AnyBuffer> da_up,
                        ffi::Result<ffi::AnyBuffer> db_up, ffi::Result<ffi::AnyBuffer> da_down,
                        ffi::Result<ffi::AnyBuffer> db_down) {
  const ffi::AnyBuffer lora_in[6] = {a_gate, b_gate, a_up, b_up, a_down, b_down};
  MoeProblem p;
  if (auto e = parse_problem(x, ids, weights, gate, up, down, lora_in, lora_scale, &p); e.failure()) return e;
  const int64_t T = p.T, K = p.K, H = p.H, I = p.I, E = p.E;
  if (needs < 0 || needs > kNeedAll) return ffi::Error::InvalidArgument("needs has unknown bits");
  if (bf16_intermediates && p.x_dtype != DType::kBF16) {
    return ffi::Error::InvalidArgument("bf16_intermediates needs bf16 tokens x");
  }
  if (dy.element_type() != x.element_type()) return ffi::Error::InvalidArgument("dy must have the dtype of x");
  if (auto e = expect_shape("dy", dy, {T, H}, "[T, H]"); e.failure()) return e;
  const bool retained = g_saved.element_count() > 0;
  if (retained) {
    if (g_saved.element_type() != ffi::DataType::F32 || u_saved.element_type() != ffi::DataType::F32) {
      return ffi::Error::InvalidArgument("g_saved and u_saved must be float32");
    }
    if (auto e = expect_shape("g_saved", g_saved, {T * K, I}, "[T*K, I]"); e.failure()) return e;
    if (auto e = expect_shape("u_saved", u_saved, {T * K, I}, "[T*K, I]"); e.failure()) return e;
  } else if (u_saved.element_count() != 0) {
    return ffi::Error::InvalidArgument("g_saved and u_saved must both be given or both be empty");
  }
  const bool need_x = needs & kNeedX, need_w = needs & kNeedWeights;
  const bool need_base[3] = {bool(needs & kNeedGate), bool(needs & kNeedUp), bool(needs & kNeedDown)};
  const bool need_lora[6] = {bool(needs & kNeedLoraGateA), bool(needs & kNeedLoraGateB),
                             bool(needs & kNeedLoraUpA),   bool(needs & kNeedLoraUpB),
                             bool(needs & kNeedLoraDownA), bool(needs & kNeedLoraDownB)};
  for (int j = 0; j < 3; ++j) {
    if (p.lora[j].rank == 0 && (need_lora[2 * j] || need_lora[2 * j + 1])) {
      return ffi::Error::InvalidArgument(std::string("needs asks for LoRA gradients of ") + kProjNames[j] +
                                         ", which has no adapter");
    }
  }
  if (auto e = expect_output("dx", *dx, need_x, {T, H}); e.failure()) return e;
  if (auto e = expect_output("dtopk_weights", *dweights, need_w, {T, K}); e.failure()) return e;
  Grads out{{&*dgate, &*dup, &*ddown}, {&*da_gate, &*db_gate, &*da_up, &*db_up, &*da_down, &*db_down}};
  const int64_t out_dim[3] = {I, I, H}, in_dim[3] = {H, H, I};
  static const char* base_names[3] = {"dgate", "dup", "ddown"};
  static const char* lora_names[6] = {"dA gate", "dB gate", "dA up", "dB up", "dA down", "dB down"};
  for (int j = 0; j < 3; ++j) {
    if (auto e = expect_output(base_names[j], *out.base[j], need_base[j], {E, out_dim[j], in_dim[j]});
        e.failure()) {
      return e;
    }
    const int64_t r = p.lora[j].rank;
    if (auto e = expect_output(lora_names[2 * j], *out.lora[2 * j], need_lora[2 * j], {E, r, in_dim[j]});
        e.failure()) {
      return e;
    }
    if (auto e = expect_output(lora_names[2 * j + 1], *out.lora[2 * j + 1], need_lora[2 * j + 1],
                               {E, out_dim[j], r});
        e.failure()) {
      return e;
    }
  }
  // Gradients come out in the dtype of their primal.
  if ((need_x && dx->element_type() != x.element_type()) ||
      (need_w && dweights->element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("dx must have the dtype of x and dtopk_weights float32");
  }
  const ffi::AnyBuffer* base_in[3] = {&gate, &up, &down};
  for (int j = 0; j < 3; ++j) {
    if (need_base[j] && out.base[j]->element_type() != base_in[j]->element_type()) {
      return ffi::Error::InvalidArgument(std::string(base_names[j]) + " must have the dtype of " + kProjNames[j]);
    }
    for (int ab = 0; ab < 2; ++ab) {
      if (need_lora[2 * j + ab] && out.lora[2 * j + ab]->element_type() != lora_in[2 * j + ab].element_type()) {
        return ffi::Error::InvalidArgument(std::string(lora_names[2 * j + ab]) + " must have the dtype of its adapter");
      }
    }
  }
  const Isa* isa = nullptr;
  if (auto e = pick_isa(&isa); e.failure()) return e;
  Routing r;
  if (std::string msg = build_routing(p.ids, p.weights, T, K, E, &r); !msg.empty()) {
    return ffi::Error::InvalidArgument(msg);
  }
  for (ffi::AnyBuffer* b : {&*dx, &*dweights}) prepare_output(*b);
  for (ffi::AnyBuffer* b : out.base) prepare_output(*b);
  for (ffi::AnyBuffer* b : out.lora) prepare_output(*b);
  stats().backward_calls.fetch_add(1, std::memory_order_relaxed);

  const Lora& ld = p.lora[kDown];
  const float s = p.lora_scale;
  const bool need_gu_lora = need_lora[0] || need_lora[1] || need_lora[2] || need_lora[3];
  const bool need_dgdu = need_x || need_base[kGate] || need_base[kUp] || need_gu_lora;
  const bool need_dh = need_dgdu || need_w;
  const bool need_h = need_w || need_base[kDown] || need_lora[4] || need_lora[5];
  const int64_t S = r.kept();
  const int64_t wide = std::max(H, I);
  KernelContext ctx(pool, *isa, std::max(kTile, p.max_rank()) * wide);
  const std::vector<int32_t> experts = busy_experts(r, E);

  // Pre-activations: saved by the forward, or recomputed now.
  const float* g = static_cast<const float*>(g_saved.untyped_data());
  const float* u = static_cast<const float*>(u_saved.untyped_data());
  if (!retained && (need_dh || need_h)) {
    float* own_g = ctx.alloc(S * I);
    float* own_u = ctx.alloc(S * I);
    compute_preactivations(ctx, p, r, own_g, own_u, nullptr, nullptr, Work::kRecompute);
    g = own_g;
    u = own_u;
  }
  float* h = need_h ? ctx.alloc(S * I) : nullptr;
  // bf16 intermediates: hw = bf16(w h) for d Down_e, dg and du rounded for dx and d Gate_e / d Up_e.
  uint16_t* hw = bf16_intermediates && need_base[kDown] ? ctx.alloc_bf16(S * I) : nullptr;
  const bool round_dgdu = bf16_intermediates && (need_x || need_base[kGate] || need_base[kUp]);
  // dg and du in f32, [S, I] each: what reads them unless only their bf16 copies are read (the LoRA
  // products of gate and up read the f32 values; else each row is rounded from the worker's tile).
  const bool lora_reads_dgdu = (p.lora[kGate].rank > 0 || p.lora[kUp].rank > 0) && (need_x || need_gu_lora);
  const bool f32_dgdu = need_dgdu && (!round_dgdu || lora_reads_dgdu);
  const int64_t chunks = (S + 63) / 64;
  if (need_h) {
    ctx.run(chunks, [&](int64_t c, int worker) {
      const int64_t i = c * 64 * I, end = std::min(S, (c + 1) * 64) * I;
      ctx.isa.silu_mul(g + i, u + i, h + i, end - i);
      for (int64_t s = c * 64; hw != nullptr && s < std::min(S, (c + 1) * 64); ++s) {
        store_scaled_bf16(ctx.isa, h + s * I, r.weight[s], hw + s * I, I, ctx.tile(worker));
      }
    });
  }
  const MatView dy_all = [&] {
    MatView v;
    v.data = dy.untyped_data();
    v.dtype = p.x_dtype;
    v.ld = H;
    return v;
  }();
  auto dy_rows = [&](int64_t e) {
    MatView v = dy_all;
    v.rows = r.token.data() + r.offsets[e];
    return v;
  };

  // q = dy B_down, [S, r_down]: feeds dh (through LoRA down) and dA_down.
  float* q = nullptr;
  if (ld.rank > 0 && (need_dh || need_lora[4])) {
    q = ctx.alloc(S * ld.rank);
    ctx.run(experts.size(), [&](int64_t item, int worker) {
      const int64_t e = experts[item], off = r.offsets[e];
      ctx.gemm(worker, r.count(e), ld.rank, H, 1.0f, dy_rows(e), ld.B.expert(e),
               f32_out(q + off * ld.rank, ld.rank), false, need_dh ? Work::kInputGrad : Work::kLoraGrad);
    });
  }

  // dh_full = dy Down_e (+ s q A_down), then per slot: d topk_weights, and dg / du.
  float* dg = nullptr;
  float* du = nullptr;
  uint16_t* dg16 = nullptr;
  uint16_t* du16 = nullptr;
  if (need_w) std::fill_n(static_cast<float*>(dweights->untyped_data()), T * K, 0.0f);
  if (need_dh) {
    float* dh = ctx.alloc(S * I);
    const auto items = ctx.balanced_blocks(r, E, I);
    ctx.run(items.size(), [&](int64_t item, int worker) {
      const int64_t e = items[item].e, i0 = items[item].start, ni = items[item].count;
      const int64_t off = r.offsets[e], n = r.count(e);
      OutView o = f32_out(dh + off * I + i0, I);
      ctx.gemm(worker, n, ni, H, 1.0f, dy_rows(e), p.w[kDown].expert(e).skip_cols(i0), o, false,
               Work::kInputGrad);
      if (ld.rank > 0) {
        ctx.gemm(worker, n, ni, ld.rank, s, f32_view(q + off * ld.rank, ld.rank),
                 ld.A.expert(e).skip_cols(i0), o, true, Work::kInputGrad);
      }
    });
    if (f32_dgdu) {
      dg = ctx.alloc(S * I);
      du = ctx.alloc(S * I);
    }
    if (round_dgdu) {
      dg16 = ctx.alloc_bf16(S * I);
      du16 = ctx.alloc_bf16(S * I);
    }
    float* dw = static_cast<float*>(dweights->untyped_data());
    ctx.run(chunks, [&](int64_t c, int worker) {
      for (int64_t sl = c * 64, end = std::min(S, (c + 1) * 64); sl < end; ++sl) {
        const float* dhs = dh + sl * I;
        const float* gs = g + sl * I;
        const float* us = u + sl * I;
        if (need_w) {
          const float* hs = h + sl * I;
          float dot = 0.0f;
          for (int64_t i = 0; i < I; ++i) dot += dhs[i] * hs[i];
          dw[r.slot[sl]] = dot;
        }
        if (!need_dgdu) continue;
        float* dgs = f32_dgdu ? dg + sl * I : ctx.tile(worker);
        float* dus = f32_dgdu ? du + sl * I : ctx.tile(worker) + I;
        ctx.isa.silu_mul_grad(gs, us, dhs, r.weight[sl], dgs, dus, I);
        if (round_dgdu) {
          store_row(ctx.isa, dgs, dg16 + sl * I, DType::kBF16, I);
          store_row(ctx.isa, dus, du16 + sl * I, DType::kBF16, I);
        }
      }
    });
  }

  // Computes rows [r0, r0 + rows) of expert e's [rows_per_expert, cols] gradient with `compute(out)`,
  // writing straight into f32 outputs and through the worker's f32 tile for bf16 ones.
  auto grad_tile = [&](ffi::AnyBuffer* o, int worker, int64_t e, int64_t rows_per_expert, int64_t cols,
                       int64_t r0, int64_t rows, const auto& compute) {
    const bool f32 = o->element_type() == ffi::DataType::F32;
    float* dst = f32 ? static_cast<float*>(o->untyped_data()) + (e * rows_per_expert + r0) * cols
                     : ctx.tile(worker);
    compute(f32_out(dst, cols));
    if (!f32) {
      store_expert_rows(ctx.isa, dst, o->untyped_data(), DType::kBF16, e, rows_per_expert, cols, r0, rows);
    }
  };

  // d Down_e[h0:h0+nh, :] = (w dy_e)^T[h0:h0+nh] h_e, in blocks of kTile rows; an item packs h_e once
  // for all its blocks.
  if (need_base[kDown]) {
    const auto items = ctx.expert_block_groups(r, E, num_tiles(H));
    ctx.reserve_reuse(r, E, I);
    ctx.run(items.size(), [&](int64_t item, int worker) {
      const int64_t e = items[item].e, off = r.offsets[e], n = r.count(e);
      const MatView hv = hw != nullptr ? bf16_view(hw + off * I, I) : f32_view(h + off * I, I);
      const auto he = ctx.reuse_b(worker, n, I, hv, hw != nullptr);
      for (int64_t b = items[item].start; b < items[item].start + items[item].count; ++b) {
        const int64_t h0 = b * kTile, nh = std::min(kTile, H - h0);
        grad_tile(out.base[kDown], worker, e, H, I, h0, nh, [&](const OutView& o) {
          MatView a = dy_rows(e).skip_cols(h0);
          if (hw == nullptr) a.row_scale = r.weight.data() + off;  // else w is in hw
          ctx.gemm(worker, nh, 1.0f, a.t(), he, o, false, Work::kBaseGrad);
        });
      }
    });
  }

  // LoRA of down: dB = s (w dy)^T z with z = h A^T; dA = s (w q)^T h. One item per expert.
  if (need_lora[4] || need_lora[5]) {
    float* z_all = ctx.alloc(S * ld.rank);  // z of expert e at rows [off, off + n)
    ctx.run(E, [&](int64_t e, int worker) {
      const int64_t off = r.offsets[e], n = r.count(e), rk = ld.rank;
      const MatView he = f32_view(h + off * I, I);
      if (need_lora[5]) {
        float* z = z_all + off * rk;
        ctx.gemm(worker, n, rk, I, 1.0f, he, ld.A.expert(e).t(), f32_out(z, rk), false, Work::kLoraGrad);
        grad_tile(out.lora[5], worker, e, H, rk, 0, H, [&](const OutView& o) {
          MatView a = dy_rows(e);
          a.row_scale = r.weight.data() + off;
          ctx.gemm(worker, H, rk, n, s, a.t(), f32_view(z, rk), o, false, Work::kLoraGrad);
        });
      }
      if (need_lora[4]) {
        grad_tile(out.lora[4], worker, e, rk, I, 0, rk, [&](const OutView& o) {
          MatView a = f32_view(q + off * rk, rk);
          a.row_scale = r.weight.data() + off;
          ctx.gemm(worker, rk, I, n, s, a.t(), he, o, false, Work::kLoraGrad);
        });
      }
    });
  }

  // LoRA of gate and up: p = d B ([S, r], feeds dx and dA); dB = s d^T z with z = x A^T; dA = s p^T x.
  const float* dgu[2] = {dg, du};
  float* pgu[2] = {nullptr, nullptr};
  for (int j = 0; j < 2; ++j) {
    const Lora& l = p.lora[j];
    const bool nA = need_lora[2 * j], nB = need_lora[2 * j + 1];
    if (l.rank == 0 || !(need_x || nA || nB)) continue;
    const int64_t rk = l.rank;
    pgu[j] = ctx.alloc(S * rk);
    float* z_all = nB ? ctx.alloc(S * rk) : nullptr;  // z of expert e at rows [off, off + n)
    ctx.run(E, [&](int64_t e, int worker) {
      const int64_t off = r.offsets[e], n = r.count(e);
      const MatView xe = p.x_rows(r.token.data() + off);
      const MatView de = f32_view(dgu[j] + off * I, I);
      float* pe = pgu[j] + off * rk;
      if (need_x || nA) {
        ctx.gemm(worker, n, rk, I, 1.0f, de, l.B.expert(e), f32_out(pe, rk), false,
                 need_x ? Work::kInputGrad : Work::kLoraGrad);
      }
      if (nB) {
        float* z = z_all + off * rk;
        ctx.gemm(worker, n, rk, H, 1.0f, xe, l.A.expert(e).t(), f32_out(z, rk), false, Work::kLoraGrad);
        grad_tile(out.lora[2 * j + 1], worker, e, I, rk, 0, I, [&](const OutView& o) {
          ctx.gemm(worker, I, rk, n, s, de.t(), f32_view(z, rk), o, false, Work::kLoraGrad);
        });
      }
      if (nA) {
        grad_tile(out.lora[2 * j], worker, e, rk, H, 0, rk, [&](const OutView& o) {
          ctx.gemm(worker, rk, H, n, s, f32_view(pe, rk).t(), xe, o, false, Work::kLoraGrad);
        });
      }
    });
  }

  // d Gate_e / d Up_e [i0:i0+ni, :] = d_e^T[i0:i0+ni] x_e, in blocks of kTile rows of both gradients;
  // an item packs x_e once for all its blocks of either. d_e: dg / du, or their bf16 copies.
  const uint16_t* dgu16[2] = {dg16, du16};
  auto d_rows = [&](int j, int64_t off) {
    return round_dgdu ? bf16_view(dgu16[j] + off * I, I) : f32_view(dgu[j] + off * I, I);
  };
  std::vector<int> gu;  // the projections among gate and up whose gradient is needed
  for (int j = 0; j < 2; ++j) {
    if (need_base[j]) gu.push_back(j);
  }
  if (!gu.empty()) {
    const int64_t tiles = num_tiles(I);
    const auto items = ctx.expert_block_groups(r, E, gu.size() * tiles);
    ctx.reserve_reuse(r, E, H);
    ctx.run(items.size(), [&](int64_t item, int worker) {
      const int64_t e = items[item].e, off = r.offsets[e], n = r.count(e);
      const auto xe = ctx.reuse_b(worker, n, H, p.x_rows(r.token.data() + off), round_dgdu);
      for (int64_t b = items[item].start; b < items[item].start + items[item].count; ++b) {
        const int j = gu[b / tiles];
        const int64_t i0 = b % tiles * kTile, ni = std::min(kTile, I - i0);
        grad_tile(out.base[j], worker, e, I, H, i0, ni, [&](const OutView& o) {
          ctx.gemm(worker, ni, 1.0f, d_rows(j, off).skip_cols(i0).t(), xe, o, false, Work::kBaseGrad);
        });
      }
    });
  }

  // dx[t, h0:h0+nh] += dg Gate_e + du Up_e (+ s p A): a work item owns a column block of every token.
  if (need_x) {
    TokenAccumulator dx_acc(ctx, *dx, p.x_dtype, T, H);
    float* acc = dx_acc.data();
    const auto blocks = ctx.token_blocks(H, T);
    ctx.run(blocks.count(), [&](int64_t b, int worker) {
      const int64_t h0 = blocks.start(b), nh = blocks.size(b);
      for (int64_t t = 0; t < T; ++t) std::fill_n(acc + t * H + h0, nh, 0.0f);
      for (int32_t e : experts) {
        const int64_t off = r.offsets[e], n = r.count(e);
        const OutView o = OutView{acc, H, r.token.data() + off}.skip_cols(h0);
        for (int j = 0; j < 2; ++j) {
          ctx.gemm(worker, n, nh, I, 1.0f, d_rows(j, off), p.w[j].expert(e).skip_cols(h0), o, true,
                   Work::kInputGrad);
          const Lora& l = p.lora[j];
          if (l.rank > 0) {
            ctx.gemm(worker, n, nh, l.rank, s, f32_view(pgu[j] + off * l.rank, l.rank),
                     l.A.expert(e).skip_cols(h0), o, true, Work::kInputGrad);
          }
        }
      }
    });
    dx_acc.finish(ctx);
  }
  return ffi::Error::Success();
}

}  // namespace ktjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeBackward, ktjax::moe_backward,
                              ktjax::bind_problem(xla::ffi::Ffi::Bind()
                                                      .Ctx<xla::ffi::ThreadPool>()
                                                      .Arg<xla::ffi::AnyBuffer>())  // dy
                                  .Arg<xla::ffi::AnyBuffer>()  // g_saved (empty: recompute)
                                  .Arg<xla::ffi::AnyBuffer>()  // u_saved
                                  .Attr<float>("lora_scale")
                                  .Attr<int64_t>("needs")
                                  .Attr<bool>("bf16_intermediates")
                                  .Ret<xla::ffi::AnyBuffer>()    // dx
                                  .Ret<xla::ffi::AnyBuffer>()    // dtopk_weights
                                  .Ret<xla::ffi::AnyBuffer>()    // dgate
                                  .Ret<xla::ffi::AnyBuffer>()    // dup
                                  .Ret<xla::ffi::AnyBuffer>()    // ddown
                                  .Ret<xla::ffi::AnyBuffer>()    // dA gate
                                  .Ret<xla::ffi::AnyBuffer>()    // dB gate
                                  .Ret<xla::ffi::AnyBuffer>()    // dA up
                                  .Ret<xla::ffi::AnyBuffer>()    // dB up
                                  .Ret<xla::ffi::AnyBuffer>()    // dA down
                                  .Ret<xla::ffi::AnyBuffer>());  // dB down
