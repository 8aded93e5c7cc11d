"""Differentiable ops backed by the CPU expert kernels, and their pure-JAX references."""

from ktjax.ops.moe_experts import moe_experts
from ktjax.ops.moe_reference import moe_experts_xla
from ktjax.ops.moe_sharded import moe_experts_sharded

__all__ = ["moe_experts", "moe_experts_sharded", "moe_experts_xla"]
