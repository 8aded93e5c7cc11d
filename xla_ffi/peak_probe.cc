#include "peak_probe.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "gemm.h"

namespace ktjax {

double measure_peak_gflops(int threads, double seconds, bool bf16_pairs) {
  const Isa* isa = select_isa();
  if (isa == nullptr || threads < 1 || (bf16_pairs && isa->pair_kernel == nullptr)) return 0.0;
  // f32: kc steps of one value; pairs: kc steps of two (the same 4 bytes per step and element).
  constexpr int64_t kc = 128, mr = 6;  // panels of 3 + 16 KiB: L1-resident
  const int64_t values_per_step = bf16_pairs ? 2 : 1;
  std::vector<double> gflops(threads, 0.0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::vector<float> a(kc * mr, 0.5f), b(kc * isa->nr, 0.25f), c(mr * isa->nr, 0.0f);
      // 0x3f003f00: two bf16 0.5; 0x3e803e80: two bf16 0.25
      std::vector<uint32_t> a2(kc * mr, 0x3f003f00u), b2(kc * isa->nr, 0x3e803e80u);
      float* rows[mr];
      for (int i = 0; i < mr; ++i) rows[i] = c.data() + i * isa->nr;
      const auto start = std::chrono::steady_clock::now();
      int64_t calls = 0;
      double elapsed = 0.0;
      do {
        for (int rep = 0; rep < 256; ++rep, ++calls) {
          if (bf16_pairs) isa->pair_kernel(kc, a2.data(), b2.data(), rows, mr, isa->nr, 1.0f, true);
          else isa->kernel(kc, a.data(), b.data(), rows, mr, isa->nr, 1.0f, true);
        }
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      } while (elapsed < seconds);
      gflops[t] = 2.0 * mr * isa->nr * kc * values_per_step * calls / elapsed / 1e9;
    });
  }
  for (auto& th : pool) th.join();
  double total = 0.0;
  for (double g : gflops) total += g;
  return total;
}

double measure_read_bandwidth_gbs(int threads, int64_t bytes, int passes) {
  if (threads < 1 || passes < 1) return 0.0;
  using Clock = std::chrono::steady_clock;
  constexpr int kLanes = 8;  // independent sums, so that the loop waits on memory, not on adds
  const int64_t words = std::max<int64_t>(bytes / 8 / threads / kLanes, 1) * kLanes;  // per thread
  std::unique_ptr<uint64_t[]> data(new uint64_t[words * threads]);
  std::vector<Clock::time_point> finish(threads);
  std::atomic<int> ready{0}, pass{-1};
  std::atomic<uint64_t> sink{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      uint64_t* mine = data.get() + t * words;
      for (int64_t i = 0; i < words; ++i) mine[i] = static_cast<uint64_t>(i);  // first touch: local pages
      for (int p = 0; p < passes; ++p) {
        ready.fetch_add(1);
        while (pass.load() < p) std::this_thread::yield();  // the main thread starts every pass
        uint64_t sum[kLanes] = {};
        for (int64_t i = 0; i < words; i += kLanes) {
          for (int l = 0; l < kLanes; ++l) sum[l] += mine[i + l];
        }
        finish[t] = Clock::now();
        uint64_t s = 0;
        for (uint64_t v : sum) s += v;
        sink.fetch_add(s);  // a side effect, so that the sums are not optimised away
      }
    });
  }
  double best = 0.0;
  for (int p = 0; p < passes; ++p) {
    while (ready.load() < threads * (p + 1)) std::this_thread::yield();
    const Clock::time_point start = Clock::now();
    pass.store(p);
    // Wait for this pass to end: every thread is ready for the next one, or (last pass) joined.
    if (p + 1 < passes) {
      while (ready.load() < threads * (p + 2)) std::this_thread::yield();
    } else {
      for (auto& th : pool) th.join();
    }
    const Clock::time_point end = *std::max_element(finish.begin(), finish.end());
    const double seconds = std::chrono::duration<double>(end - start).count();
    if (seconds > 0) best = std::max(best, 8.0 * words * threads / seconds / 1e9);
  }
  return best;
}

}  // namespace ktjax
