"""Random MoE expert problems and a dense float64 reference of the expert math, for the op tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from error_bounds import (
    U_F32,
    Tracked,
    add,
    assert_output_within,
    bf16_rounding_as_error,
    gamma,
    matmul,
    mul,
    round_to_bf16,
    round_to_f32,
    rounded_to_bf16,
)

from ktjax.ops import moe_experts
from ktjax.ops.moe_checks import default_intermediates

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


def cpu_moe(policy: str = "retain", intermediates: str = "auto"):
    """moe_experts on the CPU kernels, in loss_and_grads' calling convention."""

    def fn(x, ids, w, gate, up, down, lora, scale):
        return moe_experts(
            x, ids, w, gate, up, down, lora=lora, lora_scale=scale, policy=policy, intermediates=intermediates
        )

    return fn


def check_against_reference(p: Problem, policy: str = "retain", seed: int = 1, intermediates: str = "auto"):
    """Runs the kernels (moe_experts; default intermediates: by dtype) and holds y and every gradient to
    the bounds of tracked_reference. Returns (y, {name: gradient})."""
    cot = representable_cotangent(seed, p.x.shape, p.x.dtype)
    y, grads = loss_and_grads(p, cpu_moe(policy, intermediates), jnp.asarray(cot, jnp.float32))
    mode = default_intermediates(p.x.dtype, p.gate.dtype, "cpu") if intermediates == "auto" else intermediates
    want = tracked_reference(p, cot, mode)
    assert y.dtype == p.x.dtype
    assert_output_within(y, want["y"], "forward")
    for name, g in grads.items():
        assert_output_within(g, want[name], f"gradient of {name}")
    return y, grads


