"""Quantized frozen weights (ktjax.quant): quantizers within their analytic bounds, the kernels'
dequantization equal to the formats' definition (numpy, f32) on every ISA, the pytree through jit and
orbax, and bad data named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from kernel_elementwise import dequantize as kernel_dequantize

from ktjax.quant import QuantizedWeight, fp8_weight, quantize, quantize_fp8, quantize_int4, quantize_int8

pytestmark = pytest.mark.kernels


def weights(seed: int, E: int = 2, out: int = 7, in_: int = 301) -> np.ndarray:
    """Random weights with heavy tails and a few rows / groups of equal values (scale edge cases)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (E, out, in_)).astype(np.float32) * 0.05
    w[0, 0] = 0.0  # an all-zero row
    w[1, 1, :128] = 0.25  # a constant group
    return w


def dequantize_numpy(q: QuantizedWeight) -> np.ndarray:
    """The formats' definition (ktjax/quant/formats.py), in f32 numpy arithmetic: [E, out, in]."""
    E, out, in_ = q.shape
    s = np.asarray(q.scales, np.float32)
    if q.format == "int8":
        return np.asarray(q.data).astype(np.float32) * s[..., None]
    if q.format == "int4":
        d = np.asarray(q.data)
        nib = np.stack([d & 0xF, d >> 4], axis=-1).reshape(E, out, -1)[..., :in_].astype(np.float32)
        g = np.arange(in_) // q.group
        return nib * s[..., g, 0] + s[..., g, 1]
    b0, b1 = q.block
    rows, cols = np.arange(out) // b0, np.arange(in_) // b1
    return np.asarray(q.data).astype(np.float32) * s[:, rows][:, :, cols]


def term_magnitudes(q: QuantizedWeight) -> np.ndarray:
    """|code x scale| + |min| per element [E, out, in]: the magnitude of the parts the kernels sum for
    each weight (int4's q x scale and min; for int8 and fp8, whose min is 0, |w|)."""
    w = dequantize_numpy(q).astype(np.float64)
    if q.format != "int4":
        return np.abs(w)
    E, out, in_ = q.shape
    g = np.arange(in_) // q.group
    mins = np.asarray(q.scales, np.float64)[..., g, 1]
    return np.abs(w - mins) + np.abs(mins)


QUANTIZERS = {
    "int8": quantize_int8,
    "int4_g32": lambda w: quantize_int4(w, 32),
    "int4_g128": lambda w: quantize_int4(w, 128),
    "fp8_128x128": lambda w: quantize_fp8(w, (128, 128)),
    "fp8_ragged_3x100": lambda w: quantize_fp8(w, (3, 100)),
}


