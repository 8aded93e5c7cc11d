"""The test suite's own references: the bf16 rounding they use, and the tracked MoE reference against the
plain float64 one (jax.grad of the dense math)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from error_bounds import U_F32, bf16_may_round_either_way, bf16_ulp, round_to_bf16
from moe_testing import make_problem, reference_loss_and_grads, representable_cotangent, tracked_reference


def test_round_to_bf16_rounds_float64_once_to_nearest_even():
    cases = {
        1.0 + 2**-8: 1.0,  # a tie: to the even neighbour
        1.0 + 3 * 2**-8: 1.0 + 2**-6,  # a tie: up to the even neighbour
        1.0 + 2**-8 + 2**-30: 1.0 + 2**-7,  # just past a tie: up (through f32 it would round twice, to 1.0)
        -(1.0 + 2**-8 + 2**-30): -(1.0 + 2**-7),
        3.0 * 2**-134: 2**-132,  # subnormal range (spacing 2^-133): a tie, to the even multiple
        2**-134: 0.0,  # half the smallest subnormal, a tie: to zero
        2.0**128 * (1 - 2**-9): np.inf,  # rounds up past the largest finite value
        -0.0: -0.0,
    }
    got = round_to_bf16(np.array(list(cases)))
    np.testing.assert_array_equal(got, np.array(list(cases.values())))
    assert np.signbit(round_to_bf16(np.array([-0.0])))[0]
    assert np.isnan(round_to_bf16(np.array([np.nan])))[0]


def test_rounding_boundaries_are_seen_within_a_bound():
    # 1 + 2^-8 + 2^-20 lies 2^-20 above a midpoint; 1 + 2^-9 a quarter step from both midpoints around
    # it; below 1.0 the spacing halves, so the midpoint under 1.0 is 1 - 2^-9, not 1 - 2^-8.
    v = np.array([1.0 + 2**-8 + 2**-20, 1.0 + 2**-9, 1.0])
    assert bf16_may_round_either_way(v, np.full(3, 2.0**-19)).tolist() == [True, False, False]
    assert bf16_may_round_either_way(v, np.full(3, 2.0**-9 + 2.0**-12)).tolist() == [True, True, True]
    assert bf16_ulp(np.array([1.0, 1.99, 0.5])).tolist() == [2**-7, 2**-7, 2**-8]


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_tracked_reference_equals_autodiff_of_the_dense_math(lora):
    # Both are float64 evaluations of the same math: they differ by the tracked bound scaled from f32's
    # unit roundoff to float64's (2^-53 / 2^-24), twice (one for each side).
    ranks = {"gate": 3, "up": 2, "down": 4} if lora else None
    ids = np.random.default_rng(3).integers(-1, 5, (19, 3))  # dropped slots and repeats within a token
    p = make_problem(40, T=19, K=3, E=5, H=40, I=24, ranks=ranks, ids=ids)
    cot = representable_cotangent(4, p.x.shape, jnp.float32)
    want = tracked_reference(p, cot)
    y, grads = reference_loss_and_grads(p, cot)
    for name, got in (("y", y), *grads.items()):
        bound = 2 * (want[name].e + U_F32 * want[name].mag) * 2.0**-29
        assert np.all(np.abs(got - want[name].v) <= bound), name
        assert np.abs(want[name].v).max() > 0, name
