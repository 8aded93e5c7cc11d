"""Grouped-query self-attention with RoPE, optional q/k RMSNorm, causal and segment masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.models.config import ModelConfig
from ktjax.nn.linear import Linear
from ktjax.nn.norm import RMSNorm


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, Hugging Face "rotate_half" convention. x: [B, S, N, D]; positions: [B, S]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq  # [B, S, D/2]
    cos = jnp.concatenate([jnp.cos(angle)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angle)] * 2, -1)[:, :, None, :]
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, S] segment ids (0 = padding) -> [B, 1, S, S] bool: causal, within one segment."""
    S = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((S, S), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same & (segment_ids[:, :, None] > 0))[:, None]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        scale = cfg.lora_scale

        def proj(name, i, o):
            return Linear(i, o, rngs=rngs, dtype=dtype, lora_rank=cfg.lora_rank_for(name), lora_scale=scale)

        self.q_proj = proj("q_proj", H, nh * hd)
        self.k_proj = proj("k_proj", H, nkv * hd)
        self.v_proj = proj("v_proj", H, nkv * hd)
        self.o_proj = proj("o_proj", nh * hd, H)
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.shape = (nh, nkv, hd)
        self.theta = cfg.rope_theta

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, S, H] f32; positions: [B, S] int; mask: [B, 1, S, S] bool -> [B, S, H] f32."""
        B, S, _ = x.shape
        nh, nkv, hd = self.shape
        q = self.q_proj(x).reshape(B, S, nh, hd)
        k = self.k_proj(x).reshape(B, S, nkv, hd)
        v = self.v_proj(x).reshape(B, S, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        q = q.reshape(B, S, nkv, nh // nkv, hd)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * hd**-0.5  # [B, nkv, groups, S, S]
        logits = jnp.where(mask[:, :, None], logits, -1e30)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(B, S, nh * hd)
        return self.o_proj(out)
