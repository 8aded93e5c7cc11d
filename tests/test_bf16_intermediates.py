"""moe_experts(..., intermediates="bf16") — the default for bf16 tokens and weights: the operands of the
products that would mix f32 and bf16 — w h (down projection, d down), dg and du (dx, d gate, d up) —
are rounded to bf16 once, so that every projection-sized product has two bf16 operands (the pair path
where the CPU has AVX512_BF16).

The kernels are held to a float64 reference that rounds at exactly those points
(moe_testing.tracked_reference(..., "bf16")), element by element within the bound of their f32
arithmetic (tests/error_bounds.py): an output equals the reference rounded to bf16 wherever no rounding
boundary lies within its bound, and so does every rounded intermediate. Which reference a mode matches
more often, bit for bit, tells the modes apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from error_bounds import assert_output_within, round_to_bf16
from moe_testing import (
    PAIR_PATH_EDGE_SHAPES,
    loss_and_grads,
    make_problem,
    representable_cotangent,
    tracked_reference,
)

from ktjax import ffi
from ktjax.ops import moe_experts

pytestmark = pytest.mark.kernels

SHAPES = {
    # The edges of the pair kernels (few_tokens_edges also packs the weight gradients' pairs from an odd
    # token count), and:
    **PAIR_PATH_EDGE_SHAPES,
    "odd_sizes": dict(T=13, K=3, E=5, H=72, I=40),
    # Dropped slots (-1), a token with all its slots dropped, and idle experts.
    "dropped_slots": dict(
        T=12, K=3, E=6, H=40, I=24, ids=np.array([[-1, -1, -1]] + [[0, 1, -1], [1, 0, 1]] * 5 + [[-1, 0, 1]])
    ),
    # 601 tokens on one expert: the weight gradients' reduction over tokens in three blocks of pairs
    # (256 + 256 + 89 values), the last one odd.
    "token_blocks": dict(T=601, K=1, E=1, H=40, I=36),
}
OUTPUTS = ("y", "x", "gate", "up", "down")  # what the rounded intermediates reach (d topk_weights: not)


def bf16_mode(policy="retain", intermediates="bf16"):
    def fn(x, ids, w, gate, up, down, lora, scale):
        return moe_experts(
            x, ids, w, gate, up, down, lora=lora, lora_scale=scale, policy=policy, intermediates=intermediates
        )

    return fn


def run(p, mode_fn, cot):
    y, grads = loss_and_grads(p, mode_fn, jnp.asarray(cot, jnp.float32))
    return {"y": y, **grads}


def check_rounding_points(p, policy="retain", seed=1):
    """Runs the bf16 mode and holds every output to the reference rounding where the mode does."""
    cot = representable_cotangent(seed, p.x.shape, jnp.bfloat16)
    ref = tracked_reference(p, cot, "bf16")
    got = run(p, bf16_mode(policy), cot)
    for name, value in got.items():
        assert value.dtype == (jnp.float32 if name == "weights" else jnp.bfloat16), name
        assert_output_within(value, ref[name], name)
    return got, ref, cot


def bits_matching(got, want) -> int:
    """How many of got's bf16 elements equal want's values rounded to bf16."""
    return int(np.sum(np.asarray(np.asarray(got, np.float32), np.float64) == round_to_bf16(want.v)))


@pytest.mark.parametrize("policy", ["retain", "recompute"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_outputs_equal_a_reference_rounding_at_the_documented_points(shape, policy):
    p = make_problem(31, **SHAPES[shape], dtype=jnp.bfloat16)
    check_rounding_points(p, policy)


def test_each_mode_matches_its_own_reference_more_often_than_the_other():
    # The bound check above can tell the modes apart: each mode's outputs equal, bit for bit, the
    # reference that rounds as it does in more elements than the reference that rounds as the other
    # mode does.
    p = make_problem(32, **SHAPES["few_tokens_edges"], dtype=jnp.bfloat16)
    got, rounded, cot = check_rounding_points(p)
    unrounded = tracked_reference(p, cot, "f32")
    f32 = run(p, bf16_mode(intermediates="f32"), cot)
    for name in OUTPUTS:
        assert_output_within(f32[name], unrounded[name], f"f32 mode: {name}")
        assert bits_matching(got[name], rounded[name]) > bits_matching(got[name], unrounded[name]), name
        assert bits_matching(f32[name], unrounded[name]) > bits_matching(f32[name], rounded[name]), name


def test_error_against_the_exact_math_is_one_bf16_rounding_per_rounded_intermediate():
    # Against the exact math (no intermediate rounding), the bf16 mode is within the bound that counts
    # half a bf16 step at each rounded intermediate on top of the f32 arithmetic.
    p = make_problem(33, **SHAPES["packed_edges"], dtype=jnp.bfloat16)
    cot = representable_cotangent(2, p.x.shape, jnp.bfloat16)
    ref = tracked_reference(p, cot, "bf16_as_error")
    for name, value in run(p, bf16_mode(), cot).items():
        assert_output_within(value, ref[name], name)


def test_lora_and_router_gradients_are_those_of_the_f32_mode():
    # LoRA products and d topk_weights read only f32 values in either mode: bit-identical.
    ranks = {"gate": 3, "up": 2, "down": 4}
    p = make_problem(34, T=40, K=2, E=5, H=96, I=40, dtype=jnp.bfloat16, ranks=ranks)
    cot = representable_cotangent(3, p.x.shape, jnp.bfloat16)
    bf16, f32 = run(p, bf16_mode(), cot), run(p, bf16_mode(intermediates="f32"), cot)
    lora_names = [n for n in bf16 if n.endswith(("_a", "_b"))]
    assert len(lora_names) == 6
    for name in ["weights", *lora_names]:
        np.testing.assert_array_equal(np.asarray(bf16[name]), np.asarray(f32[name]), err_msg=name)
    assert not np.array_equal(np.asarray(bf16["gate"]), np.asarray(f32["gate"]))  # the mode did act
    # With LoRA on gate and up the backward keeps dg and du in f32 besides their copies: every output
    # within the bound of the reference that rounds at the same points.
    ref = tracked_reference(p, cot, "bf16")
    for name, value in bf16.items():
        assert_output_within(value, ref[name], name)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_isa_rounds_at_the_same_points(isa, use_isa):
    # Without the pair path the same bf16 operands are widened to f32: the same products, exact in f32.
    use_isa(isa)
    ffi.reset_kernel_counters()
    p = make_problem(35, **SHAPES["few_tokens_edges"], dtype=jnp.bfloat16)
    check_rounding_points(p)
    assert ffi.kernel_counters()["bf16_pair_flops"] == 0


@pytest.mark.parametrize("shape", ["few_tokens_edges", "rows_97", "token_blocks"])
@pytest.mark.parametrize("policy", ["retain", "recompute"])
def test_every_projection_sized_product_takes_the_pair_path(shape, policy, use_isa):
    use_isa("avx512_bf16")
    p = make_problem(36, **SHAPES[shape], dtype=jnp.bfloat16)
    S = int(np.sum(np.asarray(p.ids) >= 0))
    H, I = p.gate.shape[2], p.gate.shape[1]
    product = 2 * S * H * I
    cot = np.random.default_rng(4).standard_normal(p.x.shape)
    for intermediates, products in (("f32", 3), ("bf16", 9)):
        ffi.reset_kernel_counters()
        run(p, bf16_mode(policy, intermediates), cot)
        # forward gate, up (and down); backward dy Down_e (and dx's two, d gate, d up, d down); under
        # "recompute" the backward's gate and up besides.
        want = products + (2 if policy == "recompute" else 0)
        assert ffi.kernel_counters()["bf16_pair_flops"] == want * product, intermediates


def test_the_mode_works_under_jit_and_vmap():
    p = make_problem(37, T=12, K=2, E=3, H=40, I=24, dtype=jnp.bfloat16)

    def f(x):
        return moe_experts(x, p.ids, p.weights, p.gate, p.up, p.down, intermediates="bf16")

    xs = jnp.stack([p.x, p.x[::-1]])
    batched = jax.jit(jax.vmap(f))(xs)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(f(xs[i])))


@pytest.mark.slow
def test_an_expert_too_large_to_pack_once_still_takes_the_pair_path():
    # Expert 0's 520 token rows of H = 6208 do not fit the reuse buffer: its d gate and d up read x
    # through the gathered view (the pair path packs it per product), the rest pack once as pairs.
    ids = np.random.default_rng(17).permutation(np.repeat([0, 1], [520, 40]))[:, None]
    p = make_problem(38, T=560, K=1, E=2, H=6208, I=8, dtype=jnp.bfloat16, ids=ids)
    ffi.reset_kernel_counters()
    check_rounding_points(p)
    counters = ffi.kernel_counters()
    assert 0 < counters["packed_once_flops"] < counters["base_grad"]
    if ffi.selected_isa() == "avx512_bf16":
        assert counters["bf16_pair_flops"] == 9 * 2 * 560 * 6208 * 8


def test_thread_count_does_not_change_the_bf16_modes_results(monkeypatch):
    # Work items never share an output element, so 1 and 3 threads give the same bits.
    p = make_problem(39, T=160, K=2, E=3, H=300, I=200, dtype=jnp.bfloat16)
    cot = np.random.default_rng(5).standard_normal(p.x.shape)
    monkeypatch.setenv("KTJAX_NUM_THREADS", "1")
    one = run(p, bf16_mode(), cot)
    monkeypatch.setenv("KTJAX_NUM_THREADS", "3")
    three = run(p, bf16_mode(), cot)
    for name in one:
        np.testing.assert_array_equal(np.asarray(one[name]), np.asarray(three[name]), err_msg=name)
