// pybind11 module `ktjax._ktjax_ffi`: FFI handler capsules for jax.ffi.register_ffi_target, the op's
// contract (moe_contract.h) and the FFI API version the kernels were built against; the CPU's ISAs,
// the work counters, the kernels' elementwise code for the tests, and the machine probes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "attention.h"
#include "gemm.h"
#include "moe_backward.h"
#include "moe_contract.h"
#include "moe_forward.h"
#include "peak_probe.h"
#include "scratch.h"
#include "stats.h"
#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

namespace {

template <typename T>
py::capsule encapsulate(T* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// The kernel set the next call uses; ValueError when KTJAX_ISA names one this CPU or build cannot run.
const ktjax::Isa& selected_isa_or_throw() {
  const ktjax::Isa* isa = ktjax::select_isa();
  if (isa == nullptr) throw std::invalid_argument("KTJAX_ISA names an ISA this CPU or build cannot run");
  return *isa;
}

template <size_t N>
py::tuple names(const char* const (&list)[N]) {
  py::tuple t(N);
  for (size_t i = 0; i < N; ++i) t[i] = list[i];
  return t;
}

// The FFI handlers, the contract Python builds its calls from, and the FFI API version.
void def_handlers(py::module_& m) {
  m.def("registrations", []() {
    py::dict d;
    d["ktjax_moe_forward"] = encapsulate(KtjaxMoeForward);
    d["ktjax_moe_backward"] = encapsulate(KtjaxMoeBackward);
    d["ktjax_attention_forward"] = encapsulate(KtjaxAttentionForward);
    d["ktjax_attention_backward"] = encapsulate(KtjaxAttentionBackward);
    return d;
  });
  m.def("ffi_api_version", []() { return py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); },
        "(major, minor) of the XLA FFI API the extension was compiled against.");
  m.def("moe_contract", []() {
    py::dict d;
    d["projections"] = names(ktjax::kProjNames);
    d["problem_args"] = names(ktjax::kProblemArgNames);
    d["backward_lead_args"] = names(ktjax::kBackwardLeadArgNames);
    d["forward_results"] = names(ktjax::kForwardResultNames);
    d["grads"] = names(ktjax::kGradNames);  // bit i of `needs` and backward result i
    d["intermediates"] = names(ktjax::kIntermediatesNames);
    d["quant_formats"] = names(ktjax::kQuantFormatNames);
    return d;
  }, "The expert op's arguments, results, `needs` bits and intermediates modes (moe_contract.h).");
}

// ISA selection and the kernels' elementwise code, for the tests.
void def_isa_and_elementwise(py::module_& m) {
  m.def("available_isas", []() { return std::string(ktjax::available_isas()); });
  m.def("selected_isa", []() {
    const ktjax::Isa* isa = ktjax::select_isa();
    return isa ? std::string(isa->name) : std::string();
  }, "The micro-kernel the next call will use (honours KTJAX_ISA); '' if KTJAX_ISA is unusable.");
  m.def("round_to_bf16", [](F32Array src) {
    const ktjax::Isa& isa = selected_isa_or_throw();
    py::array_t<uint16_t> dst(src.size());
    ktjax::store_row(isa, src.data(), dst.mutable_data(), ktjax::DType::kBF16, src.size());
    return dst;
  }, "bf16 bit patterns of a float32 array, rounded as the kernels round their outputs (selected ISA).");
  m.def("silu_mul", [](F32Array g, F32Array u) {
    const ktjax::Isa& isa = selected_isa_or_throw();
    if (u.size() != g.size()) throw std::invalid_argument("g and u must have the same size");
    F32Array h(g.size());
    isa.silu_mul(g.data(), u.data(), h.mutable_data(), g.size());
    return h;
  }, "silu(g) * u of two float32 arrays (flattened), as the kernels compute it (selected ISA).");
  m.def("silu_mul_grad", [](F32Array g, F32Array u, F32Array dh, float w) {
    const ktjax::Isa& isa = selected_isa_or_throw();
    if (u.size() != g.size() || dh.size() != g.size()) {
      throw std::invalid_argument("g, u and dh must have the same size");
    }
    F32Array dg(g.size()), du(g.size());
    isa.silu_mul_grad(g.data(), u.data(), dh.data(), w, dg.mutable_data(), du.mutable_data(), g.size());
    return py::make_tuple(dg, du);
  }, "(dg, du) of h = silu(g) * u for the upstream gradient w * dh, as the kernels compute them.");
  m.def("dequantize", [](const std::string& format, py::array_t<uint8_t, py::array::c_style> data,
                         py::array_t<uint8_t, py::array::c_style> scales, int64_t rows, int64_t cols, int64_t group,
                         int64_t block_cols) {
    ktjax::QuantWeight q;
    if (format == "int8") {
      q.format = ktjax::QuantFormat::kInt8;
    } else if (format == "int4") {
      q.format = ktjax::QuantFormat::kInt4;
    } else if (format == "fp8") {
      q.format = ktjax::QuantFormat::kFp8;
    } else {
      throw std::invalid_argument("format must be int8, int4 or fp8");
    }
    q.data = data.data();
    q.scales = scales.data();
    q.rows = rows;
    q.cols = cols;
    q.group = group;
    q.block_cols = block_cols;
    const auto misfit = [] {
      return std::invalid_argument("data, scales, rows, cols, group and block_cols do not fit the format");
    };
    if (rows < 1 || cols < 1 || group < 0 || block_cols < 0 || (format != "int8" && group < 1) ||
        (format == "fp8" && block_cols < 1)) {
      throw misfit();
    }
    const int64_t scale_count = format == "int8"   ? rows
                                : format == "int4" ? rows * ((cols + group - 1) / group) * 2
                                                   : ((rows + group - 1) / group) * ((cols + block_cols - 1) / block_cols);
    if (data.size() != rows * q.data_ld() || scales.size() != scale_count * q.scale_bytes()) throw misfit();
    F32Array out({rows, cols});
    const ktjax::Isa* isa = ktjax::select_isa();
    if (isa == nullptr) throw std::invalid_argument("KTJAX_ISA names an ISA this CPU or build lacks");
    for (int64_t r = 0; r < rows; ++r) isa->dequant_row(q, r, 0, cols, 1.0f, out.mutable_data() + r * cols);
    return out;
  }, "A quantized weight [rows, cols] (one expert, layouts in quant.h; data and scales as bytes) dequantized as "
     "the selected ISA's kernels do.");
}

// Machine probes for the benchmark: peak GEMM rate and memory read bandwidth.
void def_probes(py::module_& m) {
  m.def("measure_peak_gflops", &ktjax::measure_peak_gflops, py::arg("threads"), py::arg("seconds") = 0.5,
        py::arg("bf16_pairs") = false,
        "GFLOP/s of the selected micro-kernel on L1-resident data, summed over threads: f32, or with "
        "bf16_pairs the bf16 pair kernel (vdpbf16ps; 0 where the selected ISA has none).");
  m.def("measure_read_bandwidth_gbs", [](int threads, int64_t n_bytes, int passes) {
    if (threads < 1 || n_bytes < 1 || passes < 1) {
      throw std::invalid_argument("threads, n_bytes and passes must be positive");
    }
    py::gil_scoped_release release;
    return ktjax::measure_read_bandwidth_gbs(threads, n_bytes, passes);
  }, py::arg("threads"), py::arg("n_bytes"), py::arg("passes"),
        "GB/s at which `threads` threads together read a buffer of n_bytes from memory (best pass).");
}

// Work counters and the scratch pool.
void def_counters(py::module_& m) {
  m.def("counters", []() {
    py::dict d;
    auto& s = ktjax::stats();
    for (int i = 0; i < static_cast<int>(ktjax::Work::kCount); ++i) {
      d[ktjax::kWorkNames[i]] = s.flops[i].load();
    }
    d["forward_calls"] = s.forward_calls.load();
    d["backward_calls"] = s.backward_calls.load();
    d["small_batch_flops"] = s.small_batch_flops.load();
    d["packed_once_flops"] = s.packed_once_flops.load();
    d["bf16_pair_flops"] = s.bf16_pair_flops.load();
    const ktjax::ScratchStats scratch = ktjax::scratch_stats();
    d["scratch_bytes"] = scratch.held_bytes;
    d["scratch_peak_bytes"] = scratch.peak_bytes;
    d["scratch_allocations"] = scratch.allocations;
    return d;
  }, "GEMM FLOPs per kind of work, call counts since start (or the last reset), and the scratch pool: "
     "bytes held, most bytes ever held, buffers ever allocated.");
  m.def("path_flops", []() {
    py::dict d;
    auto& s = ktjax::stats();
    for (int i = 0; i < static_cast<int>(ktjax::GemmPath::kCount); ++i) {
      d[ktjax::kGemmPathNames[i]] = s.path_flops[i].load();
    }
    return d;
  }, "GEMM FLOPs per path of the GEMM driver (every path, in the driver's order), since start or reset.");
  m.def("release_scratch", &ktjax::release_idle_scratch,
        "Frees the kernels' idle scratch buffers; returns the bytes freed.");
  m.def("reset_counters", []() {
    auto& s = ktjax::stats();
    for (auto& f : s.flops) f.store(0);
    s.forward_calls.store(0);
    s.backward_calls.store(0);
    s.small_batch_flops.store(0);
    s.packed_once_flops.store(0);
    s.bf16_pair_flops.store(0);
    for (auto& f : s.path_flops) f.store(0);
  });
}

}  // namespace

PYBIND11_MODULE(_ktjax_ffi, m) {
  m.doc() = "ktjax CPU expert kernels (XLA FFI handlers)";
  def_handlers(m);
  def_isa_and_elementwise(m);
  def_probes(m);
  def_counters(m);
}
