"""Linear layer with weight [out, in] (Hugging Face layout) and an optional LoRA adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix (A or B); a distinct type so filters can pick adapters out."""


class Linear(nnx.Module):
    """y = x W^T (+ b) + scale * (x A^T) B^T.   x: [..., in] -> y: [..., out] (f32)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bias: bool = False,
        lora_rank: int = 0,
        lora_scale: float = 1.0,
    ):
        self.weight = nnx.Param(
            (jax.random.normal(rngs.params(), (out_dim, in_dim)) * in_dim**-0.5).astype(dtype)
        )
        self.bias = nnx.Param(jnp.zeros((out_dim,), dtype)) if bias else None
        self.lora_scale = lora_scale
        if lora_rank:
            a = jax.random.normal(rngs.params(), (lora_rank, in_dim)) * in_dim**-0.5
            self.lora_A = LoRAParam(a.astype(dtype))
            self.lora_B = LoRAParam(jnp.zeros((out_dim, lora_rank), dtype))
        else:
            self.lora_A = self.lora_B = None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        y = jnp.einsum("...i,oi->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora_A is not None:
            z = jnp.einsum("...i,ri->...r", x.astype(jnp.float32), self.lora_A[...].astype(jnp.float32))
            y = y + self.lora_scale * jnp.einsum("...r,or->...o", z, self.lora_B[...].astype(jnp.float32))
        return y
