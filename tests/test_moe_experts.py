"""moe_experts (CPU FFI kernels): forward and every gradient against a float64 dense reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from error_bounds import add, assert_output_within, assert_within, gamma
from moe_testing import (
    check_against_reference,
    cpu_moe,
    loss_and_grads,
    make_problem,
    representable_cotangent,
    tracked_reference,
)

from ktjax.ops import moe_experts

pytestmark = pytest.mark.kernels

# Every comparison with the reference holds each element to the bound of the kernels' f32 arithmetic on
# the problem's own operands (moe_testing.tracked_reference, tests/error_bounds.py); bf16 outputs are
# that f32 value rounded once (equal to the rounded reference wherever no rounding boundary lies within
# the bound).


SHAPES = {
    "odd_sizes": dict(T=13, K=3, E=5, H=72, I=40),
    "one_token": dict(T=1, K=2, E=4, H=16, I=24),
    "one_slot": dict(T=7, K=1, E=3, H=20, I=12),
    "one_expert": dict(T=9, K=1, E=1, H=24, I=8),
    "blocks_past_cache_tiles": dict(T=300, K=1, E=1, H=600, I=130),  # K-dim > 256, N > 512, M > 96
    # ~10 tokens per expert (the small-batch paths for bf16 weights), one reduction block of 1061 on
    # the dot path (two of 544 and 517 at the 96 rows below), and every edge: H % 32, I % 32, H % 4,
    # I % 4 and the tokens per expert % 6 all nonzero; the direct path's last block of 64 columns holds
    # 32 (H's first column tile with 2 workers: 544), fewer (the second: 517 = 8 * 64 + 5) or more (I: 45).
    "small_batches_with_edges": dict(T=37, K=3, E=11, H=1061, I=45),
    # Every token on both experts: each gets all 96 tokens, the most either small-batch path takes (the
    # dot path in the forward projections, the direct path in the chain to dx): 16 tiles of 6 rows, the
    # direct path's later tiles reading the first one's widened copy of each weight block.
    "small_batch_row_limit": dict(T=96, K=2, E=2, H=1061, I=45, ids=np.tile([0, 1], (96, 1))),
    # 95 tokens on both experts: 15 tiles of 6 and one of 5 (the last panel of packed token rows padded).
    "small_batch_rows_padded": dict(T=95, K=2, E=2, H=1061, I=45, ids=np.tile([0, 1], (95, 1))),
    # 16 tokens on one expert and a reduction too long for one block of the dot path at 16 rows (4096):
    # three blocks of equal depth, 2784, 2784 and 2732 (the last one's 12 past a multiple of 32 padded).
    "dot_path_split_reduction": dict(T=16, K=1, E=1, H=8300, I=40),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_forward_and_all_gradients_match_reference(shape, dtype):
    p = make_problem(0, **SHAPES[shape], dtype=dtype)
    check_against_reference(p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("policy", ["retain", "recompute"])
def test_lora_on_every_projection_matches_reference(policy, dtype):
    p = make_problem(2, T=11, K=2, E=4, H=72, I=40, dtype=dtype, ranks={"gate": 3, "up": 5, "down": 2})
    check_against_reference(p, policy)


def test_lora_on_some_projections_matches_reference():
    p = make_problem(3, T=10, K=2, E=3, H=24, I=40, ranks={"down": 3})
    check_against_reference(p)
    p = make_problem(4, T=10, K=2, E=3, H=24, I=40, ranks={"gate": 1, "up": 7})
    check_against_reference(p)


def test_dropped_slots_and_idle_experts():
    rng = np.random.default_rng(5)
    ids = rng.integers(-1, 2, (12, 3))  # experts 2..5 get no tokens; about a third of slots dropped
    ids[0] = -1  # a token with every slot dropped
    p = make_problem(5, T=12, K=3, E=6, H=40, I=24, ids=ids, ranks={"gate": 2, "down": 2})
    check_against_reference(p)
    _, grads = loss_and_grads(p, cpu_moe(), jnp.ones(p.x.shape, jnp.float32))
    assert np.all(np.asarray(grads["gate"])[2:] == 0)  # idle experts: exact zero gradient, not garbage
    assert np.all(np.asarray(grads["weights"])[np.asarray(ids) < 0] == 0)
    assert np.all(np.asarray(grads["x"])[0] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_all_slots_on_one_expert_including_repeats_within_a_token(dtype):
    ids = np.zeros((6, 3), np.int64)  # each token picks expert 0 three times
    p = make_problem(6, T=6, K=3, E=4, H=32, I=20, dtype=dtype, ids=ids, ranks={"up": 2})
    check_against_reference(p)


def test_matches_xla_backend():
    # Both backends are f32 evaluations of the same math, so both lie within the reference's bound (XLA's
    # logistic held to the same 8 ulps as the kernels' SiLU).
    p = make_problem(7, T=17, K=2, E=5, H=48, I=36, ranks={"gate": 2, "up": 2, "down": 2})
    cot = representable_cotangent(0, p.x.shape, jnp.float32)

    def xla(x, ids, w, gate, up, down, lora, scale):
        return moe_experts(x, ids, w, gate, up, down, lora=lora, lora_scale=scale, backend="xla")

    want = tracked_reference(p, cot)
    for backend, fn in (("cpu", cpu_moe()), ("xla", xla)):
        y, grads = loss_and_grads(p, fn, jnp.asarray(cot))
        assert_within(y, want["y"], f"{backend}: y")
        for name, g in grads.items():
            assert_within(g, want[name], f"{backend}: gradient of {name}")


def test_retain_and_recompute_give_identical_gradients():
    p = make_problem(8, T=20, K=2, E=4, H=40, I=24, ranks={"gate": 2, "up": 2, "down": 2})
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(p.x.shape), jnp.float32)
    _, g_retain = loss_and_grads(p, cpu_moe("retain"), cot)
    _, g_recompute = loss_and_grads(p, cpu_moe("recompute"), cot)
    for name in g_retain:
        np.testing.assert_array_equal(g_retain[name], g_recompute[name], err_msg=name)


def test_full_grads_accumulate_across_microbatches():
    p = make_problem(9, T=24, K=2, E=4, H=32, I=16, ranks={"down": 2})
    cot = representable_cotangent(3, p.x.shape, jnp.float32)
    names = ("gate", "up", "down", "down_a", "down_b")
    a, b = p.lora["down"]

    def weight_grads(s):
        def loss(gate, up, down, a, b):
            y = moe_experts(
                p.x[s], p.ids[s], p.weights[s], gate, up, down, lora={"down": (a, b)}, lora_scale=p.scale
            )
            return jnp.sum(y * cot[s])

        sub = dataclasses.replace(p, x=p.x[s], ids=p.ids[s], weights=p.weights[s])
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(p.gate, p.up, p.down, a, b), tracked_reference(
            sub, cot[s]
        )

    whole, want = weight_grads(slice(0, 24))
    parts = [weight_grads(s) for s in (slice(0, 7), slice(7, 16), slice(16, 24))]
    for i, name in enumerate(names):
        assert_within(whole[i], want[name], f"{name} of the whole batch")
        # Each part within its own bound, plus the test's own f32 sum of three parts (2 roundings).
        bound = add(*(ref[name] for _, ref in parts))
        bound.e = bound.e + gamma(2) * sum(ref[name].mag for _, ref in parts)
        assert_within(sum(grads[i] for grads, _ in parts), bound, f"{name} summed over micro-batches")


def test_works_under_jit_and_grad_of_jit():
    p = make_problem(10, T=8, K=2, E=3, H=24, I=16)

    def loss(x, w, gate):
        return jnp.sum(moe_experts(x, p.ids, w, gate, p.up, p.down) ** 2)

    jitted, eager = jax.jit(loss)(p.x, p.weights, p.gate), loss(p.x, p.weights, p.gate)
    # The kernels give the same y either way; XLA's sums of its T H = 192 squares (positive terms) may
    # associate differently: each within gamma(192) of the exact sum.
    assert abs(float(jitted) - float(eager)) <= 2 * gamma(p.x.size) * float(eager)
    # The upstream gradient 2 y is exact in either, so the backward kernel sees the same inputs: same bits.
    g_jit = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(p.x, p.weights, p.gate)
    g = jax.grad(loss, argnums=(0, 1, 2))(p.x, p.weights, p.gate)
    for a, b in zip(g_jit, g):
        np.testing.assert_array_equal(a, b)


def test_vmap_over_a_batch_of_token_sets_matches_a_loop():
    ps = [make_problem(20 + i, T=6, K=2, E=3, H=16, I=8) for i in range(3)]
    base = ps[0]
    xs = jnp.stack([q.x for q in ps])
    ids = jnp.stack([q.ids for q in ps])
    ws = jnp.stack([q.weights for q in ps])

    def loss(x, i, w, gate):
        return jnp.sum(moe_experts(x, i, w, gate, base.up, base.down) ** 2)

    vals = jax.vmap(loss, in_axes=(0, 0, 0, None))(xs, ids, ws, base.gate)
    grads = jax.vmap(jax.grad(loss, argnums=(0, 3)), in_axes=(0, 0, 0, None))(xs, ids, ws, base.gate)
    for b in range(3):
        # The kernels run once per batch element (vmap_method="sequential"): the same y and the same
        # gradients, bit for bit; XLA's sums of the 96 squares within gamma(96) each.
        one = float(loss(xs[b], ids[b], ws[b], base.gate))
        assert abs(float(vals[b]) - one) <= 2 * gamma(xs[b].size) * one
        gx, gg = jax.grad(loss, argnums=(0, 3))(xs[b], ids[b], ws[b], base.gate)
        np.testing.assert_array_equal(grads[0][b], gx)
        np.testing.assert_array_equal(grads[1][b], gg)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("shape", ["few_tokens", "blocks_past_cache_tiles"])
def test_fallback_isas_match_reference(shape, isa, dtype, use_isa):
    # Both have the small-batch kernels (few tokens per expert against bf16 weights); AVX2 also has
    # vectorised packers for full panels of 16 weight rows (many tokens; blocks_past_cache_tiles also has
    # a depth block of 130, not a multiple of their 8).
    from ktjax import ffi

    use_isa(isa)
    assert ffi.selected_isa() == isa
    dims = dict(T=10, K=2, E=3, H=72, I=40) if shape == "few_tokens" else SHAPES[shape]
    p = make_problem(11, **dims, dtype=dtype, ranks={"gate": 3, "down": 2})
    ffi.reset_kernel_counters()
    check_against_reference(p)
    small_batches = ffi.kernel_counters()["small_batch_flops"]
    if (shape, dtype) == ("few_tokens", jnp.bfloat16):
        assert small_batches > 0
    else:
        assert small_batches == 0


@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
@pytest.mark.parametrize(
    "shape",
    [
        "small_batches_with_edges",
        "small_batch_row_limit",
        "small_batch_rows_padded",
        "dot_path_split_reduction",
    ],
)
@pytest.mark.parametrize("policy", ["retain", "recompute"])
def test_small_batches_against_bf16_weights_stay_within_f32_bounds(policy, shape, isa, use_isa):
    # A few tokens per expert against bf16 weights take the small-batch paths, which read the weights
    # in place: the dot path in the forward projections, the direct path in the chain to dx. With f32
    # tokens, y and dx stay f32, so those paths are held to f32 accuracy; LoRA on every projection puts
    # the adapters' products (rank 2-5: edges only) through them too.
    from ktjax import ffi

    use_isa(isa)
    p = make_problem(14, **SHAPES[shape], ranks={"gate": 3, "up": 2, "down": 5})
    bf16 = {k: getattr(p, k).astype(jnp.bfloat16) for k in ("gate", "up", "down")}
    lora = {k: (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)) for k, (a, b) in p.lora.items()}
    p = dataclasses.replace(p, lora=lora, **bf16)
    cot = representable_cotangent(2, p.x.shape, jnp.float32)
    ffi.reset_kernel_counters()
    y, grads = loss_and_grads(p, cpu_moe(policy), jnp.asarray(cot))
    counters = ffi.kernel_counters()
    want = tracked_reference(p, cot)
    # FLOPs of one projection-sized product over every kept slot: the forward's gate, up and down
    # products take the small-batch paths, and so do the chain to dx's where each expert has its tokens
    # in one tile group (all but the edge shape, whose experts' rows split across workers).
    product = 2 * int(np.sum(np.asarray(p.ids) >= 0)) * p.gate.shape[1] * p.gate.shape[2]
    assert counters["small_batch_flops"] >= 3 * product
    if shape != "small_batches_with_edges":
        assert counters["small_batch_flops"] >= 5 * product
    assert y.dtype == jnp.float32
    assert_within(y, want["y"], "forward")
    for name, g in grads.items():
        assert_output_within(g, want[name], f"gradient of {name}")


# Tokens per expert on either side of the small-batch paths' limit (96 rows for both) and of their
# tiles of 6 rows (and around 64, the direct path's former limit): one expert per count.
ROW_COUNTS = (1, 5, 6, 7, 24, 25, 60, 61, 62, 63, 64, 65, 66, 95, 96, 97)


@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
def test_every_token_count_around_the_small_batch_limits_stays_within_f32_bounds(isa, use_isa):
    # Checked token by token, so that a few wrong rows of one expert cannot hide in a global error.
    use_isa(isa)
    rng = np.random.default_rng(16)
    ids = rng.permutation(np.repeat(np.arange(len(ROW_COUNTS)), ROW_COUNTS))[:, None]
    p = make_problem(16, T=len(ids), K=1, E=len(ROW_COUNTS), H=96, I=64, ids=ids)
    p = dataclasses.replace(p, **{k: getattr(p, k).astype(jnp.bfloat16) for k in ("gate", "up", "down")})
    cot = representable_cotangent(17, p.x.shape, jnp.float32)
    y, grads = loss_and_grads(p, cpu_moe(), jnp.asarray(cot))
    want = tracked_reference(p, cot)
    for name, got in (("y", y), ("x", grads["x"])):
        # Element by element, so that a few wrong rows of one expert cannot hide in a global error.
        for count in sorted(set(ROW_COUNTS)):
            rows = np.nonzero(np.asarray(ids[:, 0]) == ROW_COUNTS.index(count))[0]
            assert_within(np.asarray(got)[rows], want[name][rows], f"{name} of an expert with {count} tokens")


def test_f32_weights_never_take_the_small_batch_path():
    from ktjax import ffi

    p = make_problem(15, **SHAPES["small_batches_with_edges"], ranks={"down": 2})
    ffi.reset_kernel_counters()
    jax.block_until_ready(loss_and_grads(p, cpu_moe(), jnp.ones(p.x.shape, jnp.float32)))
    assert ffi.kernel_counters()["small_batch_flops"] == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_thread_count_does_not_change_results(dtype, monkeypatch):
    # bf16 also puts the products of two bf16 operands on the pair path, where the CPU has it. One
    # worker computes H and I in one column block each; more workers split them, a remainder under 32
    # columns joining the last block (3 workers: I in 64, 64 and 72 columns; 64 workers: H in 8 blocks
    # of 32 and one of 44, I in 5 of 32 and one of 40).
    p = make_problem(12, T=40, K=2, E=3, H=300, I=200, ranks={"up": 2}, dtype=dtype)
    cot = jnp.ones(p.x.shape, jnp.float32)
    monkeypatch.setenv("KTJAX_NUM_THREADS", "1")
    y1, g1 = loss_and_grads(p, cpu_moe(), cot)
    for workers in ("3", "64"):
        monkeypatch.setenv("KTJAX_NUM_THREADS", workers)
        y, g = loss_and_grads(p, cpu_moe(), cot)
        np.testing.assert_array_equal(y1, y, err_msg=f"y with {workers} workers")
        for name in g1:
            np.testing.assert_array_equal(g1[name], g[name], err_msg=f"{name} with {workers} workers")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_wide_work_items_match_reference(dtype, monkeypatch):
    # One worker and many experts: work items span more than 128 columns (I in one tile, H in 160s).
    monkeypatch.setenv("KTJAX_NUM_THREADS", "1")
    p = make_problem(13, T=48, K=2, E=12, H=520, I=300, dtype=dtype, ranks={"gate": 2, "down": 3})
    check_against_reference(p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_products_narrower_than_the_kernel_tile_match_reference(dtype):
    # Products with fewer columns than the micro-kernel's tile and more rows (LoRA's rank-r products;
    # here H and I are narrow too) are computed transposed: y and dx add into gathered token rows, g and
    # u add the LoRA products onto the base ones, and ~600 tokens per expert take two blocks of 512 rows.
    p = make_problem(18, T=1200, K=1, E=2, H=24, I=8, dtype=dtype, ranks={"gate": 4, "up": 16, "down": 8})
    check_against_reference(p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_base_weight_gradients_pack_each_experts_token_rows_once(dtype):
    # A work item packs its expert's token rows (x for d gate and d up, h for d down) once and reuses
    # them for every 128-row block of the gradient: here several depth blocks (300 tokens) and row
    # blocks (I = 130, H = 600) of one expert.
    from ktjax import ffi

    p = make_problem(16, **SHAPES["blocks_past_cache_tiles"], dtype=dtype)
    ffi.reset_kernel_counters()
    check_against_reference(p)
    counters = ffi.kernel_counters()
    assert counters["base_grad"] > 0
    assert counters["packed_once_flops"] == counters["base_grad"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_an_expert_too_large_to_pack_once_takes_the_unpacked_path(dtype):
    # Expert 0's 520 token rows of H = 6208 need more than the 12 MiB reuse buffer per worker, so its
    # d gate and d up pack x per product; expert 1 (40 tokens) and every d down still pack once.
    from ktjax import ffi

    ids = np.random.default_rng(17).permutation(np.repeat([0, 1], [520, 40]))[:, None]
    p = make_problem(17, T=560, K=1, E=2, H=6208, I=8, dtype=dtype, ids=ids)
    ffi.reset_kernel_counters()
    check_against_reference(p)
    counters = ffi.kernel_counters()
    assert 0 < counters["packed_once_flops"] < counters["base_grad"]
