// Backward of the routed experts. For slot (t, k) on expert e with router weight w, pre-activations
// g, u, hidden h = silu(g) * u and upstream gradient dy = dy[t]:
//   dh_full = Down_e^T dy              d topk_weights[t,k] = dh_full . h
//   dh = w dh_full;  du = dh * silu(g);  dg = dh * u * silu'(g)
//   dx[t] += Gate_e^T dg + Up_e^T du   (with LoRA: P^T d = W^T d + s A^T (B^T d))
//   d Down_e = sum (w dy) h^T,  d Gate_e = sum dg x^T,  d Up_e = sum du x^T       (f32 accumulation)
//   LoRA of P with z = A v:  dB = s sum d z^T,  dA = s sum (B^T d) v^T
// Only the gradients named in `needs` are computed; the others are empty outputs and cost nothing.
// A BackwardPlan says what a call computes; the phases of Backward run in order, each one step of
// the chain above. With bf16 intermediates (bf16 tokens only), the products of the base weights'
// chain read bf16 copies of their f32 operands, so that they run on the bf16 pair path where the CPU
// has one: dg and du rounded for dx and d Gate_e / d Up_e, and d Down_e = sum dy hw^T with
// hw = bf16(w h), as in the forward. d topk_weights and every LoRA product keep the f32 values.
#include "moe_backward.h"

#include <algorithm>

#include "moe_context.h"

namespace ktjax {
namespace {

// The outputs of one call, in the contract's order (kGradNames): dx, d topk_weights, the base
// weights' gradients, then dA and dB of each projection.
struct Grads {
  ffi::AnyBuffer* dx;
  ffi::AnyBuffer* dweights;
  ffi::AnyBuffer* base[3];     // d gate, d up, d down
  ffi::AnyBuffer* lora[3][2];  // dA, dB of gate, up, down
};

// What one call computes, from `needs`, the adapters present and the intermediates mode.
struct BackwardPlan {
  bool dx = false, dweights = false;
  bool base[3] = {false, false, false};
  bool lora[3][2] = {{false, false}, {false, false}, {false, false}};
  bool retained = false;         // the forward saved g and u
  bool gate_up_lora = false;     // any LoRA gradient of gate or up
  bool dgdu = false;             // dg, du: for dx, d Gate, d Up or the LoRA gradients of gate / up
  bool dh = false;               // dh_full: for dg, du or d topk_weights
  bool h = false;                // h: for d topk_weights, d Down or the LoRA gradients of down
  bool hw = false;               // bf16(w h): d Down's operand with bf16 intermediates
  bool round_dgdu = false;       // bf16 copies of dg, du: what dx, d Gate and d Up read in bf16 mode
  bool f32_dgdu = false;         // dg, du kept in f32 [S, I]: read by the LoRA products, or no copies
  bool lora_down(int b) const { return lora[kDown][b]; }

