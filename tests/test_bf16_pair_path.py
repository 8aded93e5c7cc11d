"""The bf16 pair path (vdpbf16ps, CPUs with AVX512_BF16): bf16 tokens times bf16 gate and up weights,
and the backward's bf16 dy times the down weights.

Each product of two bf16 values is exact in f32 and the sums stay f32, so the gate and up
pre-activations the forward saves (f32) and the router weights' gradients (f32, through dy Down_e)
are held to the bound of f32 sums (tests/error_bounds.py) against a float64 reference, on each of its
kernels: the dot kernel (weights stored [N, K]) and the direct kernel (stored [K, N]) up to 96 tokens
per expert, the packed micro-kernel past that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from error_bounds import Tracked, add, assert_output_within, assert_within, matmul
from moe_testing import (
    PAIR_PATH_EDGE_SHAPES,
    loss_and_grads,
    make_problem,
    representable_cotangent,
    tracked_reference,
)

from ktjax import ffi
from ktjax.ops import moe_experts
from ktjax.ops.moe_experts import _forward_call, _named_inputs

pytestmark = pytest.mark.kernels

SHAPES = {
    **PAIR_PATH_EDGE_SHAPES,
    "few_tokens_odd_width": dict(T=13, K=3, E=5, H=71, I=42),
    # 16 tokens and a reduction of three equal blocks (dot kernel, 2784 + 2784 + 2732).
    "split_reduction": dict(T=16, K=1, E=1, H=8300, I=40),
    "packed_narrow": dict(T=130, K=1, E=1, H=31, I=33),
}


def saved_preactivations(p, lora_ranks=()):
    """g and u [T*K, I] f32 as the forward saves them (slots sorted by expert, stable), and the
    float64 reference in the same order."""
    named, quant = _named_inputs(*p.args(), p.lora)
    out = _forward_call(named, p.lora, quant, p.scale, "f32", save_preact=True)
    g, u = out["g_saved"], out["u_saved"]
    K = p.ids.shape[1]
    ids = np.asarray(p.ids).reshape(-1)
    order = np.argsort(ids, kind="stable")
    f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
    x = Tracked.exact(f64(p.x)[order // K])
    e = ids[order]
    H = p.gate.shape[2]

    def reference(name):  # expert by expert: x W_e^T (+ s (x A_e^T) B_e^T), one f32 accumulator per value
        rank = p.lora[name][0].shape[1] if name in p.lora else 0
        w = Tracked.exact(f64(getattr(p, name)))
        out = Tracked(np.zeros((len(e), w.v.shape[1])), np.zeros((len(e), w.v.shape[1])))
        for ex in np.unique(e):
            rows = np.nonzero(e == ex)[0]
            res = matmul(x[rows], w[ex].T, H + rank + 2)
            if name in p.lora:
                a, b = (Tracked.exact(f64(t)[ex]) for t in p.lora[name])
                res = add(res, matmul(matmul(x[rows], a.T, H), b.T, H + rank + 2, scale=p.scale))
            out.v[rows], out.e[rows] = res.v, res.e
        return out

    return (np.asarray(g), reference("gate")), (np.asarray(u), reference("up"))


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_gate_and_up_preactivations_are_exact_to_f32(shape, use_isa):
    use_isa("avx512_bf16")
    p = make_problem(21, **SHAPES[shape], dtype=jnp.bfloat16)
    ffi.reset_kernel_counters()
    (g, g_ref), (u, u_ref) = saved_preactivations(p)
    counters = ffi.kernel_counters()
    # Every gate and up product took the pair path, and nothing else did.
    S, I, H = g.shape[0], p.gate.shape[1], p.gate.shape[2]
    assert counters["bf16_pair_flops"] == 2 * (2 * S * I * H)
    assert_within(g, g_ref, "gate")
    assert_within(u, u_ref, "up")


def test_lora_a_products_of_bf16_adapters_take_the_pair_path(use_isa):
    # x A^T with a bf16 A is a pair product too (rank 3: one group of 3 weight rows); z B^T is not (z f32).
    use_isa("avx512_bf16")
    p = make_problem(22, **SHAPES["few_tokens_edges"], dtype=jnp.bfloat16, ranks={"gate": 3, "up": 5})
    ffi.reset_kernel_counters()
    (g, g_ref), (u, u_ref) = saved_preactivations(p)
    S, I, H = g.shape[0], p.gate.shape[1], p.gate.shape[2]
    assert ffi.kernel_counters()["bf16_pair_flops"] == 2 * S * H * (2 * I + 3 + 5)
    assert_within(g, g_ref, "gate")
    assert_within(u, u_ref, "up")


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_other_isas_never_take_the_pair_path_and_agree_with_it(isa, use_isa, monkeypatch):
    use_isa("avx512_bf16")
    p = make_problem(23, **SHAPES["packed_edges"], dtype=jnp.bfloat16)
    (g_pairs, _), _ = saved_preactivations(p)
    use_isa(isa)
    ffi.reset_kernel_counters()
    (g, g_ref), _ = saved_preactivations(p)
    assert ffi.kernel_counters()["bf16_pair_flops"] == 0
    # Both paths within the bound of f32 sums of the same exact products (any association order).
    assert_within(g, g_ref, f"{isa}: gate")
    assert_within(g_pairs, g_ref, "avx512_bf16: gate")


def test_f32_tokens_never_take_the_pair_path(use_isa):
    # bf16 weights with f32 tokens: the products have an f32 operand, so they stay on the f32 kernels.
    use_isa("avx512_bf16")
    p = make_problem(24, **SHAPES["few_tokens_edges"])
    p.gate, p.up, p.down = (t.astype(jnp.bfloat16) for t in (p.gate, p.up, p.down))
    ffi.reset_kernel_counters()
    jax.block_until_ready(saved_preactivations(p)[0][0])
    assert ffi.kernel_counters()["bf16_pair_flops"] == 0


@pytest.mark.parametrize("shape", ["few_tokens_edges", "packed_narrow"])
def test_a_weight_rows_neighbour_never_leaks_into_its_products(shape, use_isa):
    # H % 32 != 0: the last block of 32 of each weight row ends inside the next row. An inf there
    # (the next row's first value) must not reach this row's products, even times a zero padding.
    use_isa("avx512_bf16")
    p = make_problem(25, **SHAPES[shape], dtype=jnp.bfloat16)
    p.gate = p.gate.at[:, 1, 0].set(jnp.inf)
    (g, g_ref), _ = saved_preactivations(p)
    assert np.isinf(g_ref.v[:, 1]).all() and np.isinf(g[:, 1]).all()
    keep = np.ones(g.shape[1], bool)
    keep[1] = False
    assert_within(g[:, keep], g_ref[:, keep], "gate")


DY_DOWN_SHAPES = ("few_tokens_edges", "few_tokens_odd_width", "row_limit_96", "rows_97")


@pytest.mark.parametrize("policy", ["retain", "recompute"])
@pytest.mark.parametrize("shape", [*DY_DOWN_SHAPES, "packed_edges"])
def test_router_weight_gradients_through_dy_down_pairs_are_exact_to_f32(shape, policy, use_isa):
    # d topk_weights = (dy Down_e) . h is f32; with a cotangent of bf16 values, dy is exact, so it is held
    # to f32 accuracy. dy Down_e takes the pair path: its direct kernel up to 96 tokens per expert (~10
    # with I = 45 and 42: a last block of 64 columns partly masked; an odd H = 1061 or 71: a last block
    # of rows with an odd count; 96: 16 row tiles, the first copying each block of weights, the others
    # reading the copy), packed past that (97 and 200; H = 1101 leaves the last pair half empty).
    use_isa("avx512_bf16")
    p = make_problem(26, **SHAPES[shape], dtype=jnp.bfloat16)
    cot = representable_cotangent(3, p.x.shape, jnp.bfloat16)

    def moe(x, ids, w, gate, up, down, lora, scale):
        return moe_experts(
            x, ids, w, gate, up, down, lora=lora, lora_scale=scale, policy=policy, intermediates="f32"
        )

    ffi.reset_kernel_counters()
    _, grads = loss_and_grads(p, moe, jnp.asarray(cot))
    pair_flops = ffi.kernel_counters()["bf16_pair_flops"]
    want = tracked_reference(p, cot)
    S, I, H = p.ids.size, p.gate.shape[1], p.gate.shape[2]
    gate_up = (2 if policy == "recompute" else 1) * 2 * (2 * S * I * H)
    assert pair_flops == gate_up + 2 * S * H * I
    assert_within(grads["weights"], want["weights"], "weights")
    assert_output_within(grads["x"], want["x"], "x")
