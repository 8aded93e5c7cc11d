"""Shape and dtype checks of the ``moe_experts`` arguments, shared by every backend.

Each error names the argument and the dimension that disagrees. Values (ids in range) can only be
checked by the kernel, which returns an ``ffi::Error`` naming ``topk_ids``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.quant.formats import is_quantized

PROJECTIONS = ("gate", "up", "down")
FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
BACKENDS = ("cpu", "xla")
POLICIES = ("retain", "recompute")
INTERMEDIATES = ("f32", "bf16")
BF16 = jnp.dtype(jnp.bfloat16)

LoraDict = dict[str, tuple[Any, Any]]


def _shape(name: str, a: Any, want: tuple[int, ...], doc: str) -> None:
    if tuple(a.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {doc} = {list(want)}, got {list(a.shape)}")


def _float(name: str, a: Any) -> None:
    if jnp.dtype(a.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16 or float32, got {jnp.dtype(a.dtype).name}")


def _rank(name: str, a: Any, ndim: int, doc: str) -> None:
    if getattr(a, "ndim", None) != ndim:
        raise ValueError(f"{name} must have shape {doc}, got {list(getattr(a, 'shape', []))}")


def check_ids_in_range(topk_ids: Any, num_experts: int) -> None:
    """Raises ValueError naming the first id outside [-1, E), as the CPU kernels do, where topk_ids is a
    concrete array. Under jit it is a tracer and its values are unknown here: the pure-JAX backend then
    returns NaN for every token with such an id (moe_reference.moe_experts_xla)."""
    if isinstance(topk_ids, jax.core.Tracer):
        return
    ids = np.asarray(topk_ids)
    bad = np.argwhere((ids < -1) | (ids >= num_experts))
    if bad.size:
        t, k = bad[0]
        raise ValueError(
            f"topk_ids[{t}, {k}] = {ids[t, k]} is out of range: ids must be in [-1, {num_experts}) for "
            f"{num_experts} experts (-1 drops the slot)"
        )


def float_weight_dtype(gate: Any, up: Any, down: Any) -> Any:
    """The dtype of the expert weights that are not quantized (None when all three are)."""
    for w in (gate, up, down):
        if not is_quantized(w):
            return getattr(w, "dtype", None)
    return None


def default_intermediates(x_dtype: Any, weight_dtype: Any, backend: str) -> str:
    """The ``intermediates`` mode ``moe_experts`` uses when none is given: ``"bf16"`` where the CPU kernels
    multiply bf16 tokens by bf16 weights (every projection-sized product then has two bf16 operands, as
    in the bf16 kernels of this field), ``"f32"`` otherwise (f32 tokens or weights, or ``backend="xla"``).
    ``weight_dtype`` None (every base quantized: ``float_weight_dtype``) follows the tokens: the kernels
    multiply quantized codes as bf16 values (each code is one), so a bf16 model with quantized experts
    computes as its bf16 original does."""
    if x_dtype is None:
        return "f32"
    weight_dtype = x_dtype if weight_dtype is None else weight_dtype
    bf16 = jnp.dtype(x_dtype) == BF16 == jnp.dtype(weight_dtype)
    return "bf16" if bf16 and backend == "cpu" else "f32"


def check_moe_args(
    x: Any,
    topk_ids: Any,
    topk_weights: Any,
    gate: Any,
    up: Any,
    down: Any,
    lora: LoraDict | None,
    lora_scale: float,
    backend: str,
    policy: str,
    intermediates: str = "f32",
) -> None:
    """Raises ValueError / TypeError naming the first bad argument of ``moe_experts``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if intermediates not in INTERMEDIATES:
        raise ValueError(f"intermediates must be one of {INTERMEDIATES}, got {intermediates!r}")
    if intermediates == "bf16" and backend != "cpu":
        raise ValueError("intermediates='bf16' is a mode of the CPU kernels; backend='xla' computes in f32")
    _rank("x", x, 2, "[T, H]")
    _rank("topk_ids", topk_ids, 2, "[T, K]")
    _rank("gate", gate, 3, "[E, I, H]")
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = gate.shape[0], gate.shape[1]
    if T < 1 or H < 1 or K < 1 or E < 1 or I < 1:
        raise ValueError(f"moe_experts needs T, H, K, E, I >= 1, got T={T} H={H} K={K} E={E} I={I}")
    _float("x", x)
    if intermediates == "bf16" and jnp.dtype(x.dtype) != jnp.bfloat16:
        raise TypeError(f"intermediates='bf16' needs bfloat16 x, got {jnp.dtype(x.dtype).name}")
    if jnp.dtype(topk_ids.dtype) != jnp.int32:
        raise TypeError(f"topk_ids must be int32, got {jnp.dtype(topk_ids.dtype).name}")
    if jnp.dtype(topk_weights.dtype) != jnp.float32:
        raise TypeError(f"topk_weights must be float32, got {jnp.dtype(topk_weights.dtype).name}")
    _shape("topk_ids", topk_ids, (T, K), "[T, K]")
    _shape("topk_weights", topk_weights, (T, K), "[T, K]")
    _shape("gate", gate, (E, I, H), "[E, I, H]")
    _shape("up", up, (E, I, H), "[E, I, H]")
    _shape("down", down, (E, H, I), "[E, H, I]")
    floats = {}
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        if is_quantized(w):
            w.check(name)
        else:
            _float(name, w)
            floats[name] = jnp.dtype(w.dtype)
    if len(set(floats.values())) > 1:
        got = ", ".join(f"{n} {d.name}" for n, d in floats.items())
        raise TypeError(f"gate, up and down must share one dtype (quantized ones aside), got {got}")
    if not isinstance(lora_scale, (int, float)) or not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale must be a finite Python number, got {lora_scale!r}")
    if lora is None:
        return
    if not isinstance(lora, dict):
        raise TypeError(f"lora must be None or a dict of (A, B) pairs, got {type(lora).__name__}")
    dims = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    for key, pair in lora.items():
        if key not in dims:
            raise ValueError(f"lora has unknown key {key!r}; allowed: {PROJECTIONS}")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"lora[{key!r}] must be a pair (A, B)")
        A, B = pair
        out_dim, in_dim = dims[key]
        _rank(f"lora[{key!r}] A", A, 3, "[E, r, in]")
        r = A.shape[1]
        if r < 1:
            raise ValueError(f"lora[{key!r}] A must have rank r >= 1, got shape {list(A.shape)}")
        _shape(f"lora[{key!r}] A", A, (E, r, in_dim), "[E, r, in]")
        _shape(f"lora[{key!r}] B", B, (E, out_dim, r), "[E, out, r]")
        _float(f"lora[{key!r}] A", A)
        _float(f"lora[{key!r}] B", B)
        if A.dtype != B.dtype:
            raise TypeError(f"lora[{key!r}] A and B must share one dtype, got {A.dtype} and {B.dtype}")
