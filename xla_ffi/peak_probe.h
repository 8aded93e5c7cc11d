// Measured limits of this machine, for the benchmark's roofline: the compute peak of the selected
// micro-kernel (every thread on L1-resident panels) and the read bandwidth of main memory.
#pragma once

#include <cstdint>

namespace ktjax {

// GFLOP/s summed over `threads` threads, each running for about `seconds`.
double measure_peak_gflops(int threads, double seconds);

// GB/s (1e9 bytes) at which `threads` threads together read a buffer of about `bytes` bytes (each
// its own contiguous share, first written by that thread): the best of `passes` passes, each timed
// from the common start to the last thread's finish.
double measure_read_bandwidth_gbs(int threads, int64_t bytes, int passes);

}  // namespace ktjax
