"""Differentiable ops backed by the CPU kernels (the routed experts, attention), and their pure-JAX
references."""

from ktjax.ops.attention import attention, dense_attention
from ktjax.ops.moe_experts import moe_experts
from ktjax.ops.moe_reference import moe_experts_xla
from ktjax.ops.moe_sharded import moe_experts_sharded

__all__ = ["attention", "dense_attention", "moe_experts", "moe_experts_sharded", "moe_experts_xla"]
