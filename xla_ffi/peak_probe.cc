#include "peak_probe.h"

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "gemm.h"

namespace ktjax {

double measure_peak_gflops(int threads, double seconds) {
  const Isa* isa = select_isa();
  if (isa == nullptr || threads < 1) return 0.0;
  constexpr int64_t kc = 128, mr = 6;  // panels of 3 + 16 KiB: L1-resident
  std::vector<double> gflops(threads, 0.0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::vector<float> a(kc * mr, 0.5f), b(kc * isa->nr, 0.25f), c(mr * isa->nr, 0.0f);
      float* rows[mr];
      for (int i = 0; i < mr; ++i) rows[i] = c.data() + i * isa->nr;
      const auto start = std::chrono::steady_clock::now();
      int64_t calls = 0;
      double elapsed = 0.0;
      do {
        for (int rep = 0; rep < 256; ++rep, ++calls) {
          isa->kernel(kc, a.data(), b.data(), rows, mr, isa->nr, 1.0f, true);
        }
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      } while (elapsed < seconds);
      gflops[t] = 2.0 * mr * isa->nr * kc * calls / elapsed / 1e9;
    });
  }
  for (auto& th : pool) th.join();
  double total = 0.0;
  for (double g : gflops) total += g;
  return total;
}

}  // namespace ktjax
