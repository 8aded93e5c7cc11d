"""``attention``: causal softmax attention over packed sequences, with memory linear in the sequence.

    out[b, s, n] = sum_t p[b, n, s, t] v[b, t, g(n)]
    p[b, n, s, :] = softmax over the visible t of scale * q[b, s, n] . k[b, t, g(n)]

visible(s, t): t <= s, the same segment (segment_ids, 0 = padding), and with window > 0, s - t < window.
Query heads share key/value heads in groups (GQA: n // (N / G)); the key width Dk may differ from the
value width Dv (DeepSeek's latent attention: 192 and 128).

``backend="cpu"`` (the default) is the flash attention kernels of xla_ffi/attention.cc
(ktjax.ops.attention_cpu): the same tiles as the blockwise backend, computed in C++ on the GEMM driver.
``backend="blockwise"`` streams blocks of keys past blocks of queries with an online
softmax, flash-attention style: nothing of size S x S exists, only one [heads, block, block] tile at a
time, and the backward recomputes the tiles from the saved log-sum-exp. It skips the key blocks that a
query block cannot see (above the diagonal, before the window). A sequence no longer than one block is
that one tile: it takes the dense path (the same arithmetic, and quicker to compile). ``backend="xla"``
is the dense reference (``dense_attention``): the [B, heads, S, S] scores in f32.

A query that sees nothing (a padding position: segment 0) gets the mean of every value, as the dense
softmax over an all-masked row does; no NaN arises anywhere.

``cached_attention`` is the decoding form (ktjax.generate): queries at given positions against a key/value
cache whose slot t holds position t of the same sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ktjax.config import ATTENTION_BACKENDS
from ktjax.ops.attention_cpu import flash_attention_cpu

BACKENDS = ATTENTION_BACKENDS
# The tile's rows and columns per backend (measured: docs/performance.md, "Attention at long sequences").
DEFAULT_BLOCK = {"cpu": 256, "blockwise": 512, "xla": 512}
MASKED_SCORE = -1e30  # the score of an invisible key (finite: a row with nothing visible stays NaN-free)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    window: int = 0,
    block: int | None = None,
    backend: str = "cpu",
) -> jax.Array:
    """q: [B, S, N, Dk], k: [B, S, G, Dk], v: [B, S, G, Dv] (f32 or bf16; N a multiple of G; all f32 or all
    bf16 for backend "cpu"); segment_ids: [B, S] int (0 = padding) -> [B, S, N * Dv] f32. `block`: the
    tile's size (None: the backend's, DEFAULT_BLOCK)."""
    B, S, N, Dk = q.shape
    G, Dv = k.shape[2], v.shape[3]
    if k.shape != (B, S, G, Dk) or v.shape[:3] != (B, S, G) or N % G:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit [B, S, N|G, D]")
    if segment_ids.shape != (B, S):
        raise ValueError(f"attention: segment_ids must be [B, S] = {(B, S)}, got {segment_ids.shape}")
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    block = DEFAULT_BLOCK[backend] if block is None else block
    if window < 0 or block < 1:
        raise ValueError(f"attention: window must be >= 0 and block >= 1, got {window} and {block}")
    if backend == "cpu":
        out = flash_attention_cpu(q, k, v, segment_ids, scale=scale, window=window, block=block)
        return _blind_queries_get_the_mean(out, v, segment_ids)
    if backend == "xla" or S <= block:  # a sequence within one block: the one tile is the dense product
        return dense_attention(q, k, v, segment_ids, scale=scale, window=window)
    # [B, G, R, S, D] queries (R = N / G heads per group) and [B, G, S, D] keys and values, in f32
    qg = jnp.moveaxis(q.astype(jnp.float32).reshape(B, S, G, N // G, Dk), 1, 3)
    kg = jnp.moveaxis(k.astype(jnp.float32), 1, 2)
    vf = v.astype(jnp.float32)  # one f32 copy, for the tiles and the mean: its cotangents add in f32
    vg = jnp.moveaxis(vf, 1, 2)
    bs = min(block, -(-S // 8) * 8)
    pad = -S % bs
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    kg, vg = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (kg, vg))
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
    out = _flash(float(scale), int(window), bs, qg, kg, vg, seg)[..., :S, :]  # [B, G, R, S, Dv]
    return _blind_queries_get_the_mean(jnp.moveaxis(out, 3, 1).reshape(B, S, N, Dv), vf, segment_ids)


def _blind_queries_get_the_mean(out: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """out: [B, S, N, Dv] f32 -> [B, S, N * Dv], a query that sees nothing (segment 0) given the mean of
    its group's values over the sequence, as the dense softmax of an all-masked row gives it."""
    B, S, N, Dv = out.shape
    mean_v = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), N // v.shape[2], axis=1)  # [B, N, Dv]
    out = jnp.where((segment_ids > 0)[:, :, None, None], out, mean_v[:, None])
    return out.reshape(B, S, N * Dv)


