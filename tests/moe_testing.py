"""Random MoE expert problems and a dense float64 reference of the expert math, for the op tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

PROJ_DIMS = {"gate": ("I", "H"), "up": ("I", "H"), "down": ("H", "I")}

# Shapes at the edges of the bf16 pair path's kernels, shared by its tests (test_bf16_pair_path.py,
# test_bf16_intermediates.py), which add their own.
PAIR_PATH_EDGE_SHAPES = {
    # Few tokens per expert: the dot kernel (forward) and direct kernel (dx) with tokens per expert % 6,
    # I % 4 (the last group of weight rows) and H % 32 (the masked last block of 32) all nonzero.
    "few_tokens_edges": dict(T=37, K=3, E=11, H=1061, I=45),
    "one_token": dict(T=1, K=2, E=4, H=16, I=24),
    # 96 tokens (the small-M kernels' limit) and 97 (packed) on two experts.
    "row_limit_96": dict(T=96, K=2, E=2, H=300, I=45, ids=np.tile([0, 1], (96, 1))),
    "rows_97": dict(T=97, K=2, E=2, H=300, I=45, ids=np.tile([0, 1], (97, 1))),
    # The packed micro-kernel: an odd H (the last pair half empty) in five depth blocks (4 of 256 and
    # 77), more token rows than one packed block (96 + 96 + 8: a last panel of 6 holding 2), and I in
    # work items of multiples of 32 columns but the last, whose last panel of 32 holds 18.
    "packed_edges": dict(T=200, K=1, E=1, H=1101, I=530),
}


@dataclass
class Problem:
    x: jax.Array
    ids: jax.Array
    weights: jax.Array
    gate: jax.Array
    up: jax.Array
    down: jax.Array
    lora: dict[str, tuple[jax.Array, jax.Array]] = field(default_factory=dict)
    scale: float = 1.0

    def args(self) -> tuple[jax.Array, ...]:
        return (self.x, self.ids, self.weights, self.gate, self.up, self.down)


def make_problem(
    seed: int,
    T: int,
    K: int,
    E: int,
    H: int,
    I: int,  # noqa: E741
    dtype=jnp.float32,
    ranks: dict[str, int] | None = None,
    ids: np.ndarray | None = None,
    scale: float = 0.75,
) -> Problem:
    """Random normal inputs (never zeros; LoRA B random too) scaled to keep activations O(1)."""
    rng = np.random.default_rng(seed)
    dims = {"H": H, "I": I}

    def randn(*shape, std=1.0):
        return jnp.asarray(rng.standard_normal(shape) * std, dtype)

    if ids is None:
        ids = rng.integers(0, E, (T, K))
    lora = {}
    for name, r in (ranks or {}).items():
        out_dim, in_dim = (dims[d] for d in PROJ_DIMS[name])
        lora[name] = (randn(E, r, in_dim, std=in_dim**-0.5), randn(E, out_dim, r, std=r**-0.5))
    return Problem(
        x=randn(T, H),
        ids=jnp.asarray(ids, jnp.int32),
        weights=jnp.asarray(rng.uniform(0.1, 1.0, (T, K)), jnp.float32),
        gate=randn(E, I, H, std=H**-0.5),
        up=randn(E, I, H, std=H**-0.5),
        down=randn(E, H, I, std=I**-0.5),
        lora=lora,
        scale=scale,
    )


def dense_reference(x, ids, weights, gate, up, down, lora, scale):
    """The expert math written slot by slot with gathered weights: obviously right, E-agnostic."""
    lora = lora or {}
    valid = ids >= 0
    e = jnp.where(valid, ids, 0)

    def project(v, name, w):  # v: [T, K, in], w: [E, out, in]
        out = jnp.einsum("tki,tkoi->tko", v, w[e])
        if name in lora:
            a, b = lora[name]
            z = jnp.einsum("tki,tkri->tkr", v, a[e])
            out = out + scale * jnp.einsum("tkr,tkor->tko", z, b[e])
        return out

    xs = jnp.broadcast_to(x[:, None, :], (ids.shape[0], ids.shape[1], x.shape[1]))
    h = jax.nn.silu(project(xs, "gate", gate)) * project(xs, "up", up)
    return jnp.einsum("tk,tkh->th", weights * valid, project(h, "down", down))


def flat_inputs(p: Problem) -> tuple[list[str], list[jax.Array]]:
    """Names and arrays of every differentiable input (x, weights, gate, up, down, LoRA A/B)."""
    names = ["x", "weights", "gate", "up", "down"]
    arrays = [p.x, p.weights, p.gate, p.up, p.down]
    for key in sorted(p.lora):
        names += [f"{key}_a", f"{key}_b"]
        arrays += list(p.lora[key])
    return names, arrays


def _rebuild(p: Problem, arrays):
    x, w, gate, up, down, *rest = arrays
    lora = {key: (rest[2 * i], rest[2 * i + 1]) for i, key in enumerate(sorted(p.lora))}
    return x, w, gate, up, down, lora


def loss_and_grads(p: Problem, moe_fn, cotangent: jax.Array):
    """y and the gradients of sum(y * cotangent) w.r.t. every differentiable input, via moe_fn."""
    names, arrays = flat_inputs(p)

    def loss(*arrays):
        x, w, gate, up, down, lora = _rebuild(p, arrays)
        y = moe_fn(x, p.ids, w, gate, up, down, lora or None, p.scale)
        return jnp.sum(y.astype(cotangent.dtype) * cotangent), y

    grad_fn = jax.jit(jax.grad(loss, argnums=tuple(range(len(arrays))), has_aux=True))
    grads, y = grad_fn(*arrays)
    return y, dict(zip(names, grads))


def reference_loss_and_grads(p: Problem, cotangent: np.ndarray):
    """float64 y and gradients of the dense reference, on the problem's exact (rounded) values."""
    with jax.enable_x64(True):
        q = Problem(
            *(jnp.asarray(np.asarray(a, np.float64)) if a.dtype != jnp.int32 else a for a in p.args()),
            lora={k: tuple(jnp.asarray(np.asarray(t, np.float64)) for t in v) for k, v in p.lora.items()},
            scale=p.scale,
        )
        y, grads = loss_and_grads(q, dense_reference, jnp.asarray(cotangent, jnp.float64))
        return np.asarray(y), {k: np.asarray(v) for k, v in grads.items()}


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (want must not be all zeros)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = np.abs(want).max()
    assert scale > 0, "reference is all zeros: the test would prove nothing"
    return float(np.abs(got - want).max() / scale)


