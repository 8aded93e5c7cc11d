// Measured limits of this machine, for the benchmark's roofline: the compute peak of the selected
// micro-kernel, f32 or bf16 pairs (every thread on L1-resident panels) and the read bandwidth of main memory.
#pragma once

#include <cstdint>

namespace ktjax {

// GFLOP/s summed over `threads` threads, each running for about `seconds`: of the f32 micro-kernel, or
// with bf16_pairs of the bf16 pair kernel (0 where the selected ISA has none).
double measure_peak_gflops(int threads, double seconds, bool bf16_pairs);

// GB/s (1e9 bytes) at which `threads` threads together read a buffer of about `bytes` bytes (each
// its own contiguous share, first written by that thread): the best of `passes` passes, each timed
// from the common start to the last thread's finish.
double measure_read_bandwidth_gbs(int threads, int64_t bytes, int passes);

}  // namespace ktjax
