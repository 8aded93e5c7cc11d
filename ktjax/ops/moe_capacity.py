"""The fastest pure-JAX routed experts we can write for XLA:CPU, as the benchmark's baseline.

Slots are sorted by expert and gathered into per-expert capacity buffers [E, C, H] (index-gather
dispatch), the projections are batched einsums over experts, and results are scatter-added back.
With C = the largest expert load (computed from the ids on the host) nothing is dropped, so the
result equals ``moe_experts``. Differentiable with plain ``jax.grad``. Computes in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.ops.moe_checks import LoraDict


def dropless_capacity(topk_ids: np.ndarray, num_experts: int) -> int:
    """Largest number of slots any expert receives (>= 1): a capacity at which nothing drops."""
    ids = np.asarray(topk_ids).reshape(-1)
    counts = np.bincount(ids[ids >= 0], minlength=num_experts)
    return max(int(counts.max()), 1)


def moe_experts_capacity(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    lora: LoraDict | None = None,
    lora_scale: float = 1.0,
    *,
    capacity: int,
) -> jax.Array:
    """Same contract as ``moe_experts``; slots past `capacity` for an expert are dropped."""
    T, K = topk_ids.shape
    E = gate.shape[0]
    f32 = jnp.float32
    flat = topk_ids.reshape(-1)
    key = jnp.where(flat >= 0, flat, E)
    order = jnp.argsort(key, stable=True)
    counts = jnp.bincount(key, length=E + 1)[:E]
    starts = jnp.cumsum(counts) - counts
    c = jnp.arange(capacity)
    pos = starts[:, None] + c[None, :]  # [E, C] sorted positions
    valid = c[None, :] < counts[:, None]
    slot = jnp.where(valid, order[jnp.minimum(pos, T * K - 1)], T * K)  # T*K: padding slot
    token = jnp.where(valid, slot // K, T)  # T: a zero row
    weight = jnp.where(valid, jnp.append(topk_weights.reshape(-1), 0.0)[slot], 0.0)
    x_pad = jnp.concatenate([x.astype(f32), jnp.zeros((1, x.shape[1]), f32)])
    xs = x_pad[token]  # [E, C, H]
    lora = lora or {}

    def project(v, name, w):
        out = jnp.einsum("eci,eoi->eco", v, w.astype(f32))
        if name in lora:
            a, b = lora[name]
            z = jnp.einsum("eci,eri->ecr", v, a.astype(f32))
            out = out + lora_scale * jnp.einsum("ecr,eor->eco", z, b.astype(f32))
        return out

    h = jax.nn.silu(project(xs, "gate", gate)) * project(xs, "up", up)
    o = project(h, "down", down) * weight[..., None]
    y = jnp.zeros((T + 1, x.shape[1]), f32).at[token.reshape(-1)].add(o.reshape(-1, x.shape[1]))
    return y[:T].astype(x.dtype)
