"""Pure-JAX routed experts (``backend="xla"``): exact, dropless, differentiable with plain ``jax.grad``.

Slots are sorted by expert and each projection is one ``jax.lax.ragged_dot`` over the expert groups.
Computes in float32 whatever the input dtype and returns the dtype of ``x``. On GPU/TPU
``ragged_dot`` lowers natively; on CPU it expands to a dense masked dot (E times the work), so this is
a reference there, not a fast path. An id outside [-1, E) makes its token's row of y NaN (under jit;
``moe_experts`` refuses such ids before the call where they are concrete).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ktjax.ops.moe_checks import LoraDict


def moe_experts_xla(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    lora: LoraDict | None = None,
    lora_scale: float = 1.0,
) -> jax.Array:
    """Same contract as ``ktjax.ops.moe_experts`` (x: [T, H]; gate, up: [E, I, H]; down: [E, H, I])."""
    T, K = topk_ids.shape
    E = gate.shape[0]
    f32 = jnp.float32
    flat_ids = topk_ids.reshape(-1)
    key = jnp.where(flat_ids >= 0, flat_ids, E)  # dropped slots sort after every expert
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)
    token = order // K
    kept = (key[order] < E).astype(f32)
    weight = topk_weights.reshape(-1)[order].astype(f32) * kept
    lora = lora or {}

    def project(v: jax.Array, name: str, w: jax.Array) -> jax.Array:
        out = jax.lax.ragged_dot(v, jnp.swapaxes(w, 1, 2).astype(f32), group_sizes)
        if name in lora:
            a, b = lora[name]
            z = jax.lax.ragged_dot(v, jnp.swapaxes(a, 1, 2).astype(f32), group_sizes)
            out = out + lora_scale * jax.lax.ragged_dot(z, jnp.swapaxes(b, 1, 2).astype(f32), group_sizes)
        return out

    xs = x[token].astype(f32)
    h = jax.nn.silu(project(xs, "gate", gate)) * project(xs, "up", up)
    o = project(h, "down", down) * weight[:, None]
    y = jnp.zeros((T, x.shape[1]), f32).at[token].add(o)
    out_of_range = jnp.any((topk_ids < -1) | (topk_ids >= E), axis=1)  # such slots would read no expert
    y = jnp.where(out_of_range[:, None], jnp.nan, y)
    return y.astype(x.dtype)
