"""Dense SwiGLU MLP: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

from __future__ import annotations

import jax
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.linear import Linear


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, intermediate: int, *, rngs: nnx.Rngs, dtype):
        H = cfg.hidden_size

        def linear(name: str, in_dim: int, out_dim: int) -> Linear:
            rank, scale = cfg.lora_rank_for(name), cfg.lora_scale
            return Linear(in_dim, out_dim, rngs=rngs, dtype=dtype, lora_rank=rank, lora_scale=scale)

        self.gate_proj = linear("gate_proj", H, intermediate)
        self.up_proj = linear("up_proj", H, intermediate)
        self.down_proj = linear("down_proj", intermediate, H)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., H] -> [..., H] f32."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
