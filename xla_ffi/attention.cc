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
  // The rows of key block j of group g of sequence b (k, v).
  MatView k_rows(int64_t b, int64_t j, int64_t g) const { return view(k, ((b * S + j * block) * G + g) * Dk, G * Dk); }
  MatView v_rows(int64_t b, int64_t j, int64_t g) const { return view(v, ((b * S + j * block) * G + g) * Dv, G * Dv); }
  // The rows of query block i of every head of group g of sequence b, head by head (R * rows(i) rows:
  // head g R + r's query s at row r rows(i) + s), from a [B, S, N, width] buffer: `rows` (written by
  // group_rows) holds each one's row of that buffer counted from the group's first head in sequence b.
  MatView group_rows(const void* base, int64_t b, int64_t g, int64_t width, const int32_t* rows) const {
    MatView m = view(base, (b * S * N + g * R) * width, width);
    m.rows = rows;
    return m;
  }
  OutView group_out(float* base, int64_t b, int64_t g, int64_t width, const int32_t* rows) const {
    return OutView{base + (b * S * N + g * R) * width, width, rows};
  }
  void group_rows(int64_t i, int32_t* rows) const {
    const int64_t mq = this->rows(i);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t s = 0; s < mq; ++s) rows[r * mq + s] = static_cast<int32_t>((i * block + s) * N + r);
    }
  }
  // Where the [B, N, S] statistics (lse, delta) of head g R + r's query i * block + s are.
  int64_t stat(int64_t b, int64_t g, int64_t r, int64_t i, int64_t s) const { return (b * N + g * R + r) * S + i * block + s; }

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

  // Sets the invisible scores of tile (i, j) of sequence b to -inf: s holds `heads` [rows(i), rows(j)]
  // tiles one after the other (the same positions for every head).
  void mask(int64_t b, int64_t i, int64_t j, float* s, int64_t heads) const {
    const int64_t mq = rows(i), nk = rows(j), k0 = j * block;
    const int32_t* seg_b = seg + b * S;
    for (int64_t r = 0; r < mq; ++r) {
      const int64_t pq = i * block + r;
      const int32_t sq = seg_b[pq];
      for (int64_t c = 0; c < nk; ++c) {
        const int64_t pk = k0 + c;
        const bool see = sq > 0 && seg_b[pk] == sq && pk <= pq && (!window || pq - pk < window);
        if (see) continue;
        for (int64_t h = 0; h < heads; ++h) s[(h * mq + r) * nk + c] = -kInf;
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
  if (p->S * p->N > std::numeric_limits<int32_t>::max()) {  // group_rows' row indices are int32
    return ffi::Error::InvalidArgument("q's S * N must be below 2^31, got " + dims_str(qd));
  }
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

// The scratch of one worker: the tiles of a query block's R heads against a key block, [R block, block]
// each: f32 scores or probabilities, their gradients (backward), the bf16 copies of both; R block rows
// of the running max and sum (forward) and of row indices (group_rows); the backward's three key-block
// operands packed once for all query blocks.
struct WorkerTiles {
  float* s;
  float* ds;
  uint16_t* pb;
  uint16_t* dsb;
  float* m;
  float* l;
  int32_t* rows;
  float* packed[3];

  static int64_t floats(const Isa& isa, const AttentionProblem& p) {
    const int64_t tile = p.R * p.block * p.block, rows = p.R * p.block;
    return 3 * tile + 3 * rows + packed_floats(isa, p);
  }
  static int64_t packed_floats(const Isa& isa, const AttentionProblem& p) {
    return packed_b_floats(isa, p.Dk, p.block) + packed_b_floats(isa, p.Dv, p.block) +
           packed_b_floats(isa, p.block, p.Dk);
  }
  WorkerTiles(const Isa& isa, const AttentionProblem& p, float* base) {
    const int64_t tile = p.R * p.block * p.block, n = p.R * p.block;
    s = base;
    ds = s + tile;
    pb = reinterpret_cast<uint16_t*>(ds + tile);
    dsb = pb + tile;
    m = ds + 2 * tile;
    l = m + n;
    rows = reinterpret_cast<int32_t*>(l + n);
    packed[0] = l + 2 * n;
    packed[1] = packed[0] + packed_b_floats(isa, p.Dk, p.block);
    packed[2] = packed[1] + packed_b_floats(isa, p.Dv, p.block);
  }
};

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
  const int64_t groups = p.B * p.G;
  KernelContext ctx(pool, *isa, WorkerTiles::floats(*isa, p));

  // Items (b, g, i): query block i of the R heads of group g, the last blocks (the most key blocks,
  // causal) first. The heads' rows make one operand, so each key block is packed once for all of them.
  ctx.run(groups * p.nb, [&](int64_t item, int worker) {
    const int64_t i = p.nb - 1 - item / groups, b = item % groups / p.G, g = item % p.G;
    const int64_t mq = p.rows(i), rows = p.R * mq;
    WorkerTiles w(*isa, p, ctx.tile(worker));
    p.group_rows(i, w.rows);
    const MatView qi = p.group_rows(p.q, b, g, p.Dk, w.rows);
    const OutView oi = p.group_out(o, b, g, p.Dv, w.rows);
    std::fill(w.m, w.m + rows, -kInf);
    std::fill(w.l, w.l + rows, 0.0f);
    for (int64_t x = 0; x < rows; ++x) std::fill(oi.row_ptr(x), oi.row_ptr(x) + p.Dv, 0.0f);
    for (int64_t j = p.first_key_block(i); j <= i; ++j) {
      const Tile t = p.classify(b, i, j);
      if (t == Tile::kSkip) continue;
      const int64_t nk = p.rows(j);
      ctx.gemm(worker, rows, nk, p.Dk, p.scale, qi, p.k_rows(b, j, g).t(), f32_out(w.s, nk), false,
               Work::kAttention);
      if (t == Tile::kMasked) p.mask(b, i, j, w.s, p.R);
      for (int64_t x = 0; x < rows; ++x) {
        float* row = w.s + x * nk;
        const float mx = isa->row_max(row, nk, w.m[x]);
        if (mx == -kInf) {  // nothing visible to this query yet
          std::fill(row, row + nk, 0.0f);
          continue;
        }
        const float corr = std::exp(w.m[x] - mx);
        w.l[x] = w.l[x] * corr + isa->exp_shift(row, mx, row, nk);
        w.m[x] = mx;
        if (corr != 1.0f) {
          for (float *y = oi.row_ptr(x), *end = y + p.Dv; y < end; ++y) *y *= corr;
        }
      }
      ctx.gemm(worker, rows, p.Dv, nk, 1.0f, tile_operand(*isa, p, w.s, rows * nk, nk, w.pb), p.v_rows(b, j, g),
               oi, true, Work::kAttention);
    }
    for (int64_t x = 0; x < rows; ++x) {
      float* row = oi.row_ptr(x);
      float& stat = ls[p.stat(b, g, x / mq, i, x % mq)];
      if (w.l[x] == 0.0f) {  // a query that sees nothing
        std::fill(row, row + p.Dv, 0.0f);
        stat = kInf;
        continue;
      }
      const float inv = 1.0f / w.l[x];
      for (int64_t d = 0; d < p.Dv; ++d) row[d] *= inv;
      stat = w.m[x] + std::log(w.l[x]);
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
  const int64_t groups = p.B * p.G, dq_size = p.B * p.S * p.N * p.Dk;
  KernelContext ctx(pool, *isa, WorkerTiles::floats(*isa, p));
  const int64_t chunks = std::clamp<int64_t>((2 * ctx.workers + groups - 1) / groups, 1, std::min<int64_t>(p.nb, 8));
  float* dq_parts = chunks > 1 ? ctx.alloc((chunks - 1) * dq_size) : nullptr;
  const bool bf16 = p.dtype == DType::kBF16;

  ctx.run(groups * chunks, [&](int64_t item, int worker) {
    const int64_t c = item % chunks, b = item / chunks / p.G, g = item / chunks % p.G;
    WorkerTiles w(*isa, p, ctx.tile(worker));
    float* dq_c = c == 0 ? dq_out : dq_parts + (c - 1) * dq_size;
    // This item's heads of dq (R * Dk consecutive values per row), zeroed before the blocks add to them.
    for (int64_t t = 0; t < p.S; ++t) {
      float* row = dq_c + ((b * p.S + t) * p.N + g * p.R) * p.Dk;
      std::fill(row, row + p.R * p.Dk, 0.0f);
    }
    for (int64_t j = c; j < p.nb; j += chunks) {
      const int64_t nk = p.rows(j);
      const OutView dk_j = f32_out(dk_out + ((b * p.S + j * p.block) * p.G + g) * p.Dk, p.G * p.Dk);
      const OutView dv_j = f32_out(dv_out + ((b * p.S + j * p.block) * p.G + g) * p.Dv, p.G * p.Dv);
      for (int64_t r = 0; r < nk; ++r) {
        std::fill(dk_j.row_ptr(r), dk_j.row_ptr(r) + p.Dk, 0.0f);
        std::fill(dv_j.row_ptr(r), dv_j.row_ptr(r) + p.Dv, 0.0f);
      }
      // Key block j's operands, packed once for every query block and head: K_j^T (scores), V_j^T (dP),
      // K_j (dq); as bf16 pairs where the tiles multiplying them are bf16 and the ISA has pairs.
      const MatView kj = p.k_rows(b, j, g), vj = p.v_rows(b, j, g);
      const PackedB kt = pack_b(*isa, p.Dk, nk, kj.t(), bf16, w.packed[0]);
      const PackedB vt = pack_b(*isa, p.Dv, nk, vj.t(), bf16, w.packed[1]);
      const PackedB kn = pack_b(*isa, nk, p.Dk, kj, bf16, w.packed[2]);
      for (int64_t i = j; i <= p.last_query_block(j); ++i) {
        const Tile t = p.classify(b, i, j);
        if (t == Tile::kSkip) continue;
        const int64_t mq = p.rows(i), rows = p.R * mq;
        p.group_rows(i, w.rows);
        const MatView qi = p.group_rows(p.q, b, g, p.Dk, w.rows);
        const MatView doi = p.group_rows(dout.untyped_data(), b, g, p.Dv, w.rows);
        gemm_packed(*isa, rows, p.scale, qi, kt, f32_out(w.s, nk), false, ctx.gemm_scratch(worker), Work::kAttention);
        if (t == Tile::kMasked) p.mask(b, i, j, w.s, p.R);
        for (int64_t x = 0; x < rows; ++x) {
          isa->exp_shift(w.s + x * nk, ls[p.stat(b, g, x / mq, i, x % mq)], w.s + x * nk, nk);
        }
        gemm_packed(*isa, rows, 1.0f, doi, vt, f32_out(w.ds, nk), false, ctx.gemm_scratch(worker), Work::kAttention);
        for (int64_t x = 0; x < rows; ++x) {
          const float d = dl[p.stat(b, g, x / mq, i, x % mq)];
          float* dsr = w.ds + x * nk;
          const float* pr = w.s + x * nk;
          for (int64_t y = 0; y < nk; ++y) dsr[y] = pr[y] * (dsr[y] - d);
        }
        const MatView pt = tile_operand(*isa, p, w.s, rows * nk, nk, w.pb).t();
        const MatView dst = tile_operand(*isa, p, w.ds, rows * nk, nk, w.dsb);
        ctx.gemm(worker, nk, p.Dv, rows, 1.0f, pt, doi, dv_j, true, Work::kAttention);
        ctx.gemm(worker, nk, p.Dk, rows, p.scale, dst.t(), qi, dk_j, true, Work::kAttention);
        gemm_packed(*isa, rows, p.scale, dst, kn, p.group_out(dq_c, b, g, p.Dk, w.rows), true,
                    ctx.gemm_scratch(worker), Work::kAttention);
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
