"""Rematerialisation that holds on XLA:CPU: of layers (ModelConfig.remat) and of the loss over the
vocabulary, a chunk of tokens at a time (``chunked_sum``).

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


def _saving_inputs(forward: Callable[[list, jax.Array, tuple], Any], bwd: Callable) -> Callable:
    """A custom_vjp of forward(params, x, consts) whose forward saves only its inputs and which of the
    params are differentiated: bwd((params, x, consts, perturbed), ct) -> (param grads, dx, consts')."""

    @jax.custom_vjp
    def call(params, x, consts):
        return forward(params, x, consts)

    def fwd(params, x, consts):
        perturbed = _Perturbed(bool(p.perturbed) for p in params)
        params, x, consts = [p.value for p in params], x.value, tuple(c.value for c in consts)
        return forward(params, x, consts), (params, x, consts, perturbed)

    call.defvjp(fwd, bwd, symbolic_zeros=True)
    return call


def _vjp(
    fn: Callable, params: list, perturbed: _Perturbed, x: jax.Array, consts: tuple, ct: Any
) -> tuple[list, Any]:
    """(gradients of fn's differentiated params, None for the others; dx) at (params, x, consts) for the
    cotangent ct: fn's forward computed again."""
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
    return grads, dx


def _pure(modules: Any, method: Callable[..., Any]) -> tuple[Callable[[list, jax.Array, tuple], Any], list]:
    """method(modules, x, *consts) as fn(params, x, consts) over the modules' state leaves, and those."""
    graphdef, state = nnx.split(modules)
    leaves, treedef = jax.tree.flatten(state)

    def fn(params, x, consts):
        return method(nnx.merge(graphdef, jax.tree.unflatten(treedef, params)), x, *consts)

    return fn, leaves


def recomputed(fn: Callable[[list, jax.Array, tuple], Any]) -> Callable[[list, jax.Array, tuple], Any]:
    """fn(params, x, consts) -> out, pure: params a list of weights, x [B, S, H] the activation (f32), consts
    a tuple of arrays never differentiated (positions, masks). Returns a function with fn's values and
    gradients whose forward saves only its inputs, and whose backward recomputes fn from them once the
    cotangent of out's first leaf (the layer's output activation) is there."""

    def bwd(res, ct):
        params, x, consts, perturbed = res
        ct = _instantiate(ct)
        c = jax.tree.leaves(ct)[0].ravel()[0]
        x = jnp.where(c == c, x, jnp.zeros_like(x))  # x now depends on the cotangent (c == c is not foldable)
        grads, dx = _vjp(fn, params, perturbed, x, consts, ct)
        return grads, dx, tuple(None for _ in consts)

    return _saving_inputs(fn, bwd)


def recomputed_call(modules: Any, method: Callable[..., Any], x: jax.Array, *consts: jax.Array) -> Any:
    """method(modules, x, *consts) (modules: an nnx Module or a tuple of them) with its activations
    recomputed in the backward (``recomputed``)."""
    fn, leaves = _pure(modules, method)
    return recomputed(fn)(leaves, x, consts)


def _in_chunks(a: jax.Array, rows: int) -> jax.Array:
    """a [N, ...] -> [ceil(N / rows), rows, ...], the last chunk padded with zeros."""
    n = -(-a.shape[0] // rows)
    a = jnp.pad(a, [(0, n * rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(n, rows, *a.shape[1:])


def recomputed_chunks(
    fn: Callable[[list, jax.Array, tuple], jax.Array], rows: int
) -> Callable[[list, jax.Array, tuple], jax.Array]:
    """fn(params, x, consts) -> a float scalar, pure, a sum over the rows of x [N, ...] and of consts (a
    tuple of [N, ...] arrays never differentiated), such that rows of zeros in x and consts add 0. Returns
    a function with fn's value and gradients that takes x `rows` rows at a time, in the forward and in
    the backward (which recomputes each chunk's forward from the saved inputs): only one chunk's
    temporaries exist at a time. The chunks' values add in fn's dtype, their parameter gradients in f32
    or wider. For a loss over a large vocabulary, where fn's temporaries are [rows, V] logits."""

    def chunks(x, consts):
        return _in_chunks(x, rows), tuple(_in_chunks(c, rows) for c in consts)

    def total(params, x, consts):
        def body(acc, chunk):
            return acc + fn(params, *chunk), None

        parts = chunks(x, consts)
        first = jax.tree.map(lambda a: a[0], parts)
        zero = jnp.zeros((), jax.eval_shape(lambda c: fn(params, *c), first).dtype)
        return jax.lax.scan(body, zero, parts)[0]

    def bwd(res, ct):
        params, x, consts, perturbed = res
        ct = _instantiate(ct)

        def body(acc, chunk):
            grads, dxc = _vjp(fn, params, perturbed, *chunk, ct)
            return [a if g is None else a + g.astype(a.dtype) for a, g in zip(acc, grads)], dxc

        # the gradients summed over chunks in f32 at least (f64 for f64 parameters)
        zeros = [
            jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)) if d else None
            for p, d in zip(params, perturbed)
        ]
        acc, dx = jax.lax.scan(body, zeros, chunks(x, consts))
        grads = [None if a is None else a.astype(p.dtype) for a, p in zip(acc, params)]
        return grads, dx.reshape(-1, *x.shape[1:])[: x.shape[0]], tuple(None for _ in consts)

    return _saving_inputs(total, bwd)


def chunked_sum(modules: Any, method: Callable[..., jax.Array], rows: int, x: jax.Array, *consts: jax.Array):
    """method(modules, x, *consts) -> f32 scalar (a sum over the rows of x [N, ...] and consts [N, ...]),
    taken `rows` rows at a time in the forward and the backward (``recomputed_chunks``)."""
    fn, leaves = _pure(modules, method)
    return recomputed_chunks(fn, rows)(leaves, x, consts)