def element_scale(q: QuantizedWeight) -> np.ndarray:
    """The scale that applies to each element [E, out, in]."""
    E, out, in_ = q.shape
    s = np.asarray(q.scales, np.float64)
    if q.format == "int8":
        return np.broadcast_to(s[..., None], q.shape)
    if q.format == "int4":
        return s[..., np.arange(in_) // q.group, 0]
    return s[:, np.arange(out) // q.block[0]][:, :, np.arange(in_) // q.block[1]]


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantizers_stay_within_half_a_step_of_every_weight(name):
    w = weights(1)
    q = QUANTIZERS[name](w)
    q.check(name)
    err = np.abs(dequantize_numpy(q).astype(np.float64) - w)
    scale = element_scale(q)
    if q.format == "fp8":
        # e4m3 has 3 mantissa bits: rounding w / scale (|.| <= 448) errs by at most 2^-4 of it, or by half
        # the subnormal step 2^-9 below 2^-6; then times the scale (one more f32 rounding, negligible here).
        v = np.abs(w) / scale
        bound = np.maximum(v * 2.0**-4, 2.0**-10) * scale * (1 + 2.0**-20)
    else:
        bound = scale / 2 * (1 + 2.0**-20) + np.abs(w) * 2.0**-23  # half a step, plus f32 rounding of q s
    assert (err <= bound).all(), f"{name}: worst error {np.max(err - bound):.3e} above the bound"
    assert np.abs(dequantize_numpy(q)).max() > 0


@pytest.mark.parametrize("isa", ["native", "avx512", "avx2", "generic"])
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_the_kernels_dequantize_as_the_format_defines(name, isa, use_isa):
    use_isa(isa)
    q = QUANTIZERS[name](weights(2))
    want = dequantize_numpy(q)
    for e in range(q.shape[0]):
        np.testing.assert_array_equal(kernel_dequantize(q, e), want[e], err_msg=f"{name}, expert {e}")


def test_every_fp8_byte_decodes_as_ml_dtypes_float8_e4m3fn():
    data = np.arange(256, dtype=np.uint8).reshape(1, 1, 256)
    q = fp8_weight(data, np.ones((1, 1, 1), np.float32), (1, 256))
    got = kernel_dequantize(q)[0]
    want = data.view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(-1)
    nan = np.isnan(want)
    assert nan.sum() == 2  # 0x7f and 0xff
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0.0 included


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_jax_dequantize_matches_the_definition(name):
    q = QUANTIZERS[name](weights(3))
    got = np.asarray(jax.jit(lambda q: q.dequantize())(q))
    want = dequantize_numpy(q)
    # int4's q * scale + min may be one fused multiply-add in XLA: at most one f32 rounding apart.
    np.testing.assert_allclose(got, want, rtol=2.0**-23, atol=np.abs(want).max() * 2.0**-24)


def test_a_quantized_weight_is_one_pytree_that_orbax_saves_and_restores(tmp_path):
    q = quantize_int4(weights(4), 64)
    leaves, tree = jax.tree.flatten(q)
    assert len(leaves) == 2 and jax.tree.unflatten(tree, leaves) == q
    state = {"gate_proj": q, "other": jnp.ones(3)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", state)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert isinstance(restored["gate_proj"], QuantizedWeight)
    assert restored["gate_proj"].group == 64 and restored["gate_proj"].format == "int4"
    np.testing.assert_array_equal(np.asarray(restored["gate_proj"].data), np.asarray(q.data))
    np.testing.assert_array_equal(np.asarray(restored["gate_proj"].scales), np.asarray(q.scales))


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(format="int3"), "format must be one of"),
        (dict(group=48), "int4 group must be one of"),
        (dict(shape=(2, 7, 300)), r"data and scales of a \[2, 7, 300\] weight must have shapes"),
        (dict(scales=np.ones((2, 7, 3, 2), np.float32)), "int4 scales must be bfloat16, got float32"),
        (dict(data=np.zeros((2, 7, 151), np.int8)), "int4 data must be uint8"),
    ],
)
def test_a_quantized_weight_that_does_not_fit_its_format_is_named(change, pattern):
    import dataclasses

    q = dataclasses.replace(quantize_int4(weights(5), 128), **change)
    with pytest.raises((ValueError, TypeError), match=pattern):
        q.check("gate")


def test_quantizers_refuse_what_they_cannot_quantize():
    with pytest.raises(ValueError, match="int4 group must be one of"):
        quantize_int4(weights(6), 100)
    with pytest.raises(ValueError, match=r"must have shape \[E, out, in\]"):
        quantize_int8(np.ones((3, 4)))


def test_quantize_by_spec_picks_the_format_group_and_block_the_spec_names():
    w = weights(5)
    cases = {
        "int8": quantize_int8(w),
        "int4": quantize_int4(w, 128),
        "int4:32": quantize_int4(w, 32),
        "fp8": quantize_fp8(w, (128, 128)),
        "fp8:8x12": quantize_fp8(w, (8, 12)),
    }
    for spec, want in cases.items():
        got = quantize(w, spec)
        assert (got.format, got.group, got.block) == (want.format, want.group, want.block), spec
        bytes_of = lambda q: np.asarray(q.data).view(np.uint8)  # noqa: E731 (fp8 compares as bytes)
        np.testing.assert_array_equal(bytes_of(got), bytes_of(want))
        np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
    with pytest.raises(ValueError, match="names no format"):
        quantize(w, "none")
    with pytest.raises(ValueError, match="expert_quant must be"):
        quantize(w, "int4:48")