def dense_attention(q, k, v, segment_ids, *, scale: float, window: int = 0) -> jax.Array:
    """The reference: every score of [B, N, S, S], masked, softmax, times the values; in f32 (f64 for f64
    inputs)."""
    S = q.shape[1]
    see = visible(segment_ids, segment_ids, jnp.arange(S), jnp.arange(S), window)
    return _masked_softmax_attention(q, k, v, see, scale)


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
    window: int = 0,
) -> jax.Array:
    """q: [B, S, N, Dk] at positions [B, S] int; k_cache: [B, L, G, Dk], v_cache: [B, L, G, Dv], slot t
    holding position t (every slot up to a query's position written) -> [B, S, N * Dv] f32. A query sees
    the slots t <= its position (and, with window > 0, position - t < window)."""
    see = cache_visible(positions, k_cache.shape[1], window)
    return _masked_softmax_attention(q, k_cache, v_cache, see, scale)


def _masked_softmax_attention(q, k, v, see, scale: float) -> jax.Array:
    """q: [B, Sq, N, Dk], k: [B, Sk, G, Dk], v: [B, Sk, G, Dv], see: [B, Sq, Sk] bool -> [B, Sq, N * Dv]:
    the softmax over the visible keys, every score at once, in f32 (f64 for f64 inputs)."""
    B, Sq, N, Dk = q.shape
    G = k.shape[2]
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.astype(dtype).reshape(B, Sq, G, N // G, Dk)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(dtype)) * scale  # [B, G, N/G, Sq, Sk]
    logits = jnp.where(see[:, None, None], logits, MASKED_SCORE)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(dtype)).reshape(B, Sq, -1)


def cache_visible(positions: jax.Array, length: int, window: int) -> jax.Array:
    """positions: [B, S] int -> [B, S, length] bool: cache slot t visible to the query at that position."""
    return _seen(positions[:, :, None], jnp.arange(length)[None, None, :], window)


def _seen(pos_q: jax.Array, pos_k: jax.Array, window: int) -> jax.Array:
    """Causal and within the window, for positions that broadcast against each other: pos_k <= pos_q
    and, with window > 0, pos_q - pos_k < window."""
    see = pos_k <= pos_q
    if window:
        see &= pos_q - pos_k < window
    return see


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache: [B, L, ...], new: [B, S, ...], start: [B] int -> the cache with row b's slots
    start[b] .. start[b] + S - 1 replaced by new[b] (in the cache's dtype)."""

    def row(c, n, s):
        return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0)

    return jax.vmap(row)(cache, new, start)


def visible(seg_q, seg_k, pos_q, pos_k, window: int) -> jax.Array:
    """[B, Sq] and [B, Sk] segment ids, [Sq] and [Sk] positions -> [B, Sq, Sk] bool: key t visible to
    query s."""
    see = _seen(pos_q[None, :, None], pos_k[None, None, :], window)
    return see & (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] > 0)


