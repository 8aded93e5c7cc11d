"""``flash_attention_cpu``: ``attention``'s backend ``"cpu"``, the flash attention kernels of
xla_ffi/attention.cc (forward and backward as XLA FFI custom calls).

The forward returns each query's output and the log-sum-exp of its scores; the backward recomputes each
tile's probabilities from that log-sum-exp. With bf16 inputs the kernels round the probabilities and the
score gradients to bf16 before the products that read them, and the backward reads the output's
cotangent rounded to bf16 too (as flash attention does on accelerators): every product then multiplies
two bf16 values into f32 sums (``vdpbf16ps`` where the CPU has AVX512_BF16). With f32 inputs everything
is f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import ffi  # noqa: F401 (registers the kernels with JAX)
from ktjax.ops.vma import cotangent_like, varying, varying_over

FORWARD_TARGET = "ktjax_attention_forward"
BACKWARD_TARGET = "ktjax_attention_backward"
DTYPES = (jnp.float32, jnp.bfloat16)
MAX_BLOCK = 1024  # the kernels' largest tile (xla_ffi/attention.cc: kMaxBlock)


def flash_attention_cpu(q, k, v, segment_ids, *, scale: float, window: int, block: int) -> jax.Array:
    """q: [B, S, N, Dk], k: [B, S, G, Dk], v: [B, S, G, Dv] (all f32 or all bf16), segment_ids: [B, S] int
    -> [B, S, N, Dv] f32. A query that sees nothing (segment 0) gets 0. `block`: the tile's rows and
    columns (1 to 1024)."""
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in DTYPES:
        raise ValueError(
            f"attention: backend 'cpu' takes q, k and v all float32 or all bfloat16, got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"attention: block must be in [1, {MAX_BLOCK}] for backend 'cpu', got {block}")
    return _flash(float(scale), int(window), int(block), q, k, v, segment_ids.astype(jnp.int32))


def _attrs(scale: float, window: int, block: int) -> dict:
    return dict(scale=np.float32(scale), window=np.int64(window), block=np.int64(block))


def _forward(scale, window, block, q, k, v, seg):
    B, S, N, _ = q.shape
    results = (
        jax.ShapeDtypeStruct((B, S, N, v.shape[3]), jnp.float32),  # out
        jax.ShapeDtypeStruct((B, N, S), jnp.float32),  # lse
    )
    out, lse = jax.ffi.ffi_call(FORWARD_TARGET, results, vmap_method="sequential")(
        q, k, v, seg, **_attrs(scale, window, block)
    )
    # inside jax.shard_map the kernels' results vary over the mesh axes their inputs vary over
    axes = varying_over(q, k, v, seg)
    return varying(out, axes), varying(lse, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(scale: float, window: int, block: int, q, k, v, seg):
    return _forward(scale, window, block, q, k, v, seg)[0]


def _flash_fwd(scale, window, block, q, k, v, seg):
    out, lse = _forward(scale, window, block, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, window, block, res, dout):
    q, k, v, seg, out, lse = res
    delta = jnp.einsum("bsnd,bsnd->bns", dout, out)  # [B, N, S] f32
    results = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(BACKWARD_TARGET, results, vmap_method="sequential")(
        q, k, v, seg, lse, dout.astype(q.dtype), delta, **_attrs(scale, window, block)
    )
    axes = varying_over(q, k, v, seg, dout)
    return (
        *(cotangent_like(varying(g, axes).astype(a.dtype), a) for g, a in ((dq, q), (dk, k), (dv, v))),
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
