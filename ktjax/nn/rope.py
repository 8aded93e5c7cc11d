"""Rotary position embeddings (Hugging Face "rotate_half" layout), plain or YaRN-scaled.

``rope_scaling`` is None or Hugging Face's dict: {"rope_type": "yarn", "factor": 40,
"original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1,
"mscale_all_dim": 1} (the DeepSeek-V3 setting); other scaling types are refused.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.config import rope_type


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(dim: int, theta: float, rope_scaling: dict | None) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [dim/2] f32 and the factor that scales cos and sin."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    pos_freqs = np.float32(theta) ** exponents
    if rope_type(rope_scaling) == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    p = rope_scaling
    factor = float(p["factor"])
    original = float(p["original_max_position_embeddings"])
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = _mscale(factor, p["mscale"]) / _mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = _mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def softmax_scale(head_dim: int, rope_scaling: dict | None) -> float:
    """The attention logit scale: head_dim^-0.5, times YaRN's mscale_all_dim correction squared
    (DeepSeek-V3)."""
    scale = head_dim**-0.5
    if rope_type(rope_scaling) == "yarn" and rope_scaling.get("mscale_all_dim"):
        scale *= _mscale(float(rope_scaling["factor"]), rope_scaling["mscale_all_dim"]) ** 2
    return scale


def rope(x: jax.Array, positions: jax.Array, theta: float, rope_scaling: dict | None = None) -> jax.Array:
    """x: [B, S, N, D]; positions: [B, S] int -> [B, S, N, D] f32, rotated in "rotate_half" layout."""
    inv, attention_factor = inverse_frequencies(x.shape[-1], theta, rope_scaling)
    angle = positions[..., None].astype(jnp.float32) * jnp.asarray(inv)  # [B, S, D/2]
    cos = jnp.concatenate([jnp.cos(angle)] * 2, -1)[:, :, None, :] * attention_factor
    sin = jnp.concatenate([jnp.sin(angle)] * 2, -1)[:, :, None, :] * attention_factor
    half = x.shape[-1] // 2
    x = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def deinterleave(x: jax.Array) -> jax.Array:
    """[..., D] with RoPE pairs (x0, x1), (x2, x3), ... -> [x0, x2, ..., x1, x3, ...], the "rotate_half"
    layout. Applied to queries and keys alike it leaves their dot products as the interleaved form."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], -1)
