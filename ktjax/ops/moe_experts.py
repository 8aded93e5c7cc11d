"""``moe_experts``: the routed-expert SwiGLU MLPs of an MoE layer, computed by the CPU FFI kernels.

    y[t] = sum_k topk_weights[t,k] * Down_e(silu(Gate_e(x[t])) * Up_e(x[t])),  e = topk_ids[t,k]
    P_e(v) = W_e v + lora_scale * B_e (A_e v)   for a projection with a LoRA adapter.

Differentiation is a ``jax.custom_vjp`` with symbolic zeros: the forward rule sees which inputs are
being differentiated and the backward kernel computes only those gradients. A frozen base weight
(not differentiated) costs no gradient FLOPs and no gradient memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from ktjax import ffi
from ktjax.ops.moe_checks import (
    PROJECTIONS,
    LoraDict,
    check_ids_in_range,
    check_moe_args,
    default_intermediates,
)
from ktjax.ops.moe_reference import moe_experts_xla

# Bits of the backward kernel's `needs` attribute, in the order of the differentiable inputs after
# topk_ids (mirrors `Need` in xla_ffi/moe_backward.h).
NEED_BITS = {
    "x": 1 << 0,
    "topk_weights": 1 << 1,
    "gate": 1 << 2,
    "up": 1 << 3,
    "down": 1 << 4,
    "lora_gate_a": 1 << 5,
    "lora_gate_b": 1 << 6,
    "lora_up_a": 1 << 7,
    "lora_up_b": 1 << 8,
    "lora_down_a": 1 << 9,
    "lora_down_b": 1 << 10,
}
# Inputs of _moe_cpu after the two static arguments; index 1 (topk_ids) is not differentiable.
_INPUT_NAMES = (
    "x",
    "topk_ids",
    "topk_weights",
    "gate",
    "up",
    "down",
    "lora_gate_a",
    "lora_gate_b",
    "lora_up_a",
    "lora_up_b",
    "lora_down_a",
    "lora_down_b",
)


def moe_experts(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    lora: LoraDict | None = None,
    lora_scale: float = 1.0,
    backend: str = "cpu",
    policy: str = "retain",
    intermediates: str | None = None,
) -> jax.Array:
    """Routed experts of one MoE layer.

    Args:
      x: [T, H] bf16 or f32 — tokens, flattened over batch and sequence.
      topk_ids: [T, K] int32 — expert of each routing slot; -1 drops the slot.
      topk_weights: [T, K] f32 — router weight of each slot (differentiable).
      gate, up: [E, I, H]; down: [E, H, I] — expert weights, one dtype (bf16 or f32), layout [out, in].
      lora: None, or a dict with any of "gate", "up", "down" mapping to (A [E, r, in], B [E, out, r]).
      lora_scale: alpha / r, a finite Python number.
      backend: "cpu" (FFI kernels) or "xla" (pure JAX, ``moe_experts_xla``).
      policy: "retain" saves the gate/up pre-activations ([T*K, I] f32 each) for the backward;
        "recompute" recomputes them there. Both give the same gradients.
      intermediates: None (default) picks by dtype: "bf16" for bf16 x and bf16 weights on backend
        "cpu", "f32" otherwise (``moe_checks.default_intermediates``). "f32" keeps every intermediate
        of the expert chain in f32. "bf16" (bf16 x, backend "cpu" only) rounds the operands of the
        products that would otherwise mix f32 and bf16 to bf16 — the weighted hidden state w * h (down
        projection, d down) and the gate/up gradients dg, du (dx, d gate, d up) — so that every
        projection-sized product has two bf16 operands (the bf16 pair path where the CPU has
        AVX512_BF16): one bf16 rounding of those intermediates less accurate than "f32" (README, "The
        core op"). Pre-activations, d topk_weights, LoRA products and all accumulations stay f32.

    Returns:
      y: [T, H], dtype of x.
    """
    if intermediates is None:
        intermediates = default_intermediates(
            getattr(x, "dtype", None), getattr(gate, "dtype", None), backend
        )
    check_moe_args(
        x, topk_ids, topk_weights, gate, up, down, lora, lora_scale, backend, policy, intermediates
    )
    if backend == "xla":
        check_ids_in_range(topk_ids, gate.shape[0])
        return moe_experts_xla(x, topk_ids, topk_weights, gate, up, down, lora, float(lora_scale))
    adapters = []
    for name in PROJECTIONS:
        if lora and name in lora:
            adapters.extend(lora[name])
        else:  # rank-0 placeholder: "no adapter" (never differentiated, costs nothing)
            out_dim, in_dim = (down.shape[1], down.shape[2]) if name == "down" else gate.shape[1:]
            adapters.append(jnp.zeros((gate.shape[0], 0, in_dim), gate.dtype))
            adapters.append(jnp.zeros((gate.shape[0], out_dim, 0), gate.dtype))
    bf16_mid = intermediates == "bf16"
    return _moe_cpu(float(lora_scale), policy, bf16_mid, x, topk_ids, topk_weights, gate, up, down, *adapters)


def _forward_call(args: tuple[jax.Array, ...], lora_scale: float, save_preact: bool, bf16_mid: bool = False):
    x, topk_ids, gate = args[0], args[1], args[3]
    T, K = topk_ids.shape
    saved = (T * K, gate.shape[1]) if save_preact else (0,)
    return jax.ffi.ffi_call(
        ffi.FORWARD_TARGET,
        (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(saved, jnp.float32),
            jax.ShapeDtypeStruct(saved, jnp.float32),
        ),
        vmap_method="sequential",
    )(*args, lora_scale=np.float32(lora_scale), save_preact=save_preact, bf16_intermediates=bf16_mid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _moe_cpu(lora_scale: float, policy: str, bf16_mid: bool, *args: jax.Array) -> jax.Array:
    y, _, _ = _forward_call(args, lora_scale, save_preact=False, bf16_mid=bf16_mid)
    return y


@jax.tree_util.register_static
class _Needs(int):
    """The `needs` bitmask, carried through the residuals as static (non-array) data."""


def _moe_cpu_fwd(lora_scale: float, policy: str, bf16_mid: bool, *primals):
    args = tuple(p.value for p in primals)
    needs = 0
    for name, p in zip(_INPUT_NAMES, primals):
        if p.perturbed and name in NEED_BITS and p.value.size > 0:  # rank-0 adapters: nothing to do
            needs |= NEED_BITS[name]
    y, g_saved, u_saved = _forward_call(args, lora_scale, save_preact=policy == "retain", bf16_mid=bf16_mid)
    return y, (args, g_saved, u_saved, _Needs(needs))


def _moe_cpu_bwd(lora_scale: float, policy: str, bf16_mid: bool, res, dy):
    args, g_saved, u_saved, needs = res
    if isinstance(dy, SymbolicZero) or needs == 0:
        return (None,) * len(args)
    needed = [name for name, bit in NEED_BITS.items() if needs & bit]
    result_shapes = []
    for name in NEED_BITS:
        a = args[_INPUT_NAMES.index(name)]
        shape = a.shape if name in needed else (0,)
        result_shapes.append(jax.ShapeDtypeStruct(shape, a.dtype))
    grads = jax.ffi.ffi_call(ffi.BACKWARD_TARGET, tuple(result_shapes), vmap_method="sequential")(
        dy,
        *args,
        g_saved,
        u_saved,
        lora_scale=np.float32(lora_scale),
        needs=np.int64(needs),
        bf16_intermediates=bf16_mid,
    )
    by_name = dict(zip(NEED_BITS, grads))
    return tuple(by_name[name] if name in needed else None for name in _INPUT_NAMES)


_moe_cpu.defvjp(_moe_cpu_fwd, _moe_cpu_bwd, symbolic_zeros=True)
