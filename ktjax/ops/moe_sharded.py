"""Expert parallelism inside ``jax.shard_map``: each shard of a mesh axis owns E / P of a layer's routed
experts, and every routing slot travels to its expert's owner and back with ``all_to_all``.

Called inside ``jax.shard_map`` over ``axis_name`` (P shards): each shard passes its own tokens and its
own experts; ``topk_ids`` are global expert ids (shard p owns experts p E_l .. (p + 1) E_l - 1, E_l =
E / P). Dispatch has a static capacity with no drops: every shard reserves room for all of its T K
slots towards every other shard, so the exchanged buffers hold P T K rows of H values per shard (each
token row once per slot that leaves for that shard), the bound that holds whatever the routing. The
owner runs ``moe_experts`` on what it received (one slot per row), and the results return the same
way and are summed per token in f32 (for bf16 tokens each slot's result is rounded to bf16 first,
where ``moe_experts`` rounds the sum once). The backward mirrors it (JAX transposes ``all_to_all`` as
an ``all_to_all``); the experts' gradients stay with their owner.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ktjax.ops.moe_experts import LoraDict, moe_experts
from ktjax.quant.formats import is_quantized


def moe_experts_sharded(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    axis_name: str,
    lora: LoraDict | None = None,
    lora_scale: float = 1.0,
    backend: str = "cpu",
    policy: str = "retain",
    intermediates: str = "auto",
) -> jax.Array:
    """``moe_experts`` with the experts split over the shards of ``axis_name`` (call inside shard_map).

    Args:
      x: [T, H] bf16 or f32 — this shard's tokens.
      topk_ids: [T, K] int32 — global expert ids in [0, E) (E = P E_l), -1 drops the slot.
      topk_weights: [T, K] f32 — router weights.
      gate, up: [E_l, I, H]; down: [E_l, H, I] — this shard's experts; lora as for moe_experts, [E_l, ...].
      backend, policy, intermediates: as for ``moe_experts``.

    Returns:
      y: [T, H], x's dtype — this shard's tokens through all of their experts, wherever they live.
    """
    shards = jax.lax.axis_size(axis_name)
    T, K = topk_ids.shape
    gate, up, down = (_this_shards(w) for w in (gate, up, down))
    local = gate.shape[0]
    slots = T * K
    ids = topk_ids.reshape(slots)
    dest = jnp.where(ids >= 0, jnp.minimum(ids // local, shards - 1), shards)  # shards: a dropped slot
    # An expert id past the last shard's experts makes every shard's kernels refuse their ids: one
    # shard failing alone would leave the others waiting in the exchange back until XLA aborts.
    out_of_range = jax.lax.psum(jnp.sum(ids >= shards * local), axis_name) > 0
    # each slot's row in its owner's buffer: how many earlier slots go to the same owner
    onehot = jax.nn.one_hot(dest, shards, dtype=jnp.int32)  # dropped slots: all zeros
    row = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    token = jnp.arange(slots) // K
    # send buffers [P, slots]: the slot at (owner, row), empty places dropped (-1); a dropped slot is
    # written out of bounds and so discarded
    where = (dest, row)
    send_ids = jnp.full((shards, slots), -1, jnp.int32).at[where].set(ids - dest * local, mode="drop")
    weights = topk_weights.reshape(slots)
    send_w = jnp.zeros((shards, slots), weights.dtype).at[where].set(weights, mode="drop")
    send_x = jnp.zeros((shards, slots, x.shape[1]), x.dtype).at[where].set(x[token], mode="drop")
    # to the owners: recv[s] is what shard s sent here
    recv_x = exchange(send_x, axis_name)
    recv_ids = jax.lax.all_to_all(send_ids, axis_name, 0, 0, tiled=False)
    recv_w = jax.lax.all_to_all(send_w, axis_name, 0, 0, tiled=False)
    y = moe_experts(
        recv_x.reshape(shards * slots, -1),
        jnp.where(out_of_range, local, recv_ids).reshape(shards * slots, 1),
        recv_w.reshape(shards * slots, 1),
        gate,
        up,
        down,
        lora=lora,
        lora_scale=lora_scale,
        backend=backend,
        policy=policy,
        intermediates=intermediates,
    )
    back = exchange(y.reshape(shards, slots, -1), axis_name)
    # each slot's result from where it was sent; dropped slots read zeros
    per_slot = jnp.where((ids >= 0)[:, None], back[jnp.minimum(dest, shards - 1), row], 0)
    return jnp.sum(per_slot.reshape(T, K, -1).astype(jnp.float32), axis=1).astype(x.dtype)


def _this_shards(w):
    """A weight as this shard holds it: a quantized weight's arrays are split along E inside shard_map
    but its (static) shape still says the whole E; it is given the shard's E."""
    if is_quantized(w) and w.data.shape[0] != w.shape[0]:
        return dataclasses.replace(w, shape=(w.data.shape[0], *w.shape[1:]))
    return w


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def exchange(a: jax.Array, axis_name: str) -> jax.Array:
    """``all_to_all`` over axis 0 ([P, ...]: part p goes to shard p, and the result's part p came from
    shard p) in the array's own width: XLA's CPU collectives widen 16-bit floats to f32 on the wire,
    so bf16 travels as uint16 bits. Its transpose is the same exchange."""
    return _exchange_bits(a, axis_name)


def _exchange_bits(a: jax.Array, axis_name: str) -> jax.Array:
    if a.dtype.itemsize != 2 or not jnp.issubdtype(a.dtype, jnp.floating):
        return jax.lax.all_to_all(a, axis_name, 0, 0, tiled=False)
    bits = jax.lax.all_to_all(jax.lax.bitcast_convert_type(a, jnp.uint16), axis_name, 0, 0, tiled=False)
    return jax.lax.bitcast_convert_type(bits, a.dtype)


def _exchange_fwd(a: jax.Array, axis_name: str):
    return _exchange_bits(a, axis_name), None


def _exchange_bwd(axis_name: str, _, g: jax.Array):
    return (_exchange_bits(g, axis_name),)


exchange.defvjp(_exchange_fwd, _exchange_bwd)