def _key_blocks(i, bs: int, window: int):
    """The key blocks [first, i] that query block i can see (causal; within the window)."""
    first = jnp.maximum(0, (i * bs - window + 1) // bs) if window else 0
    return first, i + 1


def _query_blocks(j, bs: int, window: int, nb: int):
    """The query blocks [j, last) that can see key block j."""
    last = jnp.minimum(nb, (j * bs + bs - 1 + window - 1) // bs + 1) if window else nb
    return j, last


def _tile(scale, window, bs, qi, kj, seg, i, j):
    """Scores of query block i against key block j: [B, G, R, bs, bs] f32, invisible ones MASKED_SCORE."""
    s = jnp.einsum("bgrqd,bgkd->bgrqk", qi, kj) * scale
    pos = jnp.arange(bs)
    seg_q = jax.lax.dynamic_slice_in_dim(seg, i * bs, bs, axis=1)
    seg_k = jax.lax.dynamic_slice_in_dim(seg, j * bs, bs, axis=1)
    see = visible(seg_q, seg_k, i * bs + pos, j * bs + pos, window)
    return jnp.where(see[:, None, None], s, MASKED_SCORE)


def _block(a, i, bs: int, axis: int):
    return jax.lax.dynamic_slice_in_dim(a, i * bs, bs, axis=axis)


def _forward(scale, window, bs, q, k, v, seg):
    """(out [B, G, R, Sp, Dv], log-sum-exp [B, G, R, Sp]) by query blocks, keys streamed."""
    nb = q.shape[3] // bs

    def query_block(i):
        qi = _block(q, i, bs, 3)
        m0 = jnp.full(qi.shape[:-1], MASKED_SCORE, jnp.float32)
        acc0 = jnp.zeros((*qi.shape[:-1], v.shape[-1]), jnp.float32)

        def step(j, carry):
            m, l, acc = carry
            s = _tile(scale, window, bs, qi, _block(k, j, bs, 2), seg, i, j)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("bgrqk,bgkd->bgrqd", p, _block(v, j, bs, 2))
            return m_new, l * corr + jnp.sum(p, axis=-1), acc

        first, last = _key_blocks(i, bs, window)
        m, l, acc = jax.lax.fori_loop(first, last, step, (m0, jnp.zeros_like(m0), acc0))
        return acc / l[..., None], m + jnp.log(l)

    out, lse = jax.lax.map(query_block, jnp.arange(nb))  # [nb, B, G, R, bs, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(*q.shape[:3], -1, v.shape[-1])
    return out, jnp.moveaxis(lse, 0, 3).reshape(*q.shape[:3], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(scale: float, window: int, bs: int, q, k, v, seg):
    return _forward(scale, window, bs, q, k, v, seg)[0]


def _flash_fwd(scale, window, bs, q, k, v, seg):
    out, lse = _forward(scale, window, bs, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, window, bs, res, dout):
    # One pass over key blocks j, each against the query blocks that see it: every tile's probabilities
    # and score gradients are computed once, and feed dk_j and dv_j (kept per j) and dq_i (accumulated
    # into the whole dq, carried from j to j).
    q, k, v, seg, out, lse = res
    nb = q.shape[3] // bs
    delta = jnp.sum(dout * out, axis=-1)  # [B, G, R, Sp]

    def key_block(dq, j):
        kj, vj = _block(k, j, bs, 2), _block(v, j, bs, 2)

        def step(i, carry):
            dk, dv, dq = carry
            qi, doi = _block(q, i, bs, 3), _block(dout, i, bs, 3)
            p = jnp.exp(_tile(scale, window, bs, qi, kj, seg, i, j) - _block(lse, i, bs, 3)[..., None])
            dp = jnp.einsum("bgrqd,bgkd->bgrqk", doi, vj)
            ds = p * (dp - _block(delta, i, bs, 3)[..., None])
            dv = dv + jnp.einsum("bgrqk,bgrqd->bgkd", p, doi)
            dk = dk + jnp.einsum("bgrqk,bgrqd->bgkd", ds, qi)
            dq_i = _block(dq, i, bs, 3) + jnp.einsum("bgrqk,bgkd->bgrqd", ds, kj) * scale
            return dk, dv, jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bs, axis=3)

        first, last = _query_blocks(j, bs, window, nb)
        dk, dv, dq = jax.lax.fori_loop(first, last, step, (jnp.zeros_like(kj), jnp.zeros_like(vj), dq))
        return dq, (dk * scale, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros_like(q), jnp.arange(nb))
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