def _bf16_values(a: np.ndarray) -> np.ndarray:
    """a rounded to the nearest bf16 (ties to even), back in float64."""
    return np.asarray(a, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


def rounded_intermediates_reference(p: Problem, cotangent: np.ndarray):
    """float64 y and gradients of sum(y * cotangent) with moe_experts(..., intermediates="bf16")'s rounding
    points, no LoRA: the backward written out by hand, since jax.grad cannot place them. The kernels
    receive dy = bf16(cotangent) (y is bf16), so this uses it too; then w h is rounded once (down
    projection, d down) and so are dg and du (dx, d gate, d up). Returns (y, {name: gradient}) keyed like
    loss_and_grads."""
    f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
    x, w, G, U, D = (f64(a) for a in (p.x, p.weights, p.gate, p.up, p.down))
    ids = np.asarray(p.ids)
    T, K = ids.shape
    dy = _bf16_values(cotangent)
    y = np.zeros_like(x)
    grads = {"x": np.zeros_like(x), "weights": np.zeros_like(w)}
    grads.update(gate=np.zeros_like(G), up=np.zeros_like(U), down=np.zeros_like(D))
    for e in range(G.shape[0]):  # each expert's slots at once
        t, k = np.nonzero(ids == e)
        xe, we, dye = x[t], w[t, k][:, None], dy[t]
        g, u = xe @ G[e].T, xe @ U[e].T
        sg = 1.0 / (1.0 + np.exp(-g))
        h = g * sg * u
        hw = _bf16_values(we * h)
        np.add.at(y, t, hw @ D[e].T)
        dh_full = dye @ D[e]
        grads["weights"][t, k] = np.sum(dh_full * h, axis=1)
        dh = we * dh_full
        du = _bf16_values(dh * g * sg)
        dg = _bf16_values(dh * u * sg * (1.0 + g * (1.0 - sg)))
        np.add.at(grads["x"], t, dg @ G[e] + du @ U[e])
        grads["gate"][e] = dg.T @ xe
        grads["up"][e] = du.T @ xe
        grads["down"][e] = dye.T @ hw
    return y, grads
