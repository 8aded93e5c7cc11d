"""Grouped-query self-attention with RoPE, optional q/k RMSNorm and biases. The attention itself (causal,
within each packed segment, sliding windows) is ktjax.ops.attention, shared with mla.py."""

from __future__ import annotations

import jax
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.linear import Linear
from ktjax.nn.norm import RMSNorm
from ktjax.nn.rope import rope, softmax_scale
from ktjax.ops.attention import attention


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
        self.window, self.backend = cfg.sliding_window, cfg.attention_backend

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x: [B, S, H] f32; positions, segment_ids: [B, S] int (0 = padding) -> [B, S, H] f32."""
        B, S, _ = x.shape
        nh, nkv, hd = self.shape
        q = self.q_proj(x).reshape(B, S, nh, hd)
        k = self.k_proj(x).reshape(B, S, nkv, hd)
        v = self.v_proj(x).reshape(B, S, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q, positions, self.theta, self.rope_scaling)
        k = rope(k, positions, self.theta, self.rope_scaling)
        scale = softmax_scale(hd, self.rope_scaling)
        out = attention(q, k, v, segment_ids, scale=scale, window=self.window, backend=self.backend)
        return self.o_proj(out)
