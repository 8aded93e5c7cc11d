"""What this machine's CPU and memory can do, measured with the kernels' own code: the micro-kernel's
peak GEMM rate and the memory read bandwidth (the benchmark's reference points)."""

from __future__ import annotations

from ktjax.ffi import extension as _ktjax_ffi


def measure_peak_gflops(threads: int, seconds: float = 0.5, bf16_pairs: bool = False) -> float:
    """GFLOP/s of the selected micro-kernel on cache-resident data, summed over `threads`: the f32
    kernel, or with ``bf16_pairs`` the bf16 pair kernel (``vdpbf16ps``; 0.0 where the selected ISA has
    none, i.e. on every ISA but ``avx512_bf16``)."""
    return _ktjax_ffi.measure_peak_gflops(threads, seconds, bf16_pairs)


def measure_read_bandwidth_gbs(threads: int, n_bytes: int = 1 << 30, passes: int = 3) -> float:
    """GB/s (1e9 bytes) at which `threads` threads together read `n_bytes` of main memory.

    Each thread sums its own contiguous share (written by it first, so its pages are local); the
    best of `passes` passes, each timed from the common start to the last thread's finish.
    """
    return _ktjax_ffi.measure_read_bandwidth_gbs(threads, n_bytes, passes)
