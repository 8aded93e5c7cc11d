"""Parameters as a flat dict keyed by dotted Hugging Face-style names, and back into the NNX model.

A flat ``{"model.layers.0.self_attn.q_proj.weight": array, ...}`` dict is what the optimizer labels,
what ``jax.grad`` differentiates (trainable part only) and what checkpoints store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.quant.formats import is_quantized

Params = dict[str, jax.Array]


@dataclass(frozen=True)
class ModelDef:
    """Everything but the parameter values: rebuild the model with ``merge_model(defn, params)``."""

    graphdef: Any
    paths: dict[str, tuple]  # name -> NNX state path
    types: dict[str, type]  # name -> Variable type (Param, LoRAParam)
    rest: Any  # non-parameter state


def split_model(model: nnx.Module) -> tuple[ModelDef, Params]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    names = {".".join(str(k) for k in path): (path, var) for path, var in flat}
    defn = ModelDef(
        graphdef=graphdef,
        paths={n: p for n, (p, _) in names.items()},
        types={n: type(v) for n, (_, v) in names.items()},
        rest=rest,
    )
    return defn, {n: v.get_value() for n, (_, v) in names.items()}


def merge_model(defn: ModelDef, params: Params) -> nnx.Module:
    missing = set(defn.paths) - set(params)
    if missing:
        raise KeyError(f"parameters missing to rebuild the model: {sorted(missing)[:5]}")
    flat = nnx.from_flat_state([(defn.paths[n], defn.types[n](params[n])) for n in defn.paths])
    return nnx.merge(defn.graphdef, flat, defn.rest)


def is_lora(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def merged_weight(
    params: Params, name: str, lora_scale: float, *, expert: int | None = None, float_dtype=jnp.bfloat16
) -> jax.Array:
    """Base parameter `name` with its adapter folded in (W + scale * B A, per expert for stacked
    weights), in the parameter's dtype; the parameter itself when it has neither an adapter nor a
    quantized format. A quantized base (ktjax.quant) is dequantized, and the result is `float_dtype`.
    `expert`: only that expert of a stacked weight ([out, in]: exports go expert by expert)."""
    w = params[name]
    base = name[: -len(".weight")]
    adapted = name.endswith(".weight") and base + ".lora_A" in params
    pick = (lambda v: v[expert]) if expert is not None else (lambda v: v)
    if is_quantized(w):
        dense = (w.expert(expert).dequantize()[0] if expert is not None else w.dequantize()).astype(
            float_dtype
        )
    else:
        dense = pick(w)
    if not adapted:
        return dense
    a = pick(params[base + ".lora_A"]).astype(jnp.float32)
    b = pick(params[base + ".lora_B"]).astype(jnp.float32)
    delta = jnp.einsum("...or,...ri->...oi", b, a) * lora_scale
    return (dense.astype(jnp.float32) + delta).astype(dense.dtype)


def merge_lora(params: Params, lora_scale: float, float_dtype=jnp.bfloat16) -> Params:
    """Folds every adapter into its base weight and drops the adapters. Returns a new dict with the
    parameter names of the base model; quantized bases come back dequantized, in `float_dtype`."""
    return {
        n: merged_weight(params, n, lora_scale, float_dtype=float_dtype) for n in params if not is_lora(n)
    }
