"""MoE block: router, routed experts (stacked [E, ...] weights, optional per-expert LoRA) computed by
ktjax.ops.moe_experts, and optional shared experts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.expert_axis import axis_bound
from ktjax.nn.init import draw_experts, draw_quantized_experts, normal
from ktjax.nn.linear import LoRAParam
from ktjax.nn.mlp import MLP
from ktjax.nn.router import Router
from ktjax.ops import moe_experts, moe_experts_sharded


class ExpertProjection(nnx.Module):
    """One projection of every routed expert: weight [E, out, in] (`dtype`, or a QuantizedWeight when
    `quant` is not "none"), LoRA A [E, r, in], B [E, out, r] (`dtype`)."""

    def __init__(
        self, E: int, out_dim: int, in_dim: int, *, rngs: nnx.Rngs, dtype, lora_rank: int, quant: str = "none"
    ):
        std = in_dim**-0.5
        if quant == "none":
            self.weight = nnx.Param(draw_experts(normal, rngs.params(), (E, out_dim, in_dim), std, dtype))
        else:
            self.weight = nnx.Param(draw_quantized_experts(rngs.params(), quant, (E, out_dim, in_dim), std))
        if lora_rank:
            self.lora_A = LoRAParam(draw_experts(normal, rngs.params(), (E, lora_rank, in_dim), std, dtype))
            self.lora_B = LoRAParam(jnp.zeros((E, out_dim, lora_rank), dtype))
        else:
            self.lora_A = self.lora_B = None

    def adapter(self):
        return None if self.lora_A is None else (self.lora_A[...], self.lora_B[...])


class Experts(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        r = cfg.lora_rank_for("experts")
        q = cfg.expert_quant
        self.gate_proj = ExpertProjection(E, I, H, rngs=rngs, dtype=dtype, lora_rank=r, quant=q)
        self.up_proj = ExpertProjection(E, I, H, rngs=rngs, dtype=dtype, lora_rank=r, quant=q)
        self.down_proj = ExpertProjection(E, H, I, rngs=rngs, dtype=dtype, lora_rank=r, quant=q)
        self.dtype = dtype
        self.lora_scale = cfg.lora_scale
        self.backend = cfg.expert_backend
        self.policy = cfg.expert_policy
        self.intermediates = cfg.expert_intermediates
        self.expert_axis = cfg.expert_axis

    def __call__(self, x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array) -> jax.Array:
        """x: [T, H] f32 -> [T, H] f32; the experts run in the model's parameter dtype."""
        lora = {
            name: proj.adapter()
            for name, proj in (("gate", self.gate_proj), ("up", self.up_proj), ("down", self.down_proj))
            if proj.lora_A is not None
        }
        # inside a shard_map over the expert axis: this shard's experts, every slot sent to its expert's
        # shard; elsewhere every expert here (a sharded array's whole value)
        op = (
            functools.partial(moe_experts_sharded, axis_name=self.expert_axis)
            if axis_bound(self.expert_axis)
            else moe_experts
        )
        y = op(
            x.astype(self.dtype),
            topk_ids,
            topk_weights,
            self.gate_proj.weight.get_value(),
            self.up_proj.weight.get_value(),
            self.down_proj.weight.get_value(),
            lora=lora or None,
            lora_scale=self.lora_scale,
            backend=self.backend,
            policy=self.policy,
            intermediates=self.intermediates,
        )
        return y.astype(jnp.float32)


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        self.gate = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs, dtype=dtype)
        self.shared_experts = (
            MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs, dtype=dtype)
            if cfg.n_shared_experts
            else None
        )

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, dict]:
        """x: [B, S, H] f32; token_mask: [B, S] bool -> ([B, S, H] f32, router stats)."""
        B, S, H = x.shape
        flat = x.reshape(B * S, H)
        ids, weights, stats = self.gate(flat, token_mask.reshape(-1))
        y = self.experts(flat, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.reshape(B, S, H), stats
