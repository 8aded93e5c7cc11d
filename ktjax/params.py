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


def merged_weight(params: Params, name: str, lora_scale: float) -> jax.Array:
    """Base parameter `name` with its adapter folded in (W + scale * B A, per expert for stacked
    weights), in the parameter's dtype; the parameter itself when it has no adapter."""
    w = params[name]
    base = name[: -len(".weight")]
    if not name.endswith(".weight") or base + ".lora_A" not in params:
        return w
    a = params[base + ".lora_A"].astype(jnp.float32)
    b = params[base + ".lora_B"].astype(jnp.float32)
    delta = jnp.einsum("...or,...ri->...oi", b, a) * lora_scale
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def merge_lora(params: Params, lora_scale: float) -> Params:
    """Folds every adapter into its base weight and drops the adapters. Returns a new dict with the
    parameter names of the base model."""
    return {n: merged_weight(params, n, lora_scale) for n in params if not is_lora(n)}
