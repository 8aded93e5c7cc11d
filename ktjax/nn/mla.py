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
from ktjax.ops.attention import attention


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

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x: [B, S, H] f32; positions, segment_ids: [B, S] int (0 = padding) -> [B, S, H] f32."""
        B, S, _ = x.shape
        nh, dn, dr, dv, rank = self.dims
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, S, nh, dn + dr)
        q_pass, q_rot = q[..., :dn], q[..., dn:]
        latent = self.kv_a_proj_with_mqa(x)  # [B, S, rank + dr]
        kv = self.kv_b_proj(self.kv_a_layernorm(latent[..., :rank])).reshape(B, S, nh, dn + dv)
        k_rot = latent[..., None, rank:]  # [B, S, 1, dr], shared by every head
        if self.interleave:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot = rope(q_rot, positions, self.theta, self.rope_scaling)
        k_rot = rope(k_rot, positions, self.theta, self.rope_scaling)
        q = jnp.concatenate([q_pass, q_rot], -1)
        k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(k_rot, (B, S, nh, dr))], -1)
        scale = softmax_scale(dn + dr, self.rope_scaling)
        out = attention(
            q, k, kv[..., dn:], segment_ids, scale=scale, window=self.window, backend=self.backend
        )
        return self.o_proj(out)
