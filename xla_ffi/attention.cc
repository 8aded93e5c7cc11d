// The attention kernels (attention.h): argument checks, the tiles' visibility, the forward and the
// backward handlers.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "moe_context.h"

namespace ktjax {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kMaxBlock = 1024;  // a [block, block] f32 tile of 4 MiB per worker at most

// The positive segment ids of one block of rows: lo > hi when it has none; `padding` when some id is
// not positive (a query that sees nothing, a key that nothing sees).
struct BlockSegments {
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
  bool padding = false;
};

enum class Tile { kSkip, kWhole, kMasked };

struct AttentionProblem {
  int64_t B = 0, S = 0, N = 0, G = 0, R = 0, Dk = 0, Dv = 0, block = 0, nb = 0, window = 0;
  float scale = 1.0f;
  DType dtype = DType::kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* seg = nullptr;
  std::vector<BlockSegments> blocks;  // [B, nb]

  int64_t rows(int64_t i) const { return std::min(block, S - i * block); }

  MatView view(const void* base, int64_t elem, int64_t ld) const {
    MatView m;
    m.data = static_cast<const char*>(base) + elem * dtype_bytes(dtype);
    m.dtype = dtype;
    m.ld = ld;
    return m;
  }
  // The rows of block i of head n (q, dout) or group g (k, v) in sequence b.
  MatView q_rows(int64_t b, int64_t i, int64_t n) const { return view(q, ((b * S + i * block) * N + n) * Dk, N * Dk); }
  MatView k_rows(int64_t b, int64_t j, int64_t g) const { return view(k, ((b * S + j * block) * G + g) * Dk, G * Dk); }
  MatView v_rows(int64_t b, int64_t j, int64_t g) const { return view(v, ((b * S + j * block) * G + g) * Dv, G * Dv); }

  // The key blocks query block i can see at most: [first, i].
  int64_t first_key_block(int64_t i) const {
    return window ? std::max<int64_t>(0, i * block - window + 1) / block : 0;
  }
  // The query blocks that can see key block j at most: [j, last].
  int64_t last_query_block(int64_t j) const {
    return window ? std::min(nb - 1, (j * block + rows(j) - 1 + window - 1) / block) : nb - 1;
  }

  Tile classify(int64_t b, int64_t i, int64_t j) const {
    const int64_t q0 = i * block, q1 = q0 + rows(i) - 1, k0 = j * block, k1 = k0 + rows(j) - 1;
    if (k0 > q1 || (window && q0 - k1 >= window)) return Tile::kSkip;
    const BlockSegments& sq = blocks[b * nb + i];
    const BlockSegments& sk = blocks[b * nb + j];
    if (sq.lo > sq.hi || sk.lo > sk.hi || sq.hi < sk.lo || sk.hi < sq.lo) return Tile::kSkip;
    const bool one_segment = !sq.padding && !sk.padding && sq.lo == sq.hi && sk.lo == sk.hi && sq.lo == sk.lo;
    return one_segment && k1 <= q0 && (!window || q1 - k0 < window) ? Tile::kWhole : Tile::kMasked;
  }

  // Sets the invisible scores of tile (i, j) of sequence b, s [rows(i), rows(j)], to -inf.
  void mask(int64_t b, int64_t i, int64_t j, float* s) const {
    const int64_t nk = rows(j), k0 = j * block;
    const int32_t* seg_b = seg + b * S;
    for (int64_t r = 0; r < rows(i); ++r) {
      const int64_t pq = i * block + r;
      const int32_t sq = seg_b[pq];
      float* row = s + r * nk;
      for (int64_t c = 0; c < nk; ++c) {
        const int64_t pk = k0 + c;
        const bool see = sq > 0 && seg_b[pk] == sq && pk <= pq && (!window || pq - pk < window);
        if (!see) row[c] = -kInf;
      }
    }
  }
};

ffi::Error expect_rank4(const char* name, const ffi::AnyBuffer& b) {
  if (b.dimensions().size() == 4) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(name) + " must have rank 4 ([B, S, heads, D]), got rank " +
                                     std::to_string(b.dimensions().size()));
}