def representable_cotangent(seed: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Random normal upstream gradients, rounded to values that `dtype` (the output's) holds exactly, so
    that the kernels receive exactly the dy the references use (no conversion on the way rounds)."""
    cot = np.random.default_rng(seed).standard_normal(shape)
    return round_to_bf16(cot) if jnp.dtype(dtype) == jnp.bfloat16 else round_to_f32(cot)


# The SiLU gating's constants for the bounds: max |silu'| = 1.0998 (at v = 2.40), max |silu''| = 1/2
# (at 0), and the kernels' own rounding error, derived and held for every ISA in
# tests/test_silu_gating.py: 8 f32 ulps of |h| and |du|, 16 of dg's scale |d u sigmoid(g)| (1 + |g|).
SILU_SLOPE, SILU_CURVATURE, SILU_ULPS, SILU_GRAD_ULPS = 1.1, 0.5, 8, 16


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _silu_mul(g: Tracked, u: Tracked) -> Tracked:
    """h = silu(g) u."""
    silu = g.v * _sigmoid(g.v)
    silu_mag = np.abs(silu) + SILU_SLOPE * g.e
    e = SILU_SLOPE * g.e * u.mag + np.abs(silu) * u.e + SILU_ULPS * U_F32 * silu_mag * u.mag
    return Tracked(silu * u.v, e)


def _silu_mul_grad(g: Tracked, u: Tracked, dh: Tracked, w: np.ndarray) -> tuple[Tracked, Tracked]:
    """(dg, du) of h = silu(g) u for the upstream gradient w dh (w: exact router weights, [n, 1])."""
    sg = _sigmoid(g.v)
    silu, slope = g.v * sg, sg * (1.0 + g.v * (1.0 - sg))
    silu_mag = np.abs(silu) + SILU_SLOPE * g.e
    slope_mag = np.abs(slope) + SILU_CURVATURE * g.e
    sg_mag = np.minimum(1.0, sg + 0.25 * g.e)  # max sigmoid' = 1/4
    d = w * dh.v
    w = np.abs(w)
    du_e = w * (dh.e * silu_mag + np.abs(dh.v) * SILU_SLOPE * g.e) + SILU_ULPS * U_F32 * w * dh.mag * silu_mag
    dg_e = w * (dh.e * u.mag * slope_mag + np.abs(dh.v) * u.e * slope_mag)
    dg_e += w * np.abs(dh.v) * np.abs(u.v) * SILU_CURVATURE * g.e
    dg_e += SILU_GRAD_ULPS * U_F32 * w * dh.mag * u.mag * sg_mag * (1.0 + g.mag)
    return Tracked(d * u.v * slope, dg_e), Tracked(d * silu, du_e)


def _dot_rows(a: Tracked, b: Tracked, terms: int) -> Tracked:
    """sum(a * b, axis=1) in f32, one accumulator per row."""
    v = np.sum(a.v * b.v, axis=1)
    e = np.sum(np.abs(a.v) * b.e + a.e * np.abs(b.v) + a.e * b.e, axis=1)
    return Tracked(v, e + gamma(terms) * np.sum(a.mag * b.mag, axis=1))


def _scatter_add(out: Tracked, rows: np.ndarray, part: Tracked) -> None:
    np.add.at(out.v, rows, part.v)
    np.add.at(out.e, rows, part.e)


def tracked_reference(
    p: Problem,
    dy: np.ndarray,
    intermediates: str = "f32",
    weights: dict[str, Tracked] | None = None,
    backward_weights: dict[str, Tracked] | None = None,
) -> dict[str, Tracked]:
    """y and the gradients of sum(y * dy), each with the bound of the kernels' arithmetic (error_bounds.py).

    The expert math is written out slot group by slot group, as the kernels compute it, so that each
    product's accumulation length is known: g and u sum H products (+ the adapter's r); y and dx add
    all of a token's slots into one f32 accumulator (K (I + r + 2) and K (2 I + 2 r + 4) terms);
    weight gradients sum an expert's slots. `intermediates="bf16"` rounds where moe_experts(...,
    intermediates="bf16") does — w h for the down projection and d Down, dg and du for dx and d Gate /
    d Up — and the reference's values are those rounded ones (LoRA products and d topk_weights read
    the f32 values); "bf16_as_error" keeps the exact values and counts those roundings in the bounds.
    dy: the upstream gradient the kernels receive (exact, see representable_cotangent).
    weights: Tracked values to use for gate / up / down instead of p's exact ones (a quantized weight's,
    whose kernels compute with its codes and scales: tests/test_quant_kernels.py).
    backward_weights: the same for the products of the chain to dx (dy Down, dg Gate, du Up) where they
    differ (a quantized weight read as a bf16 copy there), else `weights`.
    Returns {name: Tracked} keyed like loss_and_grads ("y", "x", "weights", "gate", ..., "gate_a", ...).
    """
    f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
    exact = lambda a: Tracked.exact(f64(a))  # noqa: E731
    x, G, U, D = (exact(a) for a in (p.x, p.gate, p.up, p.down))
    weights = weights or {}
    G, U, D = (weights.get(name, w) for name, w in (("gate", G), ("up", U), ("down", D)))
    backward_weights = backward_weights or {}
    Gb, Ub, Db = (backward_weights.get(name, w) for name, w in (("gate", G), ("up", U), ("down", D)))
    w_all = f64(p.weights)
    dy_all = Tracked.exact(np.asarray(dy, np.float64))
    lora = {k: (exact(a), exact(b)) for k, (a, b) in p.lora.items()}
    rank = {k: int(p.lora[k][0].shape[1]) if k in p.lora else 0 for k in ("gate", "up", "down")}
    s = p.scale
    round_mid = {"f32": None, "bf16": rounded_to_bf16, "bf16_as_error": bf16_rounding_as_error}[intermediates]
    ids = np.asarray(p.ids)
    T, K = ids.shape
    E, I, H = p.gate.shape

    def zeros(*shape):
        return Tracked.exact(np.zeros(shape))

    out = {"y": zeros(T, H), "x": zeros(T, H), "weights": zeros(T, K)}
    out.update(gate=zeros(E, I, H), up=zeros(E, I, H), down=zeros(E, H, I))
    for k in p.lora:
        a, b = p.lora[k]
        out[f"{k}_a"], out[f"{k}_b"] = zeros(*a.shape), zeros(*b.shape)
    n_y = K * (I + rank["down"] + 2)
    n_dx = K * (2 * I + rank["gate"] + rank["up"] + 4)

    def project(v, name, W, e, terms):  # v [n, in] -> W_e v (+ s B_e (A_e v)) in one accumulator of `terms`
        res = matmul(v, W[e].T, terms)
        if name in lora:
            a, b = lora[name]
            res = add(res, matmul(matmul(v, a[e].T, v.v.shape[1]), b[e].T, terms, scale=s))
        return res

    for e in range(E):
        t, k = np.nonzero(ids == e)
        n = len(t)
        if n == 0:
            continue
        xe, w, dye = x[t], w_all[t, k][:, None], dy_all[t]
        w_t = Tracked.exact(w)
        g = project(xe, "gate", G, e, H + rank["gate"] + 2)
        u = project(xe, "up", U, e, H + rank["up"] + 2)
        h = _silu_mul(g, u)
        hw = mul(w_t, h)
        hw_base = round_mid(hw) if round_mid else hw
        y_e = matmul(hw_base, D[e].T, n_y)
        if "down" in lora:
            a, b = lora["down"]
            zd = matmul(h, a[e].T, I)
            y_e = add(y_e, matmul(mul(w_t, zd), b[e].T, n_y, scale=s))
        _scatter_add(out["y"], t, y_e)

        # Backward.
        dh = matmul(dye, Db[e], H + rank["down"] + 2)
        if "down" in lora:
            a, b = lora["down"]
            q = matmul(dye, b[e], H)
            dh = add(dh, matmul(q, a[e], H + rank["down"] + 2, scale=s))
        dw = _dot_rows(dh, h, I)
        out["weights"].v[t, k], out["weights"].e[t, k] = dw.v, dw.e
        dg, du = _silu_mul_grad(g, u, dh, w)
        dg_base, du_base = (round_mid(dg), round_mid(du)) if round_mid else (dg, du)
        dx = add(matmul(dg_base, Gb[e], n_dx), matmul(du_base, Ub[e], n_dx))
        for name, d in (("gate", dg), ("up", du)):
            if name in lora:
                a, b = lora[name]
                pe = matmul(d, b[e], I)
                dx = add(dx, matmul(pe, a[e], n_dx, scale=s))
                z = matmul(xe, a[e].T, H)
                _set_expert(out[f"{name}_b"], e, matmul(d.T, z, n + 1, scale=s))
                _set_expert(out[f"{name}_a"], e, matmul(pe.T, xe, n + 1, scale=s))
        _scatter_add(out["x"], t, dx)
        _set_expert(out["gate"], e, matmul(dg_base.T, xe, n + 1))
        _set_expert(out["up"], e, matmul(du_base.T, xe, n + 1))
        wdy = mul(w_t, dye)
        _set_expert(out["down"], e, matmul(dye.T, hw_base, n + 1) if round_mid else matmul(wdy.T, h, n + 1))
        if "down" in lora:
            a, b = lora["down"]
            _set_expert(out["down_b"], e, matmul(wdy.T, zd, n + 1, scale=s))
            _set_expert(out["down_a"], e, matmul(mul(w_t, q).T, h, n + 1, scale=s))
    return out


def _set_expert(out: Tracked, e: int, value: Tracked) -> None:
    out.v[e], out.e[e] = value.v, value.e
