"""The kernels' SiLU gating h = silu(g) * u and its gradients (every ISA) against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
from error_bounds import U_F32
from kernel_elementwise import silu_mul, silu_mul_grad
from moe_testing import SILU_GRAD_ULPS, SILU_ULPS

pytestmark = pytest.mark.kernels


def pre_activations() -> np.ndarray:
    """Random values of every scale (|g| from 1e-6 to 200), the edges of exp's range, signed zeros,
    infinities and NaN; 1003 of them, so that every vector width leaves a tail."""
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 88.7, 89.0, 89.5, -87.3, -103.9, -104.5, 1e30, -1e30, np.inf, -np.inf, np.nan]
    scaled = rng.standard_normal(990) * 10.0 ** rng.uniform(-6, 2.3, 990)
    return np.concatenate([scaled, special]).astype(np.float32)


def reference(g, u, dh, w):
    """(value, scale) of h, dg and du in float64. scale bounds the value's f32 rounding error in units
    of f32 epsilon: the size of the value, or for dg that of d u sigmoid(g) (1 + |g|): any f32
    evaluation of 1 + g (1 - sigmoid(g)) loses up to |g| ulps of 1 (1 - sigmoid(g) cancels for large g,
    the sum near g = -1.28)."""
    g, u, dh = (a.astype(np.float64) for a in (g, u, dh))
    with np.errstate(over="ignore", invalid="ignore"):
        sg = 1.0 / (1.0 + np.exp(-g))
        d = w * dh
        h, du = g * sg * u, d * g * sg
        dg = d * u * sg * (1.0 + g * (1.0 - sg))
        dg_scale = np.abs(d * u * sg) * (1.0 + np.abs(g))
    return (h, np.abs(h)), (dg, dg_scale), (du, np.abs(du))


def assert_close_or_same_special(got, want, what, ulps):
    want, scale = want
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN where it should be")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=what)
    err = np.abs(got[finite] - want[finite])
    # Below the normal range (2^-126) each rounding's absolute error is at most half the subnormal
    # spacing, 2^-150: `ulps` roundings of the smallest normal cover it.
    bad = err > ulps * U_F32 * scale[finite] + ulps * 2.0**-126
    assert not bad.any(), f"{what}: {bad.sum()} off, e.g. {got[finite][bad][:3]} vs {want[finite][bad][:3]}"


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_silu_gating_and_its_gradients_match_float64(isa, use_isa):
    use_isa(isa)
    rng = np.random.default_rng(1)
    g = pre_activations()
    u = (rng.standard_normal(g.size) * 3).astype(np.float32)
    dh = (rng.standard_normal(g.size) * 2).astype(np.float32)
    w = 0.37
    h_ref, dg_ref, du_ref = reference(g, u, dh, w)
    assert np.isnan(h_ref[0]).sum() == 2 and np.isinf(h_ref[0]).sum() == 1  # -inf and NaN; +inf
    # Roundings relative to each value's scale, at most: sigmoid(g) = 1 / (1 + exp(-g)) 4 (exp(-g) 2 —
    # its degree-6 polynomial is within 1 ulp of exp on |r| <= ln2 / 2 and Horner's rounding errors
    # shrink by |r| at each step, the 2^n scaling is exact — whose relative error reaches sigmoid times
    # exp(-g) / (1 + exp(-g)) < 1; the sum 1; the division 1); h = g sigmoid u: 4 + 2; du = w dh g
    # sigmoid: 4 + 3. dg = ((w dh) u) sigmoid (1 + g (1 - sigmoid)): 4 + 3 + 1 relative to |d u sigmoid|,
    # and the slope's absolute error |g| (4 u sigmoid + 2 u (1 - sigmoid)) + u |slope| < 7 u (1 + |g|)
    # (1 - sigmoid is exact by Sterbenz where it cancels), so 16 of dg's scale |d u sigmoid| (1 + |g|).
    assert_close_or_same_special(silu_mul(g, u), h_ref, "h", ulps=SILU_ULPS)
    dg, du = silu_mul_grad(g, u, dh, w)
    assert_close_or_same_special(dg, dg_ref, "dg", ulps=SILU_GRAD_ULPS)
    assert_close_or_same_special(du, du_ref, "du", ulps=SILU_ULPS)


def test_sizes_must_agree():
    with pytest.raises(ValueError, match="same size"):
        silu_mul(np.ones(4), np.ones(5))


def test_avx2_gating_gives_the_same_bits_as_avx512(monkeypatch, use_isa):
    """The AVX2 exp applies 2^n as two exact factors (no vscalefps): same rounding, so the same bits,
    over exp's whole range (both ends of it, where 2^n needs both factors) and the special values."""
    use_isa("avx512")
    rng = np.random.default_rng(2)
    g = np.concatenate([pre_activations(), np.linspace(-110.0, 95.0, 20001, dtype=np.float32)])
    u, dh = (rng.standard_normal((2, g.size)) * 3).astype(np.float32)
    outs = {}
    for isa in ("avx512", "avx2"):
        monkeypatch.setenv("KTJAX_ISA", isa)
        outs[isa] = np.stack([silu_mul(g, u), *silu_mul_grad(g, u, dh, 0.37)])
    np.testing.assert_array_equal(outs["avx2"].view(np.uint32), outs["avx512"].view(np.uint32))
