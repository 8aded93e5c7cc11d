"""Random quantized expert weights, generated in their quantized form (random codes and scales, never a
float copy): the initialisation of a quantized model built from a config rather than loaded. Each
expert has its own random stream (the key folded with its index), so that a process holding some of
the experts (expert parallelism) draws just those, with the values one process drawing all would."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ktjax.quant.formats import QuantizedWeight, parse_spec


def expert_keys(key: jax.Array, experts: range) -> jax.Array:
    """One key per expert in `experts`: `key` folded with the expert's index."""
    return jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(experts.start, experts.stop))


def random_codes(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform random uint8 [len(keys), *shape], one key each, from numpy's PCG64 seeded by the key
    (about 30x faster than JAX's threefry on a CPU: 16 GB of int4 codes in seconds, not minutes).
    Traced (under jax.eval_shape or jit), jax.random.bits draws them, so the values differ."""
    if isinstance(keys, jax.core.Tracer):
        return jax.vmap(lambda k: jax.random.bits(k, shape, jnp.uint8))(keys)
    n = int(np.prod(shape))
    out = np.empty((len(keys), n), np.uint8)
    for row, seed in zip(out, np.asarray(jax.random.key_data(keys)).reshape(len(keys), -1)):
        row[:] = np.random.PCG64(seed.tolist()).random_raw(-(-n // 8)).view(np.uint8)[:n]
    return jnp.asarray(out.reshape(len(keys), *shape))


def random_quantized(
    key: jax.Array, spec: str, shape: tuple[int, int, int], std: float, experts: range | None = None
) -> QuantizedWeight:
    """A [E, out, in] weight in format `spec` (parse_spec) whose values have mean 0 and standard
    deviation `std`: int8 and int4 codes uniform over their range (one random byte each, two int4
    codes a byte: random_codes), fp8 a normal sample in e4m3; with `experts`, only those experts
    ([len(experts), out, in], the values they have in the whole weight). Works traced too
    (jax.eval_shape)."""
    fmt, group, block = parse_spec(spec)
    E, out, in_ = shape
    experts = range(E) if experts is None else experts
    n = len(experts)
    keys = expert_keys(key, experts)
    if fmt == "fp8":  # N(0, 16^2) in e4m3 (well inside its range), block scales std / 16
        b0, b1 = block
        data = jax.vmap(lambda k: jax.random.normal(k, (out, in_), jnp.bfloat16) * 16)(keys)
        scales = jnp.full((n, -(-out // b0), -(-in_ // b1)), std / 16, jnp.float32)
        return QuantizedWeight(data.astype(jnp.float8_e4m3fn), scales, "fp8", (n, out, in_), block=block)
    if fmt == "int8":  # uniform over -128..127: mean -1/2, sd sqrt((256^2 - 1) / 12)
        scales = jnp.full((n, out), std / np.sqrt((256**2 - 1) / 12), jnp.float32)
        return QuantizedWeight(random_codes(keys, (out, in_)).view(jnp.int8), scales, "int8", (n, out, in_))
    # int4, two codes a byte: uniform over 0..15: mean 15/2, sd sqrt((16^2 - 1) / 12)
    scale = float(ml_dtypes.bfloat16(std / np.sqrt((16**2 - 1) / 12)))
    pair = jnp.array([scale, -7.5 * scale], jnp.bfloat16)
    scales = jnp.broadcast_to(pair, (n, out, -(-in_ // group), 2))
    return QuantizedWeight(
        random_codes(keys, (out, (in_ + 1) // 2)), scales, "int4", (n, out, in_), group=group
    )
