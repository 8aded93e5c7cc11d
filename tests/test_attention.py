"""ktjax.ops.attention: the flash attention kernels (backend "cpu", on every ISA) and the blockwise JAX
attention against the dense float64 reference, forward and every gradient, on odd lengths, packed
records, sliding windows, GQA groups, latent-attention widths, padding rows and both input dtypes; and
their errors on bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from error_bounds import U_BF16

from ktjax.ops.attention import attention, dense_attention

# (B, S, N, G, Dk, Dv, window, block): lengths that do not divide into blocks, several blocks, a window
# shorter than a block and one longer, one key/value head for all queries, Dk != Dv (MLA's 192 / 128); a
# sequence within one block (the dense path).
CASES = {
    "odd_length_gqa": (2, 37, 4, 2, 16, 8, 0, 8),
    "window_shorter_than_a_block": (2, 37, 4, 2, 16, 8, 5, 8),
    "mla_widths_one_kv_head": (1, 45, 4, 1, 24, 16, 13, 16),
    "one_block": (1, 20, 2, 2, 8, 8, 0, 64),
    "window_across_blocks": (1, 70, 4, 4, 8, 8, 20, 16),
}


def segments(B: int, S: int) -> np.ndarray:
    """Several records packed in a row, and padding at the end of the second row (no query sees anything)."""
    seg = np.ones((B, S), np.int32)
    seg[0, S // 3 :] = 2
    seg[0, 2 * S // 3 :] = 3
    if B > 1:
        seg[1, S - 6 :] = 0
    return seg


def problem(case: str, dtype, seed: int = 0):
    B, S, N, G, Dk, Dv, window, block = CASES[case]
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape) for shape in ((B, S, N, Dk), (B, S, G, Dk), (B, S, G, Dv)))
    # inputs exactly representable in `dtype`, so that both backends see the same values
    q, k, v = (jnp.asarray(a, dtype) for a in (q, k, v))
    cot = jnp.asarray(rng.standard_normal((B, S, N * Dv)), jnp.float32)
    return (q, k, v), jnp.asarray(segments(B, S)), cot, dict(scale=Dk**-0.5, window=window), block


def grads(fn, args, cot):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(cot.dtype) * cot), argnums=(0, 1, 2))(*args)


def dense_terms(q, k, v, seg, cot, scale: float, window: int) -> dict[str, np.ndarray]:
    """The float64 probabilities and score gradients of the reference, and from them the bounds on what
    the kernels' bf16 roundings (attention_cpu.py) may move each result: the probabilities P (forward
    and dv's products), the output's cotangent dO, the score gradients dS, each by at most U_BF16 of
    itself; errors carried through every product by the magnitudes of its terms, with the output's error
    reaching dS through delta = sum(dO * out). Arrays in float64; heads of a group share k and v."""
    q, k, v, cot = (np.asarray(a, np.float64) for a in (q, k, v, cot))
    B, S, N, _ = q.shape
    R = N // k.shape[2]
    kk, vv = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)  # [B, S, N, D]
    dout = cot.reshape(B, S, N, -1)
    pos = np.arange(S)
    seg = np.asarray(seg)
    see = (
        (pos[None, :, None] >= pos[None, None, :])
        & (seg[:, :, None] == seg[:, None, :])
        & (seg[:, :, None] > 0)
    )
    if window:
        see &= pos[None, :, None] - pos[None, None, :] < window
    s = np.where(see[:, None], scale * np.einsum("bqnd,bknd->bnqk", q, kk), -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)  # rows that see nothing: all 0
    out = np.einsum("bnqk,bknd->bqnd", p, vv)
    dout = np.where((seg > 0)[:, :, None, None], dout, 0.0)  # padding rows take the mean outside the kernels
    dp = np.einsum("bqnd,bknd->bnqk", dout, vv)
    ds = p * (dp - np.einsum("bqnd,bqnd->bnq", dout, out)[..., None])

    def per_group(a):  # [B, S, N, D] -> [B, S, G, D]: summed over each group's heads
        return a.reshape(B, S, -1, R, a.shape[-1]).sum(3)

    u = U_BF16
    e_out = u * np.einsum("bnqk,bknd->bqnd", p, np.abs(vv))
    e_delta = np.einsum("bqnd,bqnd->bnq", np.abs(dout), e_out)
    e_dp = u * np.einsum("bqnd,bknd->bnqk", np.abs(dout), np.abs(vv))
    e_ds = p * (e_dp + e_delta[..., None]) + u * np.abs(ds)
    return {
        "out": e_out.reshape(B, S, -1),
        "dq": scale * np.einsum("bnqk,bknd->bqnd", e_ds, np.abs(kk)),
        "dk": scale * per_group(np.einsum("bnqk,bqnd->bknd", e_ds, np.abs(q))),
        "dv": (2 * u + u * u) * per_group(np.einsum("bnqk,bqnd->bknd", p, np.abs(dout))),
    }


def check_against_reference(case: str, dtype, backend: str) -> None:
    args, seg, cot, kw, block = problem(case, dtype)
    got = attention(*args, seg, **kw, block=block, backend=backend)
    got_grads = grads(lambda q, k, v: attention(q, k, v, seg, **kw, block=block, backend=backend), args, cot)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        cot64 = jnp.asarray(np.asarray(cot, np.float64))
        want = np.asarray(dense_attention(*args64, seg, **kw))
        want_grads = [
            np.asarray(g) for g in grads(lambda q, k, v: dense_attention(q, k, v, seg, **kw), args64, cot64)
        ]
    assert got.dtype == jnp.float32 and not np.isnan(np.asarray(got)).any()
    # Both backends compute in f32 from the same inputs (bf16 ones are exact in f32): softmax, a sum over
    # at most S keys and the online rescaling err by a few f32 ulps of the terms; 2^-16 of the largest
    # value bounds that for these sizes (measured worst: about 2^-20). The kernels with bf16 inputs
    # round their tiles to bf16 besides: dense_terms bounds what that moves. Gradients of bf16 inputs are
    # bf16: rounded once more, by at most half a bf16 ulp, 2^-8 of themselves (7 stored mantissa bits).
    rounded = dense_terms(*args, seg, cot, **kw) if backend == "cpu" and dtype == jnp.bfloat16 else {}
    for name, g, w in [("out", got, want), *zip(("dq", "dk", "dv"), got_grads, want_grads)]:
        rounding = 2.0**-8 if g.dtype == jnp.bfloat16 else 0.0
        g = np.asarray(g.astype(jnp.float32), np.float64)
        assert g.shape == w.shape
        bound = 2.0**-16 * np.abs(w).max() + rounded.get(name, 0.0)
        bound = bound * (1 + rounding) + rounding * np.abs(w) * (1 + 2.0**-8)
        assert (np.abs(g - w) <= bound).all(), (
            f"{case}: {name}: worst {np.max(np.abs(g - w) - bound):.3e} over"
        )


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_the_float64_reference(case, dtype, backend):
    check_against_reference(case, dtype, backend)


@pytest.mark.kernels
@pytest.mark.parametrize("isa", ["avx512_bf16", "avx512", "avx2", "generic"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_the_attention_kernels_match_the_reference_on_every_isa(isa, dtype, use_isa):
    use_isa(isa)
    check_against_reference("odd_length_gqa", dtype, "cpu")
    check_against_reference("window_across_blocks", dtype, "cpu")


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
def test_a_query_that_sees_nothing_gets_the_mean_of_the_values_as_the_dense_softmax_does(backend):
    args, seg, _, kw, block = problem("odd_length_gqa", jnp.float32)
    out = np.asarray(attention(*args, seg, **kw, block=block, backend=backend))
    padded = np.asarray(seg) == 0
    assert padded.any()
    v = np.asarray(args[2])  # [B, S, G, Dv]
    mean = np.repeat(v[1].mean(axis=0), 2, axis=0).reshape(-1)  # each of the 2 groups serves 2 heads
    np.testing.assert_allclose(out[1, padded[1]], np.broadcast_to(mean, out[1, padded[1]].shape), rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
def test_the_attention_holds_no_sequence_squared_buffer(backend):
    # XLA's temporaries of the forward + backward at S = 2048, 4 heads: the dense scores alone are 64 MB.
    # (The kernels' own scratch is two [block, block] f32 tiles per worker besides: attention.h.)
    B, S, N, D = 1, 2048, 4, 32
    q = jnp.ones((B, S, N, D))
    seg = jnp.ones((B, S), jnp.int32)

    def temp(backend):
        def loss(q):
            return attention(q, q, q, seg, scale=0.1, backend=backend).sum()

        return jax.jit(jax.grad(loss)).lower(q).compile().memory_analysis().temp_size_in_bytes

    linear, dense = temp(backend), temp("xla")
    assert dense > 4 * S * S * N  # the reference does hold [N, S, S] f32
    assert linear < 4 * S * S * N, (linear, dense)  # under one [N, S, S] f32 buffer


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=jnp.ones((1, 8, 3, 4))), "do not fit"),
        (dict(seg=jnp.ones((1, 7), jnp.int32)), "segment_ids must be"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(window=-1), "window must be >= 0"),
        (dict(block=0), "block >= 1"),
        (dict(backend="cpu", block=2048), r"block must be in \[1, 1024\] for backend 'cpu'"),
        (dict(backend="cpu", v=jnp.ones((1, 8, 2, 4), jnp.bfloat16)), "all float32 or all bfloat16"),
    ],
)
def test_bad_input_is_refused_with_its_name(change, message):
    args = dict(q=jnp.ones((1, 8, 4, 4)), k=jnp.ones((1, 8, 2, 4)), v=jnp.ones((1, 8, 2, 4)))
    seg = change.pop("seg", jnp.ones((1, 8), jnp.int32))
    args.update({key: change.pop(key) for key in ("k", "v") if key in change})
    with pytest.raises(ValueError, match=message):
        attention(args["q"], args["k"], args["v"], seg, scale=0.5, **change)


def test_an_unknown_attention_backend_in_the_model_config_is_refused():
    from ktjax.config import ModelConfig

    with pytest.raises(ValueError, match="attention_backend must be one of"):
        ModelConfig(attention_backend="flash")


def ffi_forward(q, k, v, seg, block=4):
    from ktjax.ops.attention_cpu import FORWARD_TARGET

    B, S, N, _ = q.shape
    results = (
        jax.ShapeDtypeStruct((B, S, N, v.shape[3]), jnp.float32),
        jax.ShapeDtypeStruct((B, N, S), jnp.float32),
    )
    attrs = dict(scale=np.float32(0.5), window=np.int64(0), block=np.int64(block))
    return jax.ffi.ffi_call(FORWARD_TARGET, results)(q, k, v, seg, **attrs)


@pytest.mark.kernels
@pytest.mark.sanitized
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(seg=jnp.ones((1, 8), jnp.float32)), "segment_ids must be int32"),
        (dict(seg=jnp.ones((1, 9), jnp.int32)), r"segment_ids must have shape \[B, S\]"),
        (dict(k=jnp.ones((1, 8, 3, 4))), "G dividing N"),
        (dict(v=jnp.ones((1, 8, 2, 4), jnp.bfloat16)), "k and v must have q's dtype"),
        (dict(q=jnp.ones((1, 8, 4, 4), jnp.int32)), "q must be bfloat16 or float32"),
        (dict(block=0), r"block must be in \[1, 1024\]"),
    ],
)
def test_the_attention_kernels_refuse_bad_input_naming_the_argument(change, message):
    args = dict(q=jnp.ones((1, 8, 4, 4)), k=jnp.ones((1, 8, 2, 4)), v=jnp.ones((1, 8, 2, 4)))
    args["seg"] = jnp.ones((1, 8), jnp.int32)
    block = change.pop("block", 4)
    args.update(change)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(ffi_forward(**args, block=block))


def test_a_bf16_model_feeds_the_kernels_bf16_inputs_unless_told_otherwise():
    from ktjax.config import ModelConfig

    assert ModelConfig(param_dtype="bfloat16").attention_dtype == "bfloat16"
    assert ModelConfig(param_dtype="float32").attention_dtype == "float32"
    assert ModelConfig(param_dtype="bfloat16", attention_backend="blockwise").attention_dtype == "float32"
    assert ModelConfig(param_dtype="bfloat16", attention_inputs="f32").attention_dtype == "float32"
    assert ModelConfig(attention_inputs="bf16").attention_dtype == "bfloat16"
    with pytest.raises(ValueError, match="attention_inputs must be auto, f32 or bf16"):
        ModelConfig(attention_inputs="fp8")
