"""Layer rematerialisation that holds on XLA:CPU (ModelConfig.remat).

``jax.checkpoint`` saves only a function's inputs and recomputes the rest for the backward, but the
recomputation depends on nothing the backward produces: XLA:CPU (jax 0.10) removes the optimization
barriers that JAX puts around it, then schedules it as early as the forward itself, and the memory is
that of no remat at all (a 16-layer toy model: 134 MB of temporaries either way). ``recomputed`` below does
the same as ``jax.checkpoint`` with nothing saved, as a ``custom_vjp`` whose backward rule recomputes the
forward from the saved inputs only once the cotangent has arrived: the activation input is passed through a
select on a value of the cotangent that XLA cannot fold, so no recomputation can start earlier (the same toy:
279 MB instead of 1494 MB at a longer sequence). Parameters that are not differentiated (frozen weights,
quantized bases) stay constants of the recomputation, so it asks the expert kernels for exactly the
gradients that no remat asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero


@jax.tree_util.register_static
class _Perturbed(tuple):
    """Which parameters are differentiated, carried as a static residual."""


def _instantiate(ct):
    return jax.tree.map(
        lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c,
        ct,
        is_leaf=lambda c: isinstance(c, SymbolicZero),
    )


def recomputed(fn: Callable[[list, jax.Array, tuple], Any]) -> Callable[[list, jax.Array, tuple], Any]:
    """fn(params, x, consts) -> out, pure: params a list of weights, x [B, S, H] the activation (f32), consts
    a tuple of arrays never differentiated (positions, masks). Returns a function with fn's values and
    gradients whose forward saves only its inputs, and whose backward recomputes fn from them once the
    cotangent of out's first leaf (the layer's output activation) is there."""

    @jax.custom_vjp
    def call(params, x, consts):
        return fn(params, x, consts)

    def fwd(params, x, consts):
        perturbed = _Perturbed(bool(p.perturbed) for p in params)
        params, x, consts = [p.value for p in params], x.value, tuple(c.value for c in consts)
        return fn(params, x, consts), (params, x, consts, perturbed)

    def bwd(res, ct):
        params, x, consts, perturbed = res
        ct = _instantiate(ct)
        c = jax.tree.leaves(ct)[0].ravel()[0]
        x = jnp.where(c == c, x, jnp.zeros_like(x))  # x now depends on the cotangent (c == c is not foldable)
        diff = [i for i, p in enumerate(perturbed) if p]

        def with_diff(diff_params, x):
            full = list(params)
            for i, v in zip(diff, diff_params):
                full[i] = v
            return fn(full, x, consts)

        _, vjp = jax.vjp(with_diff, [params[i] for i in diff], x)
        d_diff, dx = vjp(ct)
        grads: list = [None] * len(params)
        for i, g in zip(diff, d_diff):
            grads[i] = g
        return grads, dx, tuple(None for _ in consts)

    call.defvjp(fwd, bwd, symbolic_zeros=True)
    return call


def recomputed_call(modules: Any, method: Callable[..., Any], x: jax.Array, *consts: jax.Array) -> Any:
    """method(modules, x, *consts) (modules: an nnx Module or a tuple of them) with its activations
    recomputed in the backward (``recomputed``)."""
    graphdef, state = nnx.split(modules)
    leaves, treedef = jax.tree.flatten(state)

    def fn(params, x, consts):
        return method(nnx.merge(graphdef, jax.tree.unflatten(treedef, params)), x, *consts)

    return recomputed(fn)(leaves, x, consts)
