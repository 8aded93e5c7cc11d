"""Random normal initialisation that stays within the weight's own size in memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 1 << 24  # elements generated at once for large weights


def normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """N(0, std^2) samples of `shape` in `dtype`. Up to CHUNK elements in one draw (f32, then cast);
    a larger weight (a 151936 x 2048 embedding, say) is drawn in blocks of rows, one key each, so that
    generating it needs its own bytes plus one block's f32 temporaries, not several f32 copies of it."""
    size = int(np.prod(shape))
    if size <= CHUNK or len(shape) < 2:
        return (jax.random.normal(key, shape) * std).astype(dtype)
    rows = max(1, CHUNK // int(np.prod(shape[1:])))
    starts = range(0, shape[0], rows)
    keys = jax.random.split(key, len(starts))
    blocks = [
        (jax.random.normal(k, (min(rows, shape[0] - s), *shape[1:])) * std).astype(dtype)
        for k, s in zip(keys, starts)
    ]
    return jnp.concatenate(blocks)
