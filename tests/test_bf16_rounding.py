"""The kernels' f32 -> bf16 rounding (every ISA) against ml_dtypes: nearest even, NaN stays NaN."""

from __future__ import annotations

import kernel_elementwise
import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.kernels


def awkward_floats() -> np.ndarray:
    """Ties (low half exactly 0x8000) with even and odd kept bits, one ulp either side of a tie,
    signed zeros, denormals, the largest finite value (rounds to inf), infinities, NaNs with payloads
    that rounding must not turn into infinities, and random values; 1001 of them, so that every
    vector width leaves a tail."""
    rng = np.random.default_rng(0)
    high = rng.integers(0, 1 << 16, 160, dtype=np.uint32) << 16
    low = np.array([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF], np.uint32)
    bits = (high[:, None] | low[None, :]).reshape(-1)
    special = np.array(
        [0, 0x80000000, 1, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
         0x7F800001, 0x7FFF8000, 0xFFC00000, 0x7FC00001, 0x3F808000, 0x3F818000],
        np.uint32,
    )  # fmt: skip
    bits = np.concatenate([bits, special, rng.integers(0, 1 << 32, 1001 - 800 - 14, dtype=np.uint32)])
    return bits.view(np.float32)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_rounding_to_bf16_matches_ml_dtypes(isa, use_isa):
    use_isa(isa)
    x = awkward_floats()
    got = kernel_elementwise.round_to_bf16(x).view(np.uint16)
    with np.errstate(invalid="ignore"):  # NaN inputs
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    assert nan.sum() >= 4
    got_f = got.view(ml_dtypes.bfloat16).astype(np.float32)
    assert np.isnan(got_f[nan]).all(), "a NaN must stay NaN"
    np.testing.assert_array_equal(got[~nan], want[~nan])
