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
    INTERMEDIATES,
    PROJECTIONS,
    LoraDict,
    check_ids_in_range,
    check_moe_args,
    default_intermediates,
    float_weight_dtype,
)
from ktjax.ops.moe_reference import moe_experts_xla
from ktjax.ops.vma import cotangent_like, varying, varying_over
from ktjax.quant.formats import QuantizedWeight, is_quantized

# The kernels' contract (xla_ffi/moe_contract.h), read from the extension: argument and result names
# in the handlers' order, and the differentiable inputs, whose order gives the backward's `needs` bits.
_CONTRACT = ffi.MOE_CONTRACT
if tuple(_CONTRACT["projections"]) != PROJECTIONS or tuple(_CONTRACT["intermediates"]) != INTERMEDIATES:
    raise ImportError(
        f"ktjax's kernels were built for projections {_CONTRACT['projections']} and intermediates "
        f"{_CONTRACT['intermediates']}, but ktjax.ops expects {PROJECTIONS} and {INTERMEDIATES}: rebuild "
        "the extension (`pip install -e .`)"
    )
NEED_BITS = {name: 1 << i for i, name in enumerate(_CONTRACT["grads"])}


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
    intermediates: str = "auto",
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
      intermediates: "auto" (default) picks by dtype: "bf16" for bf16 x and bf16 weights (or every base
        quantized) on backend "cpu", "f32" otherwise (``moe_checks.default_intermediates``). "f32" keeps every
        intermediate of the expert chain in f32. "bf16" (bf16 x, backend "cpu" only) rounds the operands of
        the products that would otherwise mix f32 and bf16 to bf16 — the weighted hidden state w * h (down
        projection, d down) and the gate/up gradients dg, du (dx, d gate, d up) — so that every
        projection-sized product has two bf16 operands (the bf16 pair path where the CPU has AVX512_BF16): one
        bf16 rounding of those intermediates less accurate than "f32" (README, "The core op").
        Pre-activations, d topk_weights, LoRA products and all accumulations stay f32.

    Returns:
      y: [T, H], dtype of x.
    """
    if intermediates == "auto":
        intermediates = default_intermediates(
            getattr(x, "dtype", None), float_weight_dtype(gate, up, down), backend
        )
    check_moe_args(
        x, topk_ids, topk_weights, gate, up, down, lora, lora_scale, backend, policy, intermediates
    )
    if backend == "xla":
        check_ids_in_range(topk_ids, gate.shape[0])
        gate, up, down = (w.dequantize() if is_quantized(w) else w for w in (gate, up, down))
        return moe_experts_xla(x, topk_ids, topk_weights, gate, up, down, lora, float(lora_scale))
    adapters = {name: tuple(pair) for name, pair in (lora or {}).items()}
    return _moe_cpu(
        float(lora_scale), policy, intermediates, x, topk_ids, topk_weights, gate, up, down, adapters
    )


def _named_inputs(x, topk_ids, topk_weights, gate, up, down, adapters: dict) -> tuple[dict, dict]:
    """The op's inputs by their names in the contract (adapters as lora_<projection>_a / _b; a quantized
    projection's data under its own name, its scales as <projection>_scales), and the quantized
    projections {name: QuantizedWeight} (for their formats)."""
    named = dict(x=x, topk_ids=topk_ids, topk_weights=topk_weights)
    quant = {}
    for name, w in zip(PROJECTIONS, (gate, up, down)):
        if isinstance(w, QuantizedWeight):
            named[name], named[f"{name}_scales"], quant[name] = w.data, w.scales, w
        else:
            named[name] = w
    for name, (a, b) in adapters.items():
        named[f"lora_{name}_a"], named[f"lora_{name}_b"] = a, b
    return named, quant


def _problem_args(named: dict, adapters: dict, quant: dict) -> tuple[list[jax.Array], dict]:
    """The arguments both kernels take after their own (the contract's problem_args, A and B of each
    adapter, the scales of each quantized projection, in projection order) and the `adapters` and
    `quant` attributes that name them."""
    present = [name for name in PROJECTIONS if name in adapters]  # (a dict pytree's keys come sorted)
    quantized = [name for name in PROJECTIONS if name in quant]
    args = [named[name] for name in _CONTRACT["problem_args"]]
    for name in present:
        args += [named[f"lora_{name}_a"], named[f"lora_{name}_b"]]
    args += [named[f"{name}_scales"] for name in quantized]
    spec = ",".join(quant[name].kernel_spec(name) for name in quantized)
    return args, {"adapters": ",".join(present), "quant": spec}


def _forward_call(
    named: dict, adapters: dict, quant: dict, lora_scale: float, intermediates: str, save_preact: bool
):
    x, topk_ids, gate = named["x"], named["topk_ids"], named["gate"]
    T, K = topk_ids.shape
    saved = (T * K, gate.shape[1]) if save_preact else (0,)
    results = {
        "y": jax.ShapeDtypeStruct(x.shape, x.dtype),
        "g_saved": jax.ShapeDtypeStruct(saved, jnp.float32),
        "u_saved": jax.ShapeDtypeStruct(saved, jnp.float32),
    }
    args, attrs = _problem_args(named, adapters, quant)
    out = jax.ffi.ffi_call(
        ffi.FORWARD_TARGET,
        tuple(results[name] for name in _CONTRACT["forward_results"]),
        vmap_method="sequential",
    )(
        *args,
        **attrs,
        lora_scale=np.float32(lora_scale),
        intermediates=intermediates,
        save_preact=save_preact,
    )
    # inside jax.shard_map the kernels' results are typed as varying over no mesh axis: they vary as
    # their inputs do
    axes = varying_over(*args)
    return {name: varying(o, axes) for name, o in zip(_CONTRACT["forward_results"], out)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _moe_cpu(
    lora_scale: float,
    policy: str,
    intermediates: str,
    x,
    topk_ids,
    topk_weights,
    gate,
    up,
    down,
    adapters: dict,
) -> jax.Array:
    named, quant = _named_inputs(x, topk_ids, topk_weights, gate, up, down, adapters)
    return _forward_call(named, adapters, quant, lora_scale, intermediates, save_preact=False)["y"]


@jax.tree_util.register_static
class _Needs(int):
    """The `needs` bitmask, carried through the residuals as static (non-array) data."""


def _moe_cpu_fwd(lora_scale: float, policy: str, intermediates: str, *primals):
    named, quant = _named_inputs(*primals)
    needs = 0
    for name, p in named.items():
        frozen = name.removesuffix("_scales") in quant
        if p.perturbed and frozen:
            raise ValueError(
                f"{name.removesuffix('_scales')} is quantized: a quantized base is frozen, so it "
                "cannot be differentiated (label it frozen)"
            )
        if p.perturbed and name in NEED_BITS:
            needs |= NEED_BITS[name]
    values = {name: p.value for name, p in named.items()}
    adapters = {name: None for name in primals[-1]}  # the projections with an adapter
    quant = {
        name: jax.tree.map(lambda p: None, w, is_leaf=lambda p: hasattr(p, "perturbed"))
        for name, w in quant.items()
    }  # the formats alone
    out = _forward_call(values, adapters, quant, lora_scale, intermediates, save_preact=policy == "retain")
    return out["y"], (values, adapters, quant, out["g_saved"], out["u_saved"], _Needs(needs))


def _moe_cpu_bwd(lora_scale: float, policy: str, intermediates: str, res, dy):
    values, adapters, quant, g_saved, u_saved, needs = res
    no_grads = (None,) * 6 + ({name: (None, None) for name in adapters},)
    if isinstance(dy, SymbolicZero) or needs == 0:
        return no_grads
    needed = {name for name, bit in NEED_BITS.items() if needs & bit}
    results = []
    for name in _CONTRACT["grads"]:
        if name in needed:
            results.append(jax.ShapeDtypeStruct(values[name].shape, values[name].dtype))
        else:  # not asked for (or no such adapter): an empty result
            results.append(jax.ShapeDtypeStruct((0,), jnp.float32))
    lead = {"dy": dy, "g_saved": g_saved, "u_saved": u_saved}
    args, attrs = _problem_args(values, adapters, quant)
    grads = jax.ffi.ffi_call(ffi.BACKWARD_TARGET, tuple(results), vmap_method="sequential")(
        *(lead[name] for name in _CONTRACT["backward_lead_args"]),
        *args,
        **attrs,
        lora_scale=np.float32(lora_scale),
        intermediates=intermediates,
        needs=np.int64(needs),
    )
    # Inside jax.shard_map: each process's kernels computed its share of each gradient, so a gradient
    # of an input that does not vary over a mesh axis the computation varies over (a weight replicated
    # across data-parallel shards) is summed over that axis, as JAX's transpose of its implicit pvary
    # would; the others keep the varying axes of their input.
    axes = varying_over(dy, *args)
    by_name = {
        name: cotangent_like(varying(g, axes), values[name])
        for name, g in zip(_CONTRACT["grads"], grads)
        if name in needed
    }
    lora_grads = {name: (by_name.get(f"lora_{name}_a"), by_name.get(f"lora_{name}_b")) for name in adapters}
    fixed = ("x", "topk_ids", "topk_weights", "gate", "up", "down")
    return tuple(by_name.get(name) for name in fixed) + (lora_grads,)


_moe_cpu.defvjp(_moe_cpu_fwd, _moe_cpu_bwd, symbolic_zeros=True)
