// Measured compute peak of the selected micro-kernel: every thread runs it on L1-resident panels.
#pragma once

namespace ktjax {

// GFLOP/s summed over `threads` threads, each running for about `seconds`.
double measure_peak_gflops(int threads, double seconds);

}  // namespace ktjax
