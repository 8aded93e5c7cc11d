"""Grouped-query self-attention with RoPE, optional q/k RMSNorm and biases. The attention itself (causal,
within each packed segment, sliding windows) is ktjax.ops.attention, shared with mla.py. ``cached`` is
the decoding form (ktjax.generate), with a key/value cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.linear import Linear
from ktjax.nn.norm import RMSNorm
from ktjax.nn.rope import rope, softmax_scale
from ktjax.ops.attention import attention, cached_attention, write_cache


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
        self.attention_dtype = cfg.attention_dtype
        self.scale = softmax_scale(hd, cfg.rope_scaling)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x: [B, S, H] f32; positions, segment_ids: [B, S] int (0 = padding) -> [B, S, H] f32."""
        q, k, v = self._project(x, positions)
        out = attention(q, k, v, segment_ids, scale=self.scale, window=self.window, backend=self.backend)
        return self.o_proj(out)

    def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        """The keys (after RoPE) and values of `length` positions: k, v [batch, length, kv heads, D] f32."""
        _, nkv, hd = self.shape
        return {"k": jnp.zeros((batch, length, nkv, hd)), "v": jnp.zeros((batch, length, nkv, hd))}

    def cached(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: dict, prefill: bool
    ) -> tuple[jax.Array, dict]:
        """As ``__call__``, for decoding: the tokens' keys and values written into `cache` at their
        positions (each row's positions consecutive). prefill: the tokens are the start of every row
        (positions 0..S-1) and attend to each other; else they attend to the cache."""
        q, k, v = self._project(x, positions)
        start = positions[:, 0]
        cache = {"k": write_cache(cache["k"], k, start), "v": write_cache(cache["v"], v, start)}
        if prefill:
            out = attention(q, k, v, segment_ids, scale=self.scale, window=self.window, backend=self.backend)
        else:
            out = cached_attention(q, cache["k"], cache["v"], positions, scale=self.scale, window=self.window)
        return self.o_proj(out), cache

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, S, H] -> q [B, S, heads, D], k and v [B, S, kv heads, D], q and k rotated (in
        ModelConfig.attention_dtype)."""
        B, S, _ = x.shape
        nh, nkv, hd = self.shape
        q = self.q_proj(x).reshape(B, S, nh, hd)
        k = self.k_proj(x).reshape(B, S, nkv, hd)
        v = self.v_proj(x).reshape(B, S, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q, positions, self.theta, self.rope_scaling)
        k = rope(k, positions, self.theta, self.rope_scaling)
        return tuple(a.astype(self.attention_dtype) for a in (q, k, v))