ffi::Error parse(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                 const ffi::AnyBuffer& seg, float scale, int64_t window, int64_t block, AttentionProblem* p) {
  for (auto [name, b] : {std::pair<const char*, const ffi::AnyBuffer*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    if (auto e = expect_rank4(name, *b); e.failure()) return e;
  }
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  p->B = qd[0], p->S = qd[1], p->N = qd[2], p->Dk = qd[3], p->G = kd[2], p->Dv = vd[3];
  if (p->S < 1 || p->N < 1 || p->G < 1 || p->Dk < 1 || p->Dv < 1 || p->N % p->G) {
    return ffi::Error::InvalidArgument("q [B, S, N, Dk] and k [B, S, G, Dk] need S, N, G, Dk >= 1 and G dividing N; got q " +
                                       dims_str(qd) + ", k " + dims_str(kd));
  }
  p->R = p->N / p->G;
  if (auto e = expect_shape("k", k, {p->B, p->S, p->G, p->Dk}, "[B, S, G, Dk]"); e.failure()) return e;
  if (auto e = expect_shape("v", v, {p->B, p->S, p->G, p->Dv}, "[B, S, G, Dv]"); e.failure()) return e;
  if (auto e = expect_shape("segment_ids", seg, {p->B, p->S}, "[B, S]"); e.failure()) return e;
  if (auto e = float_dtype("q", q, &p->dtype); e.failure()) return e;
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument("k and v must have q's dtype");
  }
  if (seg.element_type() != ffi::DataType::S32) return ffi::Error::InvalidArgument("segment_ids must be int32");
  if (!std::isfinite(scale)) return ffi::Error::InvalidArgument("scale must be finite");
  if (window < 0) return ffi::Error::InvalidArgument("window must be >= 0, got " + std::to_string(window));
  if (block < 1 || block > kMaxBlock) {
    return ffi::Error::InvalidArgument("block must be in [1, " + std::to_string(kMaxBlock) + "], got " +
                                       std::to_string(block));
  }
  p->scale = scale, p->window = window, p->block = block, p->nb = (p->S + block - 1) / block;
  p->q = q.untyped_data(), p->k = k.untyped_data(), p->v = v.untyped_data();
  p->seg = static_cast<const int32_t*>(seg.untyped_data());
  p->blocks.assign(p->B * p->nb, BlockSegments{});
  for (int64_t b = 0; b < p->B; ++b) {
    for (int64_t t = 0; t < p->S; ++t) {
      BlockSegments& bs = p->blocks[b * p->nb + t / block];
      const int32_t id = p->seg[b * p->S + t];
      if (id > 0) {
        bs.lo = std::min(bs.lo, id), bs.hi = std::max(bs.hi, id);
      } else {
        bs.padding = true;
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error expect_f32(const char* name, const ffi::AnyBuffer& b, std::initializer_list<int64_t> dims,
                      const char* doc) {
  if (b.element_type() != ffi::DataType::F32) return ffi::Error::InvalidArgument(std::string(name) + " must be float32");
  return expect_shape(name, b, dims, doc);
}

// A probability or score-gradient tile as a GEMM operand: bf16 (rounded into `bf16`) for bf16 inputs,
// so that its products multiply two bf16 operands, else the f32 tile itself.
MatView tile_operand(const Isa& isa, const AttentionProblem& p, const float* tile, int64_t n, int64_t ld,
                     uint16_t* bf16) {
  if (p.dtype == DType::kF32) return f32_view(tile, ld);
  store_row(isa, tile, bf16, DType::kBF16, n);
  return bf16_view(bf16, ld);
}

// Per worker: two f32 tiles and two bf16 tiles of block x block (scores or probabilities, their
// gradients, and the bf16 copies of both), and two rows of block floats (the forward's running max and
// sum).
int64_t worker_floats(int64_t block) { return 3 * block * block + 2 * block; }

}  // namespace

ffi::Error attention_forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                             ffi::AnyBuffer seg, float scale, int64_t window, int64_t block,
                             ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse) {
  AttentionProblem p;
  if (auto e = parse(q, k, v, seg, scale, window, block, &p); e.failure()) return e;
  if (auto e = expect_f32("out", *out, {p.B, p.S, p.N, p.Dv}, "[B, S, N, Dv]"); e.failure()) return e;
  if (auto e = expect_f32("lse", *lse, {p.B, p.N, p.S}, "[B, N, S]"); e.failure()) return e;
  const Isa* isa = nullptr;
  if (auto e = pick_isa(&isa); e.failure()) return e;
  prepare_output(*out);
  prepare_output(*lse);
  float* o = static_cast<float*>(out->untyped_data());
  float* ls = static_cast<float*>(lse->untyped_data());
  const int64_t bs = p.block, heads = p.B * p.N;
  KernelContext ctx(pool, *isa, worker_floats(bs));

  // Items (b, n, i), the last query blocks (the most key blocks, causal) first.
  ctx.run(heads * p.nb, [&](int64_t item, int worker) {
    const int64_t i = p.nb - 1 - item / heads, b = item % heads / p.N, n = item % p.N, g = n / p.R;
    const int64_t mq = p.rows(i), ld_o = p.N * p.Dv;
    float* s = ctx.tile(worker);
    uint16_t* pb = reinterpret_cast<uint16_t*>(s + bs * bs);
    float* m = s + 3 * bs * bs;
    float* l = m + bs;
    float* o_rows = o + ((b * p.S + i * bs) * p.N + n) * p.Dv;
    std::fill(m, m + mq, -kInf);
    std::fill(l, l + mq, 0.0f);
    for (int64_t r = 0; r < mq; ++r) std::fill(o_rows + r * ld_o, o_rows + r * ld_o + p.Dv, 0.0f);
    const MatView qi = p.q_rows(b, i, n);
    for (int64_t j = p.first_key_block(i); j <= i; ++j) {
      const Tile t = p.classify(b, i, j);
      if (t == Tile::kSkip) continue;
      const int64_t nk = p.rows(j);
      ctx.gemm(worker, mq, nk, p.Dk, p.scale, qi, p.k_rows(b, j, g).t(), f32_out(s, nk), false, Work::kAttention);
      if (t == Tile::kMasked) p.mask(b, i, j, s);
      for (int64_t r = 0; r < mq; ++r) {
        float* row = s + r * nk;
        const float mr = isa->row_max(row, nk, m[r]);
        if (mr == -kInf) {  // nothing visible to this query yet
          std::fill(row, row + nk, 0.0f);
          continue;
        }
        const float corr = std::exp(m[r] - mr);
        l[r] = l[r] * corr + isa->exp_shift(row, mr, row, nk);
        m[r] = mr;
        if (corr != 1.0f) {
          for (float *x = o_rows + r * ld_o, *end = x + p.Dv; x < end; ++x) *x *= corr;
        }
      }
      ctx.gemm(worker, mq, p.Dv, nk, 1.0f, tile_operand(*isa, p, s, mq * nk, nk, pb), p.v_rows(b, j, g),
               f32_out(o_rows, ld_o), true, Work::kAttention);
    }
    float* lse_rows = ls + (b * p.N + n) * p.S + i * bs;
    for (int64_t r = 0; r < mq; ++r) {
      float* row = o_rows + r * ld_o;
      if (l[r] == 0.0f) {  // a query that sees nothing
        std::fill(row, row + p.Dv, 0.0f);
        lse_rows[r] = kInf;
        continue;
      }
      const float inv = 1.0f / l[r];
      for (int64_t d = 0; d < p.Dv; ++d) row[d] *= inv;
      lse_rows[r] = m[r] + std::log(l[r]);
    }
  });
  return ffi::Error::Success();
}

ffi::Error attention_backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                              ffi::AnyBuffer seg, ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer delta,
                              float scale, int64_t window, int64_t block, ffi::Result<ffi::AnyBuffer> dq,
                              ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv) {
  AttentionProblem p;
  if (auto e = parse(q, k, v, seg, scale, window, block, &p); e.failure()) return e;
  if (auto e = expect_f32("lse", lse, {p.B, p.N, p.S}, "[B, N, S]"); e.failure()) return e;
  if (auto e = expect_f32("delta", delta, {p.B, p.N, p.S}, "[B, N, S]"); e.failure()) return e;
  if (dout.element_type() != q.element_type()) return ffi::Error::InvalidArgument("dout must have q's dtype");
  if (auto e = expect_shape("dout", dout, {p.B, p.S, p.N, p.Dv}, "[B, S, N, Dv]"); e.failure()) return e;
  if (auto e = expect_f32("dq", *dq, {p.B, p.S, p.N, p.Dk}, "[B, S, N, Dk]"); e.failure()) return e;
  if (auto e = expect_f32("dk", *dk, {p.B, p.S, p.G, p.Dk}, "[B, S, G, Dk]"); e.failure()) return e;
  if (auto e = expect_f32("dv", *dv, {p.B, p.S, p.G, p.Dv}, "[B, S, G, Dv]"); e.failure()) return e;
  const Isa* isa = nullptr;
  if (auto e = pick_isa(&isa); e.failure()) return e;
  for (ffi::AnyBuffer b : {*dq, *dk, *dv}) prepare_output(b);
  const float* ls = static_cast<const float*>(lse.untyped_data());
  const float* dl = static_cast<const float*>(delta.untyped_data());
  float* dq_out = static_cast<float*>(dq->untyped_data());
  float* dk_out = static_cast<float*>(dk->untyped_data());
  float* dv_out = static_cast<float*>(dv->untyped_data());
  const int64_t bs = p.block, groups = p.B * p.G, dq_size = p.B * p.S * p.N * p.Dk;
  KernelContext ctx(pool, *isa, worker_floats(bs));
  const int64_t chunks = std::clamp<int64_t>((2 * ctx.workers + groups - 1) / groups, 1, std::min<int64_t>(p.nb, 8));
  float* dq_parts = chunks > 1 ? ctx.alloc((chunks - 1) * dq_size) : nullptr;

  ctx.run(groups * chunks, [&](int64_t item, int worker) {
    const int64_t c = item % chunks, b = item / chunks / p.G, g = item / chunks % p.G;
    float* s = ctx.tile(worker);
    float* ds = s + bs * bs;
    uint16_t* pb = reinterpret_cast<uint16_t*>(ds + bs * bs);
    uint16_t* dsb = pb + bs * bs;
    float* dq_c = c == 0 ? dq_out : dq_parts + (c - 1) * dq_size;
    // This item's heads of dq (R * Dk consecutive values per row), zeroed before the blocks add to them.
    for (int64_t t = 0; t < p.S; ++t) {
      float* row = dq_c + ((b * p.S + t) * p.N + g * p.R) * p.Dk;
      std::fill(row, row + p.R * p.Dk, 0.0f);
    }
    for (int64_t j = c; j < p.nb; j += chunks) {
      const int64_t nk = p.rows(j);
      const OutView dk_j = f32_out(dk_out + ((b * p.S + j * bs) * p.G + g) * p.Dk, p.G * p.Dk);
      const OutView dv_j = f32_out(dv_out + ((b * p.S + j * bs) * p.G + g) * p.Dv, p.G * p.Dv);
      for (int64_t r = 0; r < nk; ++r) {
        std::fill(dk_j.row_ptr(r), dk_j.row_ptr(r) + p.Dk, 0.0f);
        std::fill(dv_j.row_ptr(r), dv_j.row_ptr(r) + p.Dv, 0.0f);
      }
      const MatView kj = p.k_rows(b, j, g), vj = p.v_rows(b, j, g);
      for (int64_t n = g * p.R; n < (g + 1) * p.R; ++n) {
        for (int64_t i = j; i <= p.last_query_block(j); ++i) {
          const Tile t = p.classify(b, i, j);
          if (t == Tile::kSkip) continue;
          const int64_t mq = p.rows(i), row0 = (b * p.N + n) * p.S + i * bs;
          const MatView qi = p.q_rows(b, i, n);
          MatView doi = p.view(dout.untyped_data(), ((b * p.S + i * bs) * p.N + n) * p.Dv, p.N * p.Dv);
          ctx.gemm(worker, mq, nk, p.Dk, p.scale, qi, kj.t(), f32_out(s, nk), false, Work::kAttention);
          if (t == Tile::kMasked) p.mask(b, i, j, s);
          for (int64_t r = 0; r < mq; ++r) isa->exp_shift(s + r * nk, ls[row0 + r], s + r * nk, nk);
          ctx.gemm(worker, mq, nk, p.Dv, 1.0f, doi, vj.t(), f32_out(ds, nk), false, Work::kAttention);
          for (int64_t r = 0; r < mq; ++r) {
            const float d = dl[row0 + r];
            float* dsr = ds + r * nk;
            const float* pr = s + r * nk;
            for (int64_t x = 0; x < nk; ++x) dsr[x] = pr[x] * (dsr[x] - d);
          }
          const MatView pt = tile_operand(*isa, p, s, mq * nk, nk, pb).t();
          const MatView dst = tile_operand(*isa, p, ds, mq * nk, nk, dsb);
          ctx.gemm(worker, nk, p.Dv, mq, 1.0f, pt, doi, dv_j, true, Work::kAttention);
          ctx.gemm(worker, nk, p.Dk, mq, p.scale, dst.t(), qi, dk_j, true, Work::kAttention);
          ctx.gemm(worker, mq, p.Dk, nk, p.scale, dst, kj,
                   f32_out(dq_c + ((b * p.S + i * bs) * p.N + n) * p.Dk, p.N * p.Dk), true, Work::kAttention);
        }
      }
    }
  });
  if (chunks > 1) {  // the chunks' copies of dq, summed into the first
    constexpr int64_t kSpan = 1 << 16;
    ctx.run((dq_size + kSpan - 1) / kSpan, [&](int64_t item, int) {
      const int64_t lo = item * kSpan, hi = std::min(dq_size, lo + kSpan);
      for (int64_t c = 1; c < chunks; ++c) {
        const float* part = dq_parts + (c - 1) * dq_size;
        for (int64_t x = lo; x < hi; ++x) dq_out[x] += part[x];
      }
    });
  }
  return ffi::Error::Success();
}

}  // namespace ktjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxAttentionForward, ktjax::attention_forward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // k
                                  .Arg<xla::ffi::AnyBuffer>()  // v
                                  .Arg<xla::ffi::AnyBuffer>()  // segment_ids
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("block")
                                  .Ret<xla::ffi::AnyBuffer>()    // out
                                  .Ret<xla::ffi::AnyBuffer>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxAttentionBackward, ktjax::attention_backward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // k
                                  .Arg<xla::ffi::AnyBuffer>()  // v
                                  .Arg<xla::ffi::AnyBuffer>()  // segment_ids
                                  .Arg<xla::ffi::AnyBuffer>()  // lse
                                  .Arg<xla::ffi::AnyBuffer>()  // dout
                                  .Arg<xla::ffi::AnyBuffer>()  // delta
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("block")
                                  .Ret<xla::ffi::AnyBuffer>()    // dq
                                  .Ret<xla::ffi::AnyBuffer>()    // dk
                                  .Ret<xla::ffi::AnyBuffer>());  // dv
