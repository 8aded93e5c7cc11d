#include "moe_problem.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include <sys/mman.h>

namespace ktjax {
std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

int64_t MoeProblem::max_rank() const {
  return std::max({lora[0].rank, lora[1].rank, lora[2].rank});
}

ffi::Error float_dtype(const char* name, const ffi::AnyBuffer& b, DType* out) {
  switch (b.element_type()) {
    case ffi::DataType::F32: *out = DType::kF32; return ffi::Error::Success();
    case ffi::DataType::BF16: *out = DType::kBF16; return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(std::string(name) + " must be bfloat16 or float32");
  }
}

ffi::Error expect_shape(const char* name, const ffi::AnyBuffer& b, std::initializer_list<int64_t> dims,
                        const char* doc) {
  auto d = b.dimensions();
  if (d.size() == dims.size() && std::equal(dims.begin(), dims.end(), d.begin())) {
    return ffi::Error::Success();
  }
  std::string want = "[";
  int i = 0;
  for (int64_t v : dims) want += (i++ ? ", " : "") + std::to_string(v);
  return ffi::Error::InvalidArgument(std::string(name) + " must have shape " + doc + " = " + want +
                                     "], got " + dims_str(d));
}

ffi::Error expect_output(const char* name, const ffi::AnyBuffer& b, bool needed,
                         std::initializer_list<int64_t> dims) {
  if (!needed) {
    if (b.element_count() == 0) return ffi::Error::Success();
    return ffi::Error::InvalidArgument(std::string(name) +
                                       " is not requested, so it must be an empty array, got " +
                                       dims_str(b.dimensions()));
  }
  return expect_shape(name, b, dims, "(requested gradient)");
}

namespace {

// The projections named in the `adapters` attribute ("gate,down"): each known, in projection order.
ffi::Error parse_adapter_names(std::string_view names, bool present[3]) {
  int next = 0;
  while (!names.empty()) {
    const size_t comma = names.find(',');
    const std::string_view name = names.substr(0, comma);
    int j = next;
    while (j < 3 && name != kProjNames[j]) ++j;
    if (j == 3) {
      return ffi::Error::InvalidArgument("adapters must list gate, up, down in that order, comma-separated; got '" +
                                         std::string(name) + "'");
    }
    present[j] = true;
    next = j + 1;
    names = comma == std::string_view::npos ? std::string_view() : names.substr(comma + 1);
  }
  return ffi::Error::Success();
}

// One projection's entry of the `quant` attribute.
struct QuantSpec {
  bool present = false;
  QuantFormat format = QuantFormat::kInt8;
  int64_t group = 0, block_cols = 0;  // int4: G; fp8: B0, B1
};

// Splits `s` at the first `sep`: returns the part before, leaves the rest in s.
std::string_view take(std::string_view& s, char sep) {
  const size_t at = s.find(sep);
  const std::string_view head = s.substr(0, at);
  s = at == std::string_view::npos ? std::string_view() : s.substr(at + 1);
  return head;
}

bool positive_int(std::string_view s, int64_t* out) {
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && end == s.data() + s.size() && *out > 0;
}

// The `quant` attribute: comma-separated entries in projection order, "gate:int8", "up:int4:G" or
// "down:fp8:B0:B1" (G columns per int4 group; B0 x B1 blocks of fp8 scales).
ffi::Error parse_quant_specs(std::string_view attr, QuantSpec specs[3]) {
  int next = 0;
  while (!attr.empty()) {
    std::string_view entry = take(attr, ',');
    const std::string whole(entry);
    const std::string_view proj = take(entry, ':'), format = take(entry, ':');
    int j = next;
    while (j < 3 && proj != kProjNames[j]) ++j;
    QuantSpec& q = specs[j < 3 ? j : 0];
    bool ok = j < 3;
    if (ok && format == "int8") {
      q.format = QuantFormat::kInt8;
      ok = entry.empty();
    } else if (ok && format == "int4") {
      q.format = QuantFormat::kInt4;
      ok = positive_int(take(entry, ':'), &q.group) && entry.empty();
    } else if (ok && format == "fp8") {
      q.format = QuantFormat::kFp8;
      ok = positive_int(take(entry, ':'), &q.group) && positive_int(take(entry, ':'), &q.block_cols) &&
           entry.empty();
    } else {
      ok = false;
    }
    if (!ok) {
      return ffi::Error::InvalidArgument("quant must list gate, up, down in that order as proj:int8, proj:int4:G "
                                         "or proj:fp8:B0:B1; got '" + whole + "'");
    }
    q.present = true;
    next = j + 1;
  }
  return ffi::Error::Success();
}

// Checks a quantized projection's data and scales against its spec and fills w.
ffi::Error parse_quantized(const QuantSpec& q, int j, const ffi::AnyBuffer& data, const ffi::AnyBuffer& scales,
                           int64_t E, int64_t rows, int64_t cols, Stacked* w) {
  const std::string name = kProjNames[j];
  const std::string scales_name = name + " scales";
  QuantWeight& qw = w->quant;
  qw = QuantWeight{q.format, static_cast<const uint8_t*>(data.untyped_data()),
                   scales.untyped_data(), rows, cols, q.group, q.block_cols};
  w->dtype = DType::kQuant;
  w->rows = rows;
  w->cols = cols;
  w->quant_data_stride = rows * qw.data_ld();
  // the scales' dtype: checked after the data's, which names the format mismatch first
  const auto scales_dtype = [&]() -> ffi::Error {
    const bool bf16_scales = q.format == QuantFormat::kInt4;
    if (scales.element_type() == (bf16_scales ? ffi::DataType::BF16 : ffi::DataType::F32)) {
      return ffi::Error::Success();
    }
    return ffi::Error::InvalidArgument(scales_name + (bf16_scales ? " must be bfloat16" : " must be float32"));
  };
  switch (q.format) {
    case QuantFormat::kInt8:
      if (data.element_type() != ffi::DataType::S8) return ffi::Error::InvalidArgument(name + " must be int8");
      if (auto e = expect_shape(name.c_str(), data, {E, rows, cols}, "[E, out, in]"); e.failure()) return e;
      if (auto e = scales_dtype(); e.failure()) return e;
      w->quant_scales_stride = rows * qw.scale_bytes();
      return expect_shape(scales_name.c_str(), scales, {E, rows}, "[E, out]");
    case QuantFormat::kInt4: {
      if (data.element_type() != ffi::DataType::U8) return ffi::Error::InvalidArgument(name + " must be uint8");
      if (auto e = expect_shape(name.c_str(), data, {E, rows, (cols + 1) / 2}, "[E, out, ceil(in / 2)]");
          e.failure()) {
        return e;
      }
      if (auto e = scales_dtype(); e.failure()) return e;
      const int64_t groups = (cols + q.group - 1) / q.group;
      w->quant_scales_stride = rows * groups * 2 * qw.scale_bytes();
      return expect_shape(scales_name.c_str(), scales, {E, rows, groups, 2}, "[E, out, ceil(in / G), 2]");
    }
    case QuantFormat::kFp8: {
      if (data.element_type() != ffi::DataType::F8E4M3FN) {
        return ffi::Error::InvalidArgument(name + " must be float8_e4m3fn");
      }
      if (auto e = expect_shape(name.c_str(), data, {E, rows, cols}, "[E, out, in]"); e.failure()) return e;
      if (auto e = scales_dtype(); e.failure()) return e;
      const int64_t br = (rows + q.group - 1) / q.group, bc = (cols + q.block_cols - 1) / q.block_cols;
      w->quant_scales_stride = br * bc * qw.scale_bytes();
      return expect_shape(scales_name.c_str(), scales, {E, br, bc}, "[E, ceil(out / B0), ceil(in / B1)]");
    }
  }
  return ffi::Error::Success();
}

// The base weights gate, up, down: each a float weight (all of one dtype) or quantized as its spec says,
// its scales read from `more` from index `next_scales` on.
ffi::Error parse_weights(const ffi::AnyBuffer* const w[3], const QuantSpec specs[3], const ffi::RemainingArgs& more,
                         size_t next_scales, MoeProblem* p) {
  const int64_t E = p->E, H = p->H, I = p->I;
  const int64_t out_dim[3] = {I, I, H}, in_dim[3] = {H, H, I};
  static const char* docs[3] = {"[E, I, H]", "[E, I, H]", "[E, H, I]"};
  std::optional<DType> float_weights;  // the one dtype of the projections that are not quantized
  for (int j = 0; j < 3; ++j) {
    if (specs[j].present) {
      auto scales = more.get<ffi::AnyBuffer>(next_scales++);
      if (scales.has_error()) return scales.error();
      if (auto e = parse_quantized(specs[j], j, *w[j], *scales, E, out_dim[j], in_dim[j], &p->w[j]); e.failure()) {
        return e;
      }
      continue;
    }
    if (auto e = expect_shape(kProjNames[j], *w[j], {E, out_dim[j], in_dim[j]}, docs[j]); e.failure()) return e;
    if (auto e = float_dtype(kProjNames[j], *w[j], &p->w[j].dtype); e.failure()) return e;
    if (float_weights && *float_weights != p->w[j].dtype) {
      return ffi::Error::InvalidArgument("gate, up and down must share one dtype (quantized ones aside)");
    }
    float_weights = p->w[j].dtype;
    p->w[j].data = w[j]->untyped_data();
    p->w[j].rows = out_dim[j];
    p->w[j].cols = in_dim[j];
  }
  return ffi::Error::Success();
}

ffi::Error parse_adapter(const ffi::AnyBuffer& A, const ffi::AnyBuffer& B, int j, int64_t E, int64_t out_dim,
                         int64_t in_dim, Lora* l) {
  static const char* a_names[3] = {"lora['gate'] A", "lora['up'] A", "lora['down'] A"};
  static const char* b_names[3] = {"lora['gate'] B", "lora['up'] B", "lora['down'] B"};
  if (A.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument(std::string(a_names[j]) + " must have shape [E, r, in], got " +
                                       dims_str(A.dimensions()));
  }
  const int64_t r = A.dimensions()[1];
  if (auto e = expect_shape(a_names[j], A, {E, r, in_dim}, "[E, r, in]"); e.failure()) return e;
  if (auto e = expect_shape(b_names[j], B, {E, out_dim, r}, "[E, out, r]"); e.failure()) return e;
  DType a_dtype, b_dtype;
  if (auto e = float_dtype(a_names[j], A, &a_dtype); e.failure()) return e;
  if (auto e = float_dtype(b_names[j], B, &b_dtype); e.failure()) return e;
  l->rank = r;
  l->A = {A.untyped_data(), a_dtype, r, in_dim};
  l->B = {B.untyped_data(), b_dtype, out_dim, r};
  return ffi::Error::Success();
}

}  // namespace

ffi::Error parse_problem(const ffi::AnyBuffer& x, const ffi::AnyBuffer& ids, const ffi::AnyBuffer& weights,
                         const ffi::AnyBuffer& gate, const ffi::AnyBuffer& up, const ffi::AnyBuffer& down,
                         const ffi::RemainingArgs& more, float lora_scale, std::string_view adapters,
                         std::string_view quant, std::string_view intermediates, MoeProblem* p) {
  if (x.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("x must have shape [T, H], got " + dims_str(x.dimensions()));
  }
  if (ids.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("topk_ids must have shape [T, K], got " +
                                       dims_str(ids.dimensions()));
  }
  if (gate.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument("gate must have shape [E, I, H], got " +
                                       dims_str(gate.dimensions()));
  }
  p->T = x.dimensions()[0];
  p->H = x.dimensions()[1];
  p->K = ids.dimensions()[1];
  p->E = gate.dimensions()[0];
  p->I = gate.dimensions()[1];
  const int64_t T = p->T, H = p->H, K = p->K, E = p->E, I = p->I;
  if (auto e = float_dtype("x", x, &p->x_dtype); e.failure()) return e;
  if (ids.element_type() != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument("topk_ids must be int32");
  }
  if (weights.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("topk_weights must be float32");
  }
  if (auto e = expect_shape("topk_ids", ids, {T, K}, "[T, K]"); e.failure()) return e;
  if (auto e = expect_shape("topk_weights", weights, {T, K}, "[T, K]"); e.failure()) return e;
  if (!parse_intermediates(intermediates, &p->intermediates)) {
    return ffi::Error::InvalidArgument("intermediates must be f32 or bf16, got '" + std::string(intermediates) + "'");
  }
  QuantSpec specs[3];
  if (auto e = parse_quant_specs(quant, specs); e.failure()) return e;
  bool adapted[3] = {false, false, false};
  if (auto e = parse_adapter_names(adapters, adapted); e.failure()) return e;
  const size_t n_adapters = adapted[0] + adapted[1] + adapted[2];
  const size_t expected = 2 * n_adapters + specs[0].present + specs[1].present + specs[2].present;
  if (more.size() != expected) {
    return ffi::Error::InvalidArgument("adapters '" + std::string(adapters) + "' and quant '" + std::string(quant) +
                                       "' need " + std::to_string(expected) +
                                       " more arrays (A, B of each adapter, then scales), got " +
                                       std::to_string(more.size()));
  }
  const ffi::AnyBuffer* w[3] = {&gate, &up, &down};
  if (auto e = parse_weights(w, specs, more, 2 * n_adapters, p); e.failure()) return e;
  if (!std::isfinite(lora_scale)) {
    return ffi::Error::InvalidArgument("lora_scale must be finite");
  }
  p->lora_scale = lora_scale;
  if (p->bf16_intermediates() && p->x_dtype != DType::kBF16) {
    return ffi::Error::InvalidArgument("intermediates='bf16' needs bf16 tokens x");
  }
  const int64_t out_dim[3] = {I, I, H}, in_dim[3] = {H, H, I};
  for (int j = 0, next = 0; j < 3; ++j) {
    if (!adapted[j]) continue;
    auto A = more.get<ffi::AnyBuffer>(next++);
    auto B = more.get<ffi::AnyBuffer>(next++);
    if (A.has_error()) return A.error();
    if (B.has_error()) return B.error();
    if (auto e = parse_adapter(*A, *B, j, E, out_dim[j], in_dim[j], &p->lora[j]); e.failure()) return e;
  }
  p->x = x.untyped_data();
  p->ids = static_cast<const int32_t*>(ids.untyped_data());
  p->weights = static_cast<const float*>(weights.untyped_data());
  return ffi::Error::Success();
}

namespace {

void poison_if_debug(ffi::AnyBuffer b) {
  const char* env = std::getenv("KTJAX_DEBUG_POISON");
  if (!env || std::strcmp(env, "1") != 0) return;
  const size_t n = b.element_count();
  if (b.element_type() == ffi::DataType::F32) {
    std::fill_n(static_cast<float*>(b.untyped_data()), n, std::numeric_limits<float>::quiet_NaN());
  } else if (b.element_type() == ffi::DataType::BF16) {
    std::fill_n(static_cast<uint16_t*>(b.untyped_data()), n, uint16_t{0x7fc0});
  }
}

void prefer_huge_pages(ffi::AnyBuffer b) {
#ifdef MADV_HUGEPAGE
  const char* env = std::getenv("KTJAX_HUGE_PAGES");
  if (env && std::strcmp(env, "0") == 0) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto start = reinterpret_cast<uintptr_t>(b.untyped_data());
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1), hi = (start + b.size_bytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: errors change nothing
#endif
}

}  // namespace

void prepare_output(ffi::AnyBuffer b) {
  prefer_huge_pages(b);
  poison_if_debug(b);
}

}  // namespace ktjax
