"""Grouped-query self-attention with RoPE, optional q/k RMSNorm and biases; causal, segment and
sliding-window masking shared with the latent attention in mla.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.linear import Linear
from ktjax.nn.norm import RMSNorm
from ktjax.nn.rope import rope, softmax_scale


def attention_mask(segment_ids: jax.Array, sliding_window: int = 0) -> jax.Array:
    """[B, S] segment ids (0 = padding) -> [B, 1, S, S] bool: causal, within one segment, and with
    sliding_window > 0 only the last `sliding_window` keys (the query's own included)."""
    S = segment_ids.shape[1]
    q, k = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    visible = k <= q
    if sliding_window:
        visible &= q - k < sliding_window
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (visible & same & (segment_ids[:, :, None] > 0))[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax attention. q: [B, S, N, Dk]; k: [B, S, G, Dk]; v: [B, S, G, Dv] with N a multiple of G
    (query heads share key/value heads in groups); mask: [B, 1, S, S] -> [B, S, N * Dv] f32."""
    B, S, N, Dk = q.shape
    G = k.shape[2]
    q = q.reshape(B, S, G, N // G, Dk)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * scale  # [B, G, N/G, S, S]
    logits = jnp.where(mask[:, :, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(B, S, N * v.shape[-1])


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        scale, bias = cfg.lora_scale, cfg.attention_bias

        def proj(name, i, o):
            rank = cfg.lora_rank_for(name)
            return Linear(i, o, rngs=rngs, dtype=dtype, bias=bias, lora_rank=rank, lora_scale=scale)

        self.q_proj = proj("q_proj", H, nh * hd)
        self.k_proj = proj("k_proj", H, nkv * hd)
        self.v_proj = proj("v_proj", H, nkv * hd)
        self.o_proj = proj("o_proj", nh * hd, H)
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.shape = (nh, nkv, hd)
        self.theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, S, H] f32; positions: [B, S] int; mask: [B, 1, S, S] bool -> [B, S, H] f32."""
        B, S, _ = x.shape
        nh, nkv, hd = self.shape
        q = self.q_proj(x).reshape(B, S, nh, hd)
        k = self.k_proj(x).reshape(B, S, nkv, hd)
        v = self.v_proj(x).reshape(B, S, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q, positions, self.theta, self.rope_scaling)
        k = rope(k, positions, self.theta, self.rope_scaling)
        return self.o_proj(attend(q, k, v, mask, softmax_scale(hd, self.rope_scaling)))