  BackwardPlan(int64_t needs, const MoeProblem& p, bool retained_preact) {
    retained = retained_preact;
    dx = needs & kNeedX;
    dweights = needs & kNeedWeights;
    for (int j = 0; j < 3; ++j) {
      base[j] = needs & need_base(j);
      for (int b = 0; b < 2; ++b) lora[j][b] = needs & need_lora(j, b);
    }
    gate_up_lora = lora[kGate][0] || lora[kGate][1] || lora[kUp][0] || lora[kUp][1];
    dgdu = dx || base[kGate] || base[kUp] || gate_up_lora;
    dh = dgdu || dweights;
    h = dweights || base[kDown] || lora[kDown][0] || lora[kDown][1];
    const bool bf16 = p.bf16_intermediates();
    hw = bf16 && base[kDown];
    round_dgdu = bf16 && (dx || base[kGate] || base[kUp]);
    const bool lora_reads_dgdu = (p.lora[kGate].rank > 0 || p.lora[kUp].rank > 0) && (dx || gate_up_lora);
    f32_dgdu = dgdu && (!round_dgdu || lora_reads_dgdu);
  }
};

// Checks the outputs against the plan: each needed gradient has its primal's shape and dtype (dtype
// of x for dx, f32 for d topk_weights), each other one is empty; no LoRA gradient of a projection
// without adapter.
ffi::Error check_outputs(const MoeProblem& p, const BackwardPlan& plan, const Grads& out,
                         const ffi::AnyBuffer* base_in[3]) {
  const int64_t T = p.T, K = p.K, H = p.H, I = p.I, E = p.E;
  for (int j = 0; j < 3; ++j) {
    if (p.lora[j].rank == 0 && (plan.lora[j][0] || plan.lora[j][1])) {
      return ffi::Error::InvalidArgument(std::string("needs asks for LoRA gradients of ") + kProjNames[j] +
                                         ", which has no adapter");
    }
  }
  if (auto e = expect_output("dx", *out.dx, plan.dx, {T, H}); e.failure()) return e;
  if (auto e = expect_output("dtopk_weights", *out.dweights, plan.dweights, {T, K}); e.failure()) return e;
  if ((plan.dx && out.dx->element_type() != ffi_dtype(p.x_dtype)) ||
      (plan.dweights && out.dweights->element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("dx must have the dtype of x and dtopk_weights float32");
  }
  const int64_t out_dim[3] = {I, I, H}, in_dim[3] = {H, H, I};
  static const char* base_names[3] = {"dgate", "dup", "ddown"};
  static const char* lora_names[3][2] = {{"dA gate", "dB gate"}, {"dA up", "dB up"}, {"dA down", "dB down"}};
  for (int j = 0; j < 3; ++j) {
    const int64_t rk = p.lora[j].rank;
    if (auto e = expect_output(base_names[j], *out.base[j], plan.base[j], {E, out_dim[j], in_dim[j]});
        e.failure()) {
      return e;
    }
    if (plan.base[j] && p.quantized(j)) {
      return ffi::Error::InvalidArgument(std::string("needs asks for the gradient of ") + kProjNames[j] +
                                         ", which is quantized: a quantized base is frozen");
    }
    if (plan.base[j] && out.base[j]->element_type() != base_in[j]->element_type()) {
      return ffi::Error::InvalidArgument(std::string(base_names[j]) + " must have the dtype of " + kProjNames[j]);
    }
    if (auto e = expect_output(lora_names[j][0], *out.lora[j][0], plan.lora[j][0], {E, rk, in_dim[j]});
        e.failure()) {
      return e;
    }
    if (auto e = expect_output(lora_names[j][1], *out.lora[j][1], plan.lora[j][1], {E, out_dim[j], rk});
        e.failure()) {
      return e;
    }
    const DType adapter_dtype[2] = {p.lora[j].A.dtype, p.lora[j].B.dtype};
    for (int b = 0; b < 2; ++b) {
      if (plan.lora[j][b] && out.lora[j][b]->element_type() != ffi_dtype(adapter_dtype[b])) {
        return ffi::Error::InvalidArgument(std::string(lora_names[j][b]) + " must have the dtype of its adapter");
      }
    }
  }
  return ffi::Error::Success();
}

// One backward call: the buffers its phases hand on, and the phases, run in the order below.
class Backward {
 public:
  Backward(KernelContext& ctx, const MoeProblem& p, const Routing& r, const BackwardPlan& plan,
           const ffi::AnyBuffer& dy, const Grads& out)
      : ctx_(ctx), p_(p), r_(r), plan_(plan), out_(out), S_(r.kept()), experts_(busy_experts(r, p.E)) {
    dy_.data = dy.untyped_data();
    dy_.dtype = p.x_dtype;
    dy_.ld = p.H;
  }

  // g, u (saved, or recomputed now) and h = silu(g) u, hw = bf16(w h) as the plan needs them.
  void hidden_state(const ffi::AnyBuffer& g_saved, const ffi::AnyBuffer& u_saved) {
    const int64_t I = p_.I;
    g_ = static_cast<const float*>(g_saved.untyped_data());
    u_ = static_cast<const float*>(u_saved.untyped_data());
    if (!plan_.retained && (plan_.dh || plan_.h)) {
      float* own_g = ctx_.alloc(S_ * I);
      float* own_u = ctx_.alloc(S_ * I);
      compute_preactivations(ctx_, p_, r_, own_g, own_u, nullptr, nullptr, Work::kRecompute);
      g_ = own_g;
      u_ = own_u;
    }
    if (plan_.h) h_ = ctx_.alloc(S_ * I);
    if (plan_.hw) hw_ = ctx_.alloc_bf16(S_ * I);
    if (!plan_.h) return;
    ctx_.run(chunks(), [&](int64_t c, int worker) {
      const int64_t i = c * kChunk * I, end = std::min(S_, (c + 1) * kChunk) * I;
      ctx_.isa.silu_mul(g_ + i, u_ + i, h_ + i, end - i);
      for (int64_t s = c * kChunk; hw_ != nullptr && s < std::min(S_, (c + 1) * kChunk); ++s) {
        store_scaled_bf16(ctx_.isa, h_ + s * I, r_.weight[s], hw_ + s * I, I, ctx_.tile(worker));
      }
    });
  }

  // The chain from dy to the pre-activations: q = dy B_down (LoRA of down), dh_full = dy Down_e
  // (+ s q A_down), then per slot d topk_weights = dh_full . h and dg, du (with their bf16 copies).
  void input_chain() {
    const Lora& ld = p_.lora[kDown];
    const int64_t I = p_.I, H = p_.H;
    if (ld.rank > 0 && (plan_.dh || plan_.lora_down(0))) {
      q_ = ctx_.alloc(S_ * ld.rank);
      ctx_.run(experts_.size(), [&](int64_t item, int worker) {
        const int64_t e = experts_[item], off = r_.offsets[e];
        ctx_.gemm(worker, r_.count(e), ld.rank, H, 1.0f, dy_rows(e), ld.B.expert(e),
                  f32_out(q_ + off * ld.rank, ld.rank), false, plan_.dh ? Work::kInputGrad : Work::kLoraGrad);
      });
    }
    if (plan_.dweights) std::fill_n(static_cast<float*>(out_.dweights->untyped_data()), p_.T * p_.K, 0.0f);
    if (!plan_.dh) return;
    float* dh = ctx_.alloc(S_ * I);
    const auto items = ctx_.balanced_blocks(r_, p_.E, I);
    ctx_.run(items.size(), [&](int64_t item, int worker) {
      const int64_t e = items[item].e, i0 = items[item].start, ni = items[item].count;
      const int64_t off = r_.offsets[e], n = r_.count(e);
      OutView o = f32_out(dh + off * I + i0, I);
      ctx_.gemm(worker, n, ni, H, 1.0f, dy_rows(e), p_.w[kDown].expert(e).skip_cols(i0), o, false,
                Work::kInputGrad);
      if (ld.rank > 0) {
        ctx_.gemm(worker, n, ni, ld.rank, p_.lora_scale, f32_view(q_ + off * ld.rank, ld.rank),
                  ld.A.expert(e).skip_cols(i0), o, true, Work::kInputGrad);
      }
    });
    if (plan_.f32_dgdu) {
      d_[0] = ctx_.alloc(S_ * I);
      d_[1] = ctx_.alloc(S_ * I);
    }
    if (plan_.round_dgdu) {
      d16_[0] = ctx_.alloc_bf16(S_ * I);
      d16_[1] = ctx_.alloc_bf16(S_ * I);
    }
    ctx_.run(chunks(), [&](int64_t c, int worker) {
      for (int64_t sl = c * kChunk, end = std::min(S_, (c + 1) * kChunk); sl < end; ++sl) {
        slot_gradients(sl, dh + sl * I, worker);
      }
    });
  }

  // d Down_e[h0:h0+nh, :] = (w dy_e)^T[h0:h0+nh] h_e, in blocks of kTile rows; an item packs h_e once
  // for all its blocks.
  void down_grads() {
    if (!plan_.base[kDown]) return;
    const int64_t H = p_.H, I = p_.I;
    const auto items = ctx_.expert_block_groups(r_, p_.E, num_tiles(H));
    ctx_.reserve_reuse(r_, p_.E, I);
    ctx_.run(items.size(), [&](int64_t item, int worker) {
      const int64_t e = items[item].e, off = r_.offsets[e], n = r_.count(e);
      const MatView hv = hw_ != nullptr ? bf16_view(hw_ + off * I, I) : f32_view(h_ + off * I, I);
      const auto he = ctx_.reuse_b(worker, n, I, hv, hw_ != nullptr);
      for (int64_t b = items[item].start; b < items[item].start + items[item].count; ++b) {
        const int64_t h0 = b * kTile, nh = std::min(kTile, H - h0);
        grad_tile(out_.base[kDown], worker, e, H, I, h0, nh, [&](const OutView& o) {
          MatView a = dy_rows(e).skip_cols(h0);
          if (hw_ == nullptr) a.row_scale = r_.weight.data() + off;  // else w is in hw
          ctx_.gemm(worker, nh, 1.0f, a.t(), he, o, false, Work::kBaseGrad);
        });
      }
    });
  }

  // LoRA of down: dB = s (w dy)^T z with z = h A^T; dA = s (w q)^T h. One item per expert.
  void down_lora_grads() {
    if (!plan_.lora_down(0) && !plan_.lora_down(1)) return;
    const Lora& ld = p_.lora[kDown];
    const int64_t H = p_.H, I = p_.I, rk = ld.rank;
    const float s = p_.lora_scale;
    float* z_all = ctx_.alloc(S_ * rk);  // z of expert e at rows [off, off + n)
    ctx_.run(p_.E, [&](int64_t e, int worker) {
      const int64_t off = r_.offsets[e], n = r_.count(e);
      const MatView he = f32_view(h_ + off * I, I);
      if (plan_.lora_down(1)) {
        float* z = z_all + off * rk;
        ctx_.gemm(worker, n, rk, I, 1.0f, he, ld.A.expert(e).t(), f32_out(z, rk), false, Work::kLoraGrad);
        grad_tile(out_.lora[kDown][1], worker, e, H, rk, 0, H, [&](const OutView& o) {
          MatView a = dy_rows(e);
          a.row_scale = r_.weight.data() + off;
          ctx_.gemm(worker, H, rk, n, s, a.t(), f32_view(z, rk), o, false, Work::kLoraGrad);
        });
      }
      if (plan_.lora_down(0)) {
        grad_tile(out_.lora[kDown][0], worker, e, rk, I, 0, rk, [&](const OutView& o) {
          MatView a = f32_view(q_ + off * rk, rk);
          a.row_scale = r_.weight.data() + off;
          ctx_.gemm(worker, rk, I, n, s, a.t(), he, o, false, Work::kLoraGrad);
        });
      }
    });
  }

  // LoRA of gate and up: pd = d B ([S, r], feeds dx and dA); dB = s d^T z with z = x A^T; dA = s pd^T x.
  void gate_up_lora_grads() {
    for (int j = 0; j < 2; ++j) {
      const Lora& l = p_.lora[j];
      const bool nA = plan_.lora[j][0], nB = plan_.lora[j][1];
      if (l.rank == 0 || !(plan_.dx || nA || nB)) continue;
      const int64_t H = p_.H, I = p_.I, rk = l.rank;
      const float s = p_.lora_scale;
      pd_[j] = ctx_.alloc(S_ * rk);
      float* z_all = nB ? ctx_.alloc(S_ * rk) : nullptr;  // z of expert e at rows [off, off + n)
      ctx_.run(p_.E, [&](int64_t e, int worker) {
        const int64_t off = r_.offsets[e], n = r_.count(e);
        const MatView xe = p_.x_rows(r_.token.data() + off);
        const MatView de = f32_view(d_[j] + off * I, I);
        float* pe = pd_[j] + off * rk;
        if (plan_.dx || nA) {
          ctx_.gemm(worker, n, rk, I, 1.0f, de, l.B.expert(e), f32_out(pe, rk), false,
                    plan_.dx ? Work::kInputGrad : Work::kLoraGrad);
        }
        if (nB) {
          float* z = z_all + off * rk;
          ctx_.gemm(worker, n, rk, H, 1.0f, xe, l.A.expert(e).t(), f32_out(z, rk), false, Work::kLoraGrad);
          grad_tile(out_.lora[j][1], worker, e, I, rk, 0, I, [&](const OutView& o) {
            ctx_.gemm(worker, I, rk, n, s, de.t(), f32_view(z, rk), o, false, Work::kLoraGrad);
          });
        }
        if (nA) {
          grad_tile(out_.lora[j][0], worker, e, rk, H, 0, rk, [&](const OutView& o) {
            ctx_.gemm(worker, rk, H, n, s, f32_view(pe, rk).t(), xe, o, false, Work::kLoraGrad);
          });
        }
      });
    }
  }

  // d Gate_e / d Up_e [i0:i0+ni, :] = d_e^T[i0:i0+ni] x_e, in blocks of kTile rows of both gradients;
  // an item packs x_e once for all its blocks of either. d_e: dg / du, or their bf16 copies.
  void gate_up_grads() {
    std::vector<int> gu;  // the projections among gate and up whose gradient is needed
    for (int j = 0; j < 2; ++j) {
      if (plan_.base[j]) gu.push_back(j);
    }
    if (gu.empty()) return;
    const int64_t H = p_.H, I = p_.I, tiles = num_tiles(I);
    const auto items = ctx_.expert_block_groups(r_, p_.E, gu.size() * tiles);
    ctx_.reserve_reuse(r_, p_.E, H);
    ctx_.run(items.size(), [&](int64_t item, int worker) {
      const int64_t e = items[item].e, off = r_.offsets[e], n = r_.count(e);
      const auto xe = ctx_.reuse_b(worker, n, H, p_.x_rows(r_.token.data() + off), plan_.round_dgdu);
      for (int64_t b = items[item].start; b < items[item].start + items[item].count; ++b) {
        const int j = gu[b / tiles];
        const int64_t i0 = b % tiles * kTile, ni = std::min(kTile, I - i0);
        grad_tile(out_.base[j], worker, e, I, H, i0, ni, [&](const OutView& o) {
          ctx_.gemm(worker, ni, 1.0f, d_rows(j, off).skip_cols(i0).t(), xe, o, false, Work::kBaseGrad);
        });
      }
    });
  }

  // dx[t] = sum over t's slots of dg Gate_e + du Up_e (+ s pd A of each adapter).
  void input_grad() {
    if (!plan_.dx) return;
    const int64_t I = p_.I;
    accumulate_per_token(ctx_, *out_.dx, p_.x_dtype, p_.T, p_.H, r_, experts_,
                         [&](int worker, int64_t e, int64_t h0, int64_t nh, const OutView& o) {
      const int64_t off = r_.offsets[e], n = r_.count(e);
      for (int j = 0; j < 2; ++j) {
        ctx_.gemm(worker, n, nh, I, 1.0f, d_rows(j, off), p_.w[j].expert(e).skip_cols(h0), o, true,
                  Work::kInputGrad);
        const Lora& l = p_.lora[j];
        if (l.rank > 0) {
          ctx_.gemm(worker, n, nh, l.rank, p_.lora_scale, f32_view(pd_[j] + off * l.rank, l.rank),
                    l.A.expert(e).skip_cols(h0), o, true, Work::kInputGrad);
        }
      }
    });
  }

 private:
  static constexpr int64_t kChunk = 64;  // slots per work item of the per-slot loops
  int64_t chunks() const { return (S_ + kChunk - 1) / kChunk; }

  // dy rows of the tokens of expert e.
  MatView dy_rows(int64_t e) const {
    MatView v = dy_;
    v.rows = r_.token.data() + r_.offsets[e];
    return v;
  }
  // dg (j = 0) or du (j = 1) of the slots from `off` on, as the base weights' products read them.
  MatView d_rows(int j, int64_t off) const {
    return plan_.round_dgdu ? bf16_view(d16_[j] + off * p_.I, p_.I) : f32_view(d_[j] + off * p_.I, p_.I);
  }

  // Slot sl (sorted order) from its dh_full: d topk_weights, and dg / du in f32 (kept, or in the
  // worker's tile) with their bf16 copies.
  void slot_gradients(int64_t sl, const float* dhs, int worker) {
    const int64_t I = p_.I;
    if (plan_.dweights) {
      const float* hs = h_ + sl * I;
      float dot = 0.0f;
      for (int64_t i = 0; i < I; ++i) dot += dhs[i] * hs[i];
      static_cast<float*>(out_.dweights->untyped_data())[r_.slot[sl]] = dot;
    }
    if (!plan_.dgdu) return;
    float* dgs = plan_.f32_dgdu ? d_[0] + sl * I : ctx_.tile(worker);
    float* dus = plan_.f32_dgdu ? d_[1] + sl * I : ctx_.tile(worker) + I;
    ctx_.isa.silu_mul_grad(g_ + sl * I, u_ + sl * I, dhs, r_.weight[sl], dgs, dus, I);
    if (plan_.round_dgdu) {
      store_row(ctx_.isa, dgs, d16_[0] + sl * I, DType::kBF16, I);
      store_row(ctx_.isa, dus, d16_[1] + sl * I, DType::kBF16, I);
    }
  }

  // Computes rows [r0, r0 + rows) of expert e's [rows_per_expert, cols] gradient with `compute(out)`,
  // writing straight into f32 outputs and through the worker's f32 tile for bf16 ones.
  template <typename Compute>
  void grad_tile(ffi::AnyBuffer* o, int worker, int64_t e, int64_t rows_per_expert, int64_t cols, int64_t r0,
                 int64_t rows, const Compute& compute) {
    const bool f32 = o->element_type() == ffi::DataType::F32;
    float* dst = f32 ? static_cast<float*>(o->untyped_data()) + (e * rows_per_expert + r0) * cols
                     : ctx_.tile(worker);
    compute(f32_out(dst, cols));
    if (!f32) {
      store_expert_rows(ctx_.isa, dst, o->untyped_data(), DType::kBF16, e, rows_per_expert, cols, r0, rows);
    }
  }

  KernelContext& ctx_;
  const MoeProblem& p_;
  const Routing& r_;
  const BackwardPlan& plan_;
  const Grads& out_;
  const int64_t S_;  // kept slots
  const std::vector<int32_t> experts_;
  MatView dy_;
  const float* g_ = nullptr;  // pre-activations [S, I]
  const float* u_ = nullptr;
  float* h_ = nullptr;        // silu(g) u [S, I]
  uint16_t* hw_ = nullptr;    // bf16(w h) [S, I]
  float* q_ = nullptr;        // dy B_down [S, r_down]
  float* d_[2] = {nullptr, nullptr};        // dg, du [S, I] f32
  uint16_t* d16_[2] = {nullptr, nullptr};   // their bf16 copies
  float* pd_[2] = {nullptr, nullptr};       // dg B_gate, du B_up [S, r]
};

// g_saved and u_saved: both [T*K, I] f32 (retain), or both empty (recompute).
ffi::Error check_saved(const MoeProblem& p, const ffi::AnyBuffer& g_saved, const ffi::AnyBuffer& u_saved) {
  if (g_saved.element_count() == 0) {
    if (u_saved.element_count() == 0) return ffi::Error::Success();
    return ffi::Error::InvalidArgument("g_saved and u_saved must both be given or both be empty");
  }
  if (g_saved.element_type() != ffi::DataType::F32 || u_saved.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("g_saved and u_saved must be float32");
  }
  if (auto e = expect_shape("g_saved", g_saved, {p.T * p.K, p.I}, "[T*K, I]"); e.failure()) return e;
  return expect_shape("u_saved", u_saved, {p.T * p.K, p.I}, "[T*K, I]");
}

}  // namespace

ffi::Error moe_backward(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer g_saved, ffi::AnyBuffer u_saved,
                        ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weights, ffi::AnyBuffer gate,
                        ffi::AnyBuffer up, ffi::AnyBuffer down, ffi::RemainingArgs more,
                        float lora_scale, std::string_view adapters, std::string_view quant,
                        std::string_view intermediates,
                        int64_t needs, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dweights,
                        ffi::Result<ffi::AnyBuffer> dgate, ffi::Result<ffi::AnyBuffer> dup,
                        ffi::Result<ffi::AnyBuffer> ddown, ffi::Result<ffi::AnyBuffer> da_gate,
                        ffi::Result<ffi::AnyBuffer> db_gate, ffi::Result<ffi::AnyBuffer> da_up,
                        ffi::Result<ffi::AnyBuffer> db_up, ffi::Result<ffi::AnyBuffer> da_down,
                        ffi::Result<ffi::AnyBuffer> db_down) {
  MoeProblem p;
  if (auto e = parse_problem(x, ids, weights, gate, up, down, more, lora_scale, adapters, quant, intermediates,
                             &p);
      e.failure()) {
    return e;
  }
  if (needs < 0 || needs > kNeedAll) return ffi::Error::InvalidArgument("needs has unknown bits");
  if (dy.element_type() != x.element_type()) return ffi::Error::InvalidArgument("dy must have the dtype of x");
  if (auto e = expect_shape("dy", dy, {p.T, p.H}, "[T, H]"); e.failure()) return e;
  if (auto e = check_saved(p, g_saved, u_saved); e.failure()) return e;
  const BackwardPlan plan(needs, p, g_saved.element_count() > 0);
  const Grads out{&*dx, &*dweights, {&*dgate, &*dup, &*ddown},
                  {{&*da_gate, &*db_gate}, {&*da_up, &*db_up}, {&*da_down, &*db_down}}};
  const ffi::AnyBuffer* base_in[3] = {&gate, &up, &down};
  if (auto e = check_outputs(p, plan, out, base_in); e.failure()) return e;
  const Isa* isa = nullptr;
  if (auto e = pick_isa(&isa); e.failure()) return e;
  Routing r;
  if (std::string msg = build_routing(p.ids, p.weights, p.T, p.K, p.E, &r); !msg.empty()) {
    return ffi::Error::InvalidArgument(msg);
  }
  for (ffi::AnyBuffer* b : {&*dx, &*dweights, &*dgate, &*dup, &*ddown, &*da_gate, &*db_gate, &*da_up, &*db_up,
                            &*da_down, &*db_down}) {
    prepare_output(*b);
  }
  stats().backward_calls.fetch_add(1, std::memory_order_relaxed);

  KernelContext ctx(pool, *isa, std::max(kTile, p.max_rank()) * std::max(p.H, p.I));
  Backward backward(ctx, p, r, plan, dy, out);
  backward.hidden_state(g_saved, u_saved);
  backward.input_chain();
  backward.down_grads();
  backward.down_lora_grads();
  backward.gate_up_lora_grads();
  backward.gate_up_grads();
  backward.input_grad();
  return ffi::Error::Success();
}

}  // namespace ktjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeBackward, ktjax::moe_backward,
                              ktjax::bind_problem(xla::ffi::Ffi::Bind()
                                                      .Ctx<xla::ffi::ThreadPool>()
                                                      .Arg<xla::ffi::AnyBuffer>()   // dy
                                                      .Arg<xla::ffi::AnyBuffer>()   // g_saved (empty: recompute)
                                                      .Arg<xla::ffi::AnyBuffer>())  // u_saved
                                  .Attr<int64_t>("needs")
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
