"""Dense SwiGLU MLP: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

from __future__ import annotations

import jax
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.linear import Linear


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, intermediate: int, *, rngs: nnx.Rngs, dtype):
        H, scale = cfg.hidden_size, cfg.lora_scale
        self.gate_proj = Linear(
            H,
            intermediate,
            rngs=rngs,
            dtype=dtype,
            lora_rank=cfg.lora_rank_for("gate_proj"),
            lora_scale=scale,
        )
        self.up_proj = Linear(
            H, intermediate, rngs=rngs, dtype=dtype, lora_rank=cfg.lora_rank_for("up_proj"), lora_scale=scale
        )
        self.down_proj = Linear(
            intermediate,
            H,
            rngs=rngs,
            dtype=dtype,
            lora_rank=cfg.lora_rank_for("down_proj"),
            lora_scale=scale,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., H] -> [..., H] f32."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
