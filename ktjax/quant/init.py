"""Random quantized expert weights, generated in their quantized form (random codes and scales, never a
float copy): the initialisation of a quantized model built from a config rather than loaded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.quant.formats import QuantizedWeight, parse_spec


def random_bytes(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform random uint8 of `shape`. Eagerly, numpy's PCG64 seeded from the key draws them (about 30x
    faster than JAX's threefry on a CPU: 16 GB of int4 codes in seconds, not minutes); traced (under
    jax.eval_shape or jit), jax.random.bits does, so the values differ between the two."""
    if isinstance(key, jax.core.Tracer):
        return jax.random.bits(key, shape, jnp.uint8)
    n = int(np.prod(shape))
    bits = np.random.PCG64(np.asarray(jax.random.key_data(key)).ravel().tolist())
    return jnp.asarray(bits.random_raw(-(-n // 8)).view(np.uint8)[:n].reshape(shape))


def random_quantized(key: jax.Array, spec: str, shape: tuple[int, int, int], std: float) -> QuantizedWeight:
    """A [E, out, in] weight in format `spec` (parse_spec) whose values have mean 0 and standard
    deviation `std`: int8 and int4 codes uniform over their range (one random byte each, two int4
    codes a byte: random_bytes), fp8 a normal sample in e4m3. Works traced too (jax.eval_shape)."""
    fmt, group, block = parse_spec(spec)
    E, out, in_ = shape
    if fmt == "int8":  # uniform over -128..127: mean -1/2, sd sqrt((256^2 - 1) / 12)
        data = random_bytes(key, shape).view(jnp.int8)
        scales = jnp.full((E, out), std / np.sqrt((256**2 - 1) / 12), jnp.float32)
        return QuantizedWeight(data, scales, "int8", shape)
    if fmt == "int4":  # uniform over 0..15: mean 15/2, sd sqrt((16^2 - 1) / 12)
        data = random_bytes(key, (E, out, (in_ + 1) // 2))
        scale = std / np.sqrt((16**2 - 1) / 12)
        groups = -(-in_ // group)
        scales = jnp.broadcast_to(jnp.array([scale, -7.5 * scale], jnp.float32), (E, out, groups, 2))
        return QuantizedWeight(data, scales, "int4", shape, group=group)
    b0, b1 = block  # fp8: N(0, 16^2) in e4m3 (well inside its range), block scales std / 16
    data = (jax.random.normal(key, shape, jnp.bfloat16) * 16).astype(jnp.float8_e4m3fn)
    scales = jnp.full((E, -(-out // b0), -(-in_ // b1)), std / 16, jnp.float32)
    return QuantizedWeight(data, scales, "fp8", shape, block=block)
