"""moe_experts with quantized frozen bases (int8, int4, fp8; each projection independently): the forward,
dx, router-weight and LoRA gradients of the CPU kernels against the float64 reference on exactly the
dequantized weights, on every ISA; and what a quantized base refuses."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from error_bounds import U_F32, Tracked, assert_output_within, bf16_rounding_as_error
from moe_testing import make_problem, representable_cotangent, tracked_reference
from test_moe_bad_input import raw_forward
from test_quant_formats import dequantize_numpy, term_magnitudes

from ktjax import ffi
from ktjax.ops import moe_experts
from ktjax.ops.moe_checks import default_intermediates, float_weight_dtype
from ktjax.quant import fp8_weight, quantize_fp8, quantize_int4, quantize_int8
from ktjax.quant.formats import is_quantized

pytestmark = pytest.mark.kernels

FORMATS = {
    "int8": quantize_int8,
    "int4": lambda w: quantize_int4(w, 32),
    # blocks smaller than the weights, so that every expert has several blocks and ragged last ones; 32
    # columns, so that the quantized pair path takes them (test_fp8_blocks_the_pair_path_cannot_take...)
    "fp8": lambda w: quantize_fp8(w, (16, 32)),
}
# Odd widths: H = 75 gives int4 rows an odd column count (a half-filled last byte) and a ragged last
# group of 11; I = 40 ragged fp8 blocks both ways. 37 tokens on 5 experts (about 15 an expert): the
# forward's products on the quantized dot path (rows dequantized into L1), the backward's packed.
SHAPE = dict(T=37, K=2, E=5, H=75, I=40)
# About 140 tokens an expert: past the dot path's 96 rows, every product packed, but for the forward's
# products of bf16 rows on the quantized pair path (any row count, where the ISA has it).
MANY_TOKENS = dict(T=150, K=2, E=2, H=75, I=40)
ROW_TURNS = dict(T=600, K=2, E=2, H=75, I=40)


def quantized_problem(fmt: str, which: tuple[str, ...], dtype, ranks, seed: int = 0, shape=SHAPE):
    """A random problem whose projections in `which` are quantized: (problem for the kernels, the same
    problem with those weights replaced by their exact dequantized values, for the reference)."""
    p = make_problem(seed, **shape, dtype=dtype, ranks=ranks)
    ids = np.array(p.ids)
    ids[::7, 1] = -1  # dropped slots
    p = dataclasses.replace(p, ids=jnp.asarray(ids))
    quant, exact = {}, {}
    for name in which:
        w = np.asarray(getattr(p, name).astype(jnp.float32))
        quant[name] = FORMATS[fmt](w)
        exact[name] = jnp.asarray(dequantize_numpy(quant[name]))  # f32: every value exact in the reference
    return dataclasses.replace(p, **quant), dataclasses.replace(p, **exact)


def quantized_weights(p) -> dict[str, Tracked]:
    """The reference's view of p's quantized weights: their f32 dequantized values, within two roundings
    of the parts the kernels may compute with instead (code x scale + min, the scale applied to a
    segment's sum), and those parts' magnitudes for the rounding bounds."""
    out = {}
    for name in ("gate", "up", "down"):
        q = getattr(p, name)
        if is_quantized(q):
            terms = term_magnitudes(q)
            out[name] = Tracked(dequantize_numpy(q).astype(np.float64), 2 * U_F32 * terms, terms)
    return out


def kernel_loss_and_grads(p, cotangent, policy="retain"):
    """y and the gradients of sum(y * cotangent) w.r.t. x, topk_weights and every adapter, on the kernels."""

    def loss(x, w, lora):
        y = moe_experts(
            x, p.ids, w, p.gate, p.up, p.down, lora=lora or None, lora_scale=p.scale, policy=policy
        )
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    (dx, dw, dlora), y = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(p.x, p.weights, p.lora)
    grads = {"x": dx, "weights": dw}
    for name, (da, db) in dlora.items():
        grads[f"{name}_a"], grads[f"{name}_b"] = da, db
    return y, grads


def check(p, exact, policy="retain"):
    cot = representable_cotangent(1, p.x.shape, p.x.dtype)
    y, grads = kernel_loss_and_grads(p, jnp.asarray(cot, jnp.float32), policy)
    # "auto": bf16 intermediates for bf16 tokens and bf16 float weights beside the quantized ones (the
    # rounding then applies to the quantized projections' products too) or none beside them.
    mode = default_intermediates(p.x.dtype, float_weight_dtype(p.gate, p.up, p.down), "cpu")
    weights = quantized_weights(p)
    # bf16 intermediates: the chain to dx multiplies bf16 rows by a bf16 copy of the dequantized weights
    # where the ISA has the pair path (the quant_pairs path), so each may be rounded there
    backward = {n: bf16_rounding_as_error(w) for n, w in weights.items()} if mode == "bf16" else None
    want = tracked_reference(exact, cot, mode, weights=weights, backward_weights=backward)
    assert y.dtype == p.x.dtype
    assert_output_within(y, want["y"], "forward")
    for name, g in grads.items():
        assert_output_within(g, want[name], f"gradient of {name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("which", [("gate",), ("up",), ("down",), ("gate", "up", "down")], ids="+".join)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_bases_with_lora_match_the_reference_on_their_dequantized_weights(fmt, which, dtype):
    p, exact = quantized_problem(fmt, which, dtype, ranks={"gate": 3, "down": 2})
    check(p, exact)


@pytest.mark.parametrize("shape", [SHAPE, MANY_TOKENS], ids=["few_tokens", "many_tokens"])
@pytest.mark.parametrize("isa", ["avx512_bf16", "avx512", "avx2", "generic"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_isa_reads_quantized_bases(fmt, isa, shape, use_isa):
    use_isa(isa)
    which = ("gate", "up", "down")
    p, exact = quantized_problem(fmt, which, jnp.bfloat16, ranks={"up": 4}, seed=1, shape=shape)
    ffi.reset_kernel_counters()
    check(p, exact, policy="recompute")
    paths = ffi.path_flops()
    # the forward's products multiply the bf16 tokens (and bf16 intermediates) by the codes as bf16 pairs
    # where the ISA has them, else (few tokens) by the f32 weights dequantized in L1
    pairs = isa == "avx512_bf16"
    assert (paths["quant_dot"] > 0) == (shape is SHAPE and not pairs), paths
    # and the chain to dx multiplies bf16 rows by bf16 copies of the weights where it has them
    assert (paths["quant_pairs"] > 0) == pairs, paths
    assert (paths["quant_pair_dot"] > 0) == pairs, paths


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_the_pair_path_takes_more_token_rows_than_fit_at_once_in_turns(fmt, use_isa):
    # ~560 tokens on each expert: more than the 384 rows the quantized pair path multiplies at a time.
    use_isa("avx512_bf16")
    p, exact = quantized_problem(fmt, ("gate", "up"), jnp.bfloat16, ranks={"up": 2}, seed=5, shape=ROW_TURNS)
    ffi.reset_kernel_counters()
    check(p, exact)
    assert ffi.path_flops()["quant_pair_dot"] > 0


@pytest.mark.parametrize("isa", ["avx512_bf16", "avx2"])
def test_every_fp8_code_reaches_the_products_with_its_value(isa, use_isa):
    # One-hot tokens pick single weights: token t's gate pre-activation row is column t of the gate
    # weight, whose rows hold every e4m3 byte but the two NaNs (subnormals, zeros, both signs) at scale 1
    # and 2^-3, so each code's value is the whole product: a wrong one is far outside the bound.
    use_isa(isa)
    one_hot = dict(T=256, K=2, E=2, H=256, I=8)
    p, _ = quantized_problem("fp8", (), jnp.bfloat16, ranks={}, seed=6, shape=one_hot)
    codes = (np.arange(256)[None, :] + 37 * np.arange(8)[:, None]) % 256
    codes = np.where((codes & 0x7F) == 0x7F, 0x38, codes).astype(np.uint8)  # NaN -> 1.0
    scales = np.array([[[1.0, 0.125]], [[0.125, 1.0]]], np.float32)  # [E, ceil(8 / 8), ceil(256 / 128)]
    gate = fp8_weight(np.broadcast_to(codes, (2, 8, 256)).copy(), scales, (8, 128))
    x = jnp.asarray(np.eye(256, dtype=np.float32), jnp.bfloat16)
    p = dataclasses.replace(p, x=x, gate=gate)
    exact = dataclasses.replace(p, gate=jnp.asarray(dequantize_numpy(gate)))
    ffi.reset_kernel_counters()
    check(p, exact)
    paths = ffi.path_flops()
    assert paths["quant_pair_dot" if isa == "avx512_bf16" else "packed"] > 0, paths


def test_fp8_blocks_the_pair_path_cannot_take_are_dequantized_to_f32(use_isa):
    # 24-column blocks do not start on whole blocks of 32: the f32 quantized dot path takes them.
    use_isa("avx512_bf16")
    p, exact = quantized_problem("fp8", ("gate",), jnp.bfloat16, ranks={"gate": 2}, seed=4)
    p = dataclasses.replace(p, gate=quantize_fp8(np.asarray(exact.gate), (16, 24)))
    exact = dataclasses.replace(exact, gate=jnp.asarray(dequantize_numpy(p.gate)))
    ffi.reset_kernel_counters()
    check(p, exact)
    paths = ffi.path_flops()
    assert paths["quant_dot"] > 0 and paths["quant_pair_dot"] == 0, paths


def test_a_frozen_quantized_base_without_adapters_still_passes_gradients_to_x_and_the_router():
    p, exact = quantized_problem("int4", ("gate", "up", "down"), jnp.float32, ranks={}, seed=2)
    check(p, exact)


def test_the_xla_backend_computes_on_the_dequantized_weights():
    p, exact = quantized_problem("fp8", ("gate", "down"), jnp.float32, ranks={"up": 2}, seed=3)
    args = (p.x, p.ids, p.weights)
    got = moe_experts(*args, p.gate, p.up, p.down, lora=p.lora, lora_scale=p.scale, backend="xla")
    want = moe_experts(
        *args, exact.gate, exact.up, exact.down, lora=p.lora, lora_scale=p.scale, backend="xla"
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_differentiating_a_quantized_base_is_refused_with_its_name():
    # fp8 data and every format's scales are floating point, so jax.grad can be asked for them.
    p, _ = quantized_problem("fp8", ("up",), jnp.float32, ranks={})

    def loss(up):
        return moe_experts(p.x, p.ids, p.weights, p.gate, up, p.down).sum()

    with pytest.raises(ValueError, match="up is quantized: a quantized base is frozen"):
        jax.grad(loss)(p.up)
    with pytest.raises(ValueError, match="up is quantized"):
        jax.grad(lambda s: loss(dataclasses.replace(p.up, scales=s)))(p.up.scales)


def test_auto_intermediates_follow_the_tokens_when_every_base_is_quantized():
    p, _ = quantized_problem("int8", ("gate", "up", "down"), jnp.bfloat16, ranks={})
    weights = float_weight_dtype(p.gate, p.up, p.down)
    assert weights is None
    assert default_intermediates(jnp.bfloat16, weights, "cpu") == "bf16"
    assert default_intermediates(jnp.float32, weights, "cpu") == "f32"
    assert default_intermediates(jnp.bfloat16, weights, "xla") == "f32"
    assert default_intermediates(jnp.bfloat16, float_weight_dtype(p.gate, p.up, jnp.ones(1)), "cpu") == "f32"


def test_the_kernels_check_quantized_data_against_the_quant_attribute():
    p, _ = quantized_problem("int4", ("gate",), jnp.float32, ranks={})
    args = [p.x, p.ids, p.weights, p.gate.data, p.up, p.down, p.gate.scales]
    for spec, pattern in [
        ("gate:int4:64", r"gate scales must have shape \[E, out, ceil\(in / G\), 2\]"),
        ("gate:int8", "gate must be int8"),
        ("gate:int5", "quant must list gate, up, down in that order"),
        ("up:int4:32", r"gate must have shape \[E, I, H\]"),  # gate's data read as a float weight
        ("", "need 0 more arrays"),
    ]:
        with pytest.raises(Exception, match=pattern):
            raw_forward(args, quant=spec)
    f32_scales = [*args[:-1], p.gate.scales.astype(jnp.float32)]  # the layout before bf16 pairs
    with pytest.raises(Exception, match="gate scales must be bfloat16"):
        raw_forward(f32_scales, quant=p.gate.kernel_spec("gate"))
