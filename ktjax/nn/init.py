"""Random initialisation that stays within the weight's own size in memory, and, for the routed
experts of expert parallelism, within each process's share of them (``experts_sharded``)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.quant.formats import QuantizedWeight
from ktjax.quant.init import random_quantized
from ktjax.sharding import global_from_local, local_experts

CHUNK = 1 << 24  # elements generated at once for large weights

# Where the routed experts' weights are made: None, on this process's default device, whole; else laid
# out by this sharding (each process computing only its own devices' parts).
_EXPERTS_SHARDING: contextvars.ContextVar[jax.sharding.Sharding | None] = contextvars.ContextVar(
    "ktjax_experts_sharding", default=None
)


@contextlib.contextmanager
def experts_sharded(sharding: jax.sharding.Sharding) -> Iterator[None]:
    """Within this block, models draw their routed experts' [E, ...] weights laid out by `sharding`
    (expert parallelism: split along E), with the values they would have on one device."""
    token = _EXPERTS_SHARDING.set(sharding)
    try:
        yield
    finally:
        _EXPERTS_SHARDING.reset(token)


def draw_experts(draw: Callable, key: jax.Array, *static) -> jax.Array:
    """draw(key, *static): a routed experts' weight [E, ...] (an array or a pytree of them), made where
    ``experts_sharded`` says: by default as it is, else compiled with that layout for its result, one
    weight at a time (so that no process holds more than its part, plus one weight's temporaries)."""
    sharding = _EXPERTS_SHARDING.get()
    if sharding is None:
        return draw(key, *static)
    return _compiled(draw, sharding, len(static))(key, *static)


def draw_quantized_experts(
    key: jax.Array, spec: str, shape: tuple[int, int, int], std: float
) -> QuantizedWeight:
    """random_quantized's weight, made where ``experts_sharded`` says: a process draws only its own
    experts (each expert has its own random stream: the values do not depend on the layout)."""
    sharding = _EXPERTS_SHARDING.get()
    if sharding is None:
        return random_quantized(key, spec, shape, std)
    local = random_quantized(key, spec, shape, std, experts=local_experts(sharding, shape[0]))
    data, scales = (
        global_from_local(sharding, a, (shape[0], *a.shape[1:])) for a in (local.data, local.scales)
    )
    return dataclasses.replace(local, data=data, scales=scales, shape=tuple(shape))


@functools.lru_cache(maxsize=64)
def _compiled(draw: Callable, sharding: jax.sharding.Sharding, n_static: int) -> Callable:
    return jax.jit(draw, static_argnums=tuple(range(1, 1 + n_static)), out_shardings=sharding)


def normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """N(0, std^2) samples of `shape` in `dtype`. Up to CHUNK elements in one draw (f32, then cast);
    a larger weight (a 151936 x 2048 embedding, say) is drawn in blocks of rows, one key each, so that
    generating it needs its own bytes plus one block's f32 temporaries, not several f32 copies of it."""
    size = int(np.prod(shape))
    if size <= CHUNK or len(shape) < 2:
        return _scaled_normal(key, tuple(shape), std, dtype)
    rows = max(1, CHUNK // int(np.prod(shape[1:])))
    starts = range(0, shape[0], rows)
    keys = jax.random.split(key, len(starts))
    if isinstance(key, jax.core.Tracer):  # inside a trace: one program, which XLA schedules itself
        blocks = [
            _scaled_normal(k, (min(rows, shape[0] - s), *shape[1:]), std, dtype) for k, s in zip(keys, starts)
        ]
        return jnp.concatenate(blocks)
    # Called eagerly, each block is drawn and written into the result in place (donated) before the
    # next is dispatched: JAX's asynchronous dispatch would otherwise run the blocks' draws side by
    # side, their f32 temporaries together taking several times the weight's bytes.
    out = jnp.empty(shape, dtype)
    for k, s in zip(keys, starts):
        block = _scaled_normal(k, (min(rows, shape[0] - s), *shape[1:]), std, dtype)
        out = jax.block_until_ready(_put_rows(out, block, s))
    return out


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(out: jax.Array, block: jax.Array, start: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _scaled_normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    # One compiled computation, called alone or inside draw_experts' program: the same values either
    # way (the scaling compiled apart from the draw can round differently than fused with it).
    return (jax.random.normal(key, shape) * std).astype(dtype)
