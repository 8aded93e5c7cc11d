"""Linear layer with weight [out, in] (Hugging Face layout) and an optional LoRA adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.nn.init import normal
from ktjax.ops.vma import cotangent_like


@jax.custom_vjp
def bf16_dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] bf16 times w [out, in] bf16 -> [..., out] f32, with a backward that stays bf16 too:
    the output gradient is rounded to bf16 once and multiplied with w as it is stored. Plain autodiff
    would multiply the f32 gradient by w, and XLA:CPU widens w to an f32 copy for that (a 1.2 GB
    temporary for a 151936 x 2048 head)."""
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32)


def _bf16_dense_fwd(x, w):
    return bf16_dense(x, w), (x, w)


def _bf16_dense_bwd(res, g):
    x, w = res
    g = g.astype(w.dtype)
    dx = jnp.einsum("...o,oi->...i", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("...o,...i->oi", g, x, preferred_element_type=jnp.float32).astype(w.dtype)
    # dw is dead code (removed by XLA) where w is not differentiated; inside shard_map a replicated w's
    # gradient is the sum of the shards' (cotangent_like)
    return cotangent_like(dx, x), cotangent_like(dw, w)


bf16_dense.defvjp(_bf16_dense_fwd, _bf16_dense_bwd)


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
        self.weight = nnx.Param(normal(rngs.params(), (out_dim, in_dim), in_dim**-0.5, dtype))
        self.bias = nnx.Param(jnp.zeros((out_dim,), dtype)) if bias else None
        self.lora_scale = lora_scale
        if lora_rank:
            self.lora_A = LoRAParam(normal(rngs.params(), (lora_rank, in_dim), in_dim**-0.5, dtype))
            self.lora_B = LoRAParam(jnp.zeros((out_dim, lora_rank), dtype))
        else:
            self.lora_A = self.lora_B = None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        if w.dtype == jnp.bfloat16:
            y = bf16_dense(x.astype(w.dtype), w)
        else:
            y = jnp.einsum("...i,oi->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora_A is not None:
            z = jnp.einsum("...i,ri->...r", x.astype(jnp.float32), self.lora_A[...].astype(jnp.float32))
            y = y + self.lora_scale * jnp.einsum("...r,or->...o", z, self.lora_B[...].astype(jnp.float32))
        return y

    def effective_weight(self) -> jax.Array:
        """W + scale * B A: [out, in] f32, the weight the layer applies (the bias aside)."""
        w = self.weight[...].astype(jnp.float32)
        if self.lora_A is None:
            return w
        delta = self.lora_B[...].astype(jnp.float32) @ self.lora_A[...].astype(jnp.float32)
        return w + self.lora_scale * delta
