"""Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank bottleneck, keys
and values expanded from one compressed latent per token, plus a RoPE key shared by all heads.
Parameter names follow Hugging Face's DeepseekV3Attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.linear import Linear
from ktjax.nn.norm import RMSNorm
from ktjax.nn.rope import deinterleave, rope, softmax_scale
from ktjax.ops.attention import MASKED_SCORE, attention, cache_visible, write_cache


class LatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        scale, bias = cfg.lora_scale, cfg.attention_bias

        def proj(name, i, o, with_bias=False):
            rank = cfg.lora_rank_for(name)
            return Linear(i, o, rngs=rngs, dtype=dtype, bias=with_bias, lora_rank=rank, lora_scale=scale)

        if cfg.q_lora_rank:
            self.q_proj = None
            self.q_a_proj = proj("q_a_proj", H, cfg.q_lora_rank, bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps, dtype=dtype)
            self.q_b_proj = proj("q_b_proj", cfg.q_lora_rank, nh * (dn + dr))
        else:
            self.q_proj = proj("q_proj", H, nh * (dn + dr))
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        self.kv_a_proj_with_mqa = proj("kv_a_proj_with_mqa", H, cfg.kv_lora_rank + dr, bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps, dtype=dtype)
        self.kv_b_proj = proj("kv_b_proj", cfg.kv_lora_rank, nh * (dn + dv))
        self.o_proj = proj("o_proj", nh * dv, H, bias)
        self.dims = (nh, dn, dr, dv, cfg.kv_lora_rank)
        self.theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        self.interleave = cfg.rope_interleave
        self.window, self.backend = cfg.sliding_window, cfg.attention_backend
        self.attention_dtype = cfg.attention_dtype
        self.scale = softmax_scale(dn + dr, cfg.rope_scaling)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x: [B, S, H] f32; positions, segment_ids: [B, S] int (0 = padding) -> [B, S, H] f32."""
        q_pass, q_rot = self._queries(x, positions)
        latent, k_rot = self._latent(x, positions)
        return self.o_proj(self._expanded(q_pass, q_rot, latent, k_rot, segment_ids))

    def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        """What DeepSeek's reference caches: the normalised latent [batch, length, kv_lora_rank] and the
        rotated shared key [batch, length, qk_rope_head_dim], f32."""
        _, _, dr, _, rank = self.dims
        return {"latent": jnp.zeros((batch, length, rank)), "k_rot": jnp.zeros((batch, length, dr))}

    def cached(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: dict, prefill: bool
    ) -> tuple[jax.Array, dict]:
        """As ``__call__``, for decoding (see Attention.cached). Decoding attends in the latent space
        (the key and value expansions kv_b_proj folded into the query and the output: per step the work
        is linear in the cached length times kv_lora_rank), so the cache is never expanded."""
        q_pass, q_rot = self._queries(x, positions)
        latent, k_rot = self._latent(x, positions)
        start = positions[:, 0]
        cache = {
            "latent": write_cache(cache["latent"], latent, start),
            "k_rot": write_cache(cache["k_rot"], k_rot, start),
        }
        if prefill:
            return self.o_proj(self._expanded(q_pass, q_rot, latent, k_rot, segment_ids)), cache
        nh, dn, dr, dv, rank = self.dims
        w = self.kv_b_proj.effective_weight().reshape(nh, dn + dv, rank)  # the adapter included
        q_latent = jnp.einsum("bsnd,ndr->bsnr", q_pass, w[:, :dn])
        scores = jnp.einsum("bsnr,btr->bnst", q_latent, cache["latent"])
        scores = (scores + jnp.einsum("bsnd,btd->bnst", q_rot, cache["k_rot"])) * self.scale
        see = cache_visible(positions, cache["latent"].shape[1], self.window)
        probs = jax.nn.softmax(jnp.where(see[:, None], scores, MASKED_SCORE), axis=-1)
        out_latent = jnp.einsum("bnst,btr->bsnr", probs, cache["latent"])
        out = jnp.einsum("bsnr,ner->bsne", out_latent, w[:, dn:])
        return self.o_proj(out.reshape(*x.shape[:2], nh * dv)), cache

    def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, S, H] -> the query parts without and with position: [B, S, heads, dn], [.., dr] rotated."""
        B, S, _ = x.shape
        nh, dn, dr, _, _ = self.dims
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, S, nh, dn + dr)
        q_rot = deinterleave(q[..., dn:]) if self.interleave else q[..., dn:]
        return q[..., :dn].astype(jnp.float32), rope(q_rot, positions, self.theta, self.rope_scaling)

    def _latent(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, S, H] -> the normalised latent [B, S, kv_lora_rank], the rotated shared key [B, S, dr]."""
        rank = self.dims[4]
        latent = self.kv_a_proj_with_mqa(x)  # [B, S, rank + dr]
        k_rot = latent[..., None, rank:]  # [B, S, 1, dr], shared by every head
        if self.interleave:
            k_rot = deinterleave(k_rot)
        k_rot = rope(k_rot, positions, self.theta, self.rope_scaling)[:, :, 0]
        return self.kv_a_layernorm(latent[..., :rank]), k_rot

    def _expanded(self, q_pass, q_rot, latent, k_rot, segment_ids) -> jax.Array:
        """Keys and values expanded per head from the latent, then ``attention`` -> [B, S, heads * dv]."""
        B, S, nh, _ = q_pass.shape
        _, dn, dr, dv, _ = self.dims
        kv = self.kv_b_proj(latent).reshape(B, S, nh, dn + dv)
        q = jnp.concatenate([q_pass, q_rot], -1)
        k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(k_rot[:, :, None], (B, S, nh, dr))], -1)
        q, k, v = (a.astype(self.attention_dtype) for a in (q, k, kv[..., dn:]))
        return attention(q, k, v, segment_ids, scale=self.scale, window=self.window, backend=self.backend)
