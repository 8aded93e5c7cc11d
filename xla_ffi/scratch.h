// Scratch memory reused across kernel calls.
//
// A kernel call needs tens of MB of f32 intermediates at real shapes (pre-activations, hidden
// activations, their gradients, packing panels). Allocating them per call costs page faults and the
// kernel's page zeroing every time. Instead a call borrows buffers
// from one process-wide pool for its duration (`Scratch`), and the next call reuses them: after the
// first step of a training loop no kernel call allocates. The pool holds at most what the largest
// concurrent calls needed; `release_idle()` frees what no call is using (ktjax.ffi.release_scratch).
//
// Like the work counters (stats.h), the pool is global state beside XLA's thread pool, guarded by a
// mutex taken once per buffer, never in a loop over tokens or experts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ktjax {

struct ScratchStats {
  int64_t held_bytes;  // idle + in use
  int64_t peak_bytes;  // the most ever held at once
  int64_t allocations;  // buffers ever allocated (stays flat once calls reuse them)
};

// Borrows buffers for one kernel call; returns them to the pool when destroyed.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch();

  // `n` floats, 64-byte aligned, uninitialised (NaN-filled when KTJAX_DEBUG_POISON=1, so that reading
  // scratch before writing it fails the tests). Valid until the Scratch is destroyed.
  float* floats(int64_t n);

 private:
  struct Buffer {
    float* data;
    size_t capacity;  // floats
  };
  std::vector<Buffer> taken_;
};

ScratchStats scratch_stats();
// Frees every buffer no call is using; returns the bytes freed.
int64_t release_idle_scratch();

}  // namespace ktjax
