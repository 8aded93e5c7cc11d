"""The varying mesh axes of values inside ``jax.shard_map`` (its ``check_vma`` types), for the custom VJPs
of ktjax whose backward computes its own gradients (moe_experts' kernels, bf16_dense): a custom VJP's
cotangent must vary over exactly the axes its primal varies over. Outside a shard_map every value varies
over none, and these functions return their argument. (A backward that differentiates with jax.vjp, as
ktjax.nn.remat's, gets these types from JAX.)"""

from __future__ import annotations

import jax


def varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes x varies over inside a shard_map (jax 0.10: its type's ``mat.varying``; earlier
    releases called it ``vma``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def varying_over(*arrays: jax.Array) -> frozenset:
    """The mesh axes any of `arrays` varies over."""
    return frozenset().union(*(varying_axes(a) for a in arrays))


def varying(x: jax.Array, axes: frozenset) -> jax.Array:
    """x typed as varying over `axes` too (results of an FFI call, typed as varying over none)."""
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def cotangent_like(g: jax.Array | None, primal: jax.Array) -> jax.Array | None:
    """A custom VJP's cotangent g given its primal's varying axes: summed over the axes g varies over and
    the primal does not (each shard computed its share of the gradient of a value replicated across
    them, as JAX's own transposes sum them), marked varying over those the primal varies over."""
    if g is None:
        return None
    extra = tuple(sorted(varying_axes(g) - varying_axes(primal)))
    if extra:
        g = jax.lax.psum(g, extra)
    return varying(g, varying_axes(primal))
