// parallel_for over XLA's own CPU thread pool (the FFI ThreadPool context).
//
// ktjax keeps no pool of its own: kernels borrow the intra-op pool XLA already runs, so the two never
// fight over cores. The calling thread always takes part, so the loop finishes even when every pool
// thread is busy; helpers that start late find no work left and return without touching the caller's
// stack (they only hold the shared counters alive).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ktjax {

// Number of workers a kernel call uses: KTJAX_NUM_THREADS if set (>= 1), else the size of XLA's pool.
inline int num_workers(xla::ffi::ThreadPool& pool) {
  if (const char* env = std::getenv("KTJAX_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  return static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
}

// Runs fn(item, worker) for item in [0, n) on up to `workers` threads; worker is in [0, workers).
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int workers, int64_t n, const F& fn) {
  if (n <= 0) return;
  workers = static_cast<int>(std::min<int64_t>(std::max(workers, 1), n));
  if (workers == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<int> next_worker{1};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  const F* body = &fn;
  auto drain = [st, n, body](int worker) {
    int64_t mine = 0;
    for (int64_t i; (i = st->next.fetch_add(1)) < n; ++mine) (*body)(i, worker);
    if (mine > 0 && st->done.fetch_add(mine) + mine == n) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  };
  for (int t = 1; t < workers; ++t) {
    pool.Schedule([st, drain]() { drain(st->next_worker.fetch_add(1)); });
  }
  drain(0);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

}  // namespace ktjax
