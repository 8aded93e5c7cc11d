#include "scratch.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>

namespace ktjax {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kMaxIdle = 32;  // idle buffers kept; beyond that the smallest is freed

struct Pool {
  std::mutex mu;
  std::vector<std::pair<float*, size_t>> idle;  // (data, capacity in floats)
  int64_t held_bytes = 0, peak_bytes = 0, allocations = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: kernel calls may run during process teardown
  return *p;
}

bool poison() {
  const char* env = std::getenv("KTJAX_DEBUG_POISON");
  return env && std::strcmp(env, "1") == 0;
}

}  // namespace

float* Scratch::floats(int64_t n) {
  const size_t want = static_cast<size_t>(std::max<int64_t>(n, 1));
  Pool& p = pool();
  float* data = nullptr;
  size_t capacity = 0;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    // Best fit: the smallest idle buffer that is large enough.
    auto best = p.idle.end();
    for (auto it = p.idle.begin(); it != p.idle.end(); ++it) {
      if (it->second >= want && (best == p.idle.end() || it->second < best->second)) best = it;
    }
    if (best != p.idle.end()) {
      data = best->first;
      capacity = best->second;
      p.idle.erase(best);
    }
  }
  if (data == nullptr) {
    capacity = (want * sizeof(float) + kAlign - 1) / kAlign * kAlign / sizeof(float);
    data = static_cast<float*>(std::aligned_alloc(kAlign, capacity * sizeof(float)));
    if (data == nullptr) throw std::bad_alloc();
    std::lock_guard<std::mutex> lock(p.mu);
    p.held_bytes += static_cast<int64_t>(capacity * sizeof(float));
    p.peak_bytes = std::max(p.peak_bytes, p.held_bytes);
    ++p.allocations;
  }
  if (poison()) std::fill_n(data, want, std::numeric_limits<float>::quiet_NaN());
  taken_.push_back({data, capacity});
  return data;
}

Scratch::~Scratch() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  for (const Buffer& b : taken_) p.idle.emplace_back(b.data, b.capacity);
  while (p.idle.size() > kMaxIdle) {
    auto smallest = std::min_element(p.idle.begin(), p.idle.end(),
                                     [](const auto& a, const auto& b) { return a.second < b.second; });
    p.held_bytes -= static_cast<int64_t>(smallest->second * sizeof(float));
    std::free(smallest->first);
    p.idle.erase(smallest);
  }
}

ScratchStats scratch_stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return {p.held_bytes, p.peak_bytes, p.allocations};
}

int64_t release_idle_scratch() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  int64_t freed = 0;
  for (const auto& [data, capacity] : p.idle) {
    freed += static_cast<int64_t>(capacity * sizeof(float));
    std::free(data);
  }
  p.idle.clear();
  p.held_bytes -= freed;
  return freed;
}

}  // namespace ktjax
