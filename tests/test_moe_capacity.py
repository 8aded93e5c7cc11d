"""The benchmark's pure-XLA baseline computes the same op (so its timings compare like with like)."""

import jax.numpy as jnp
import numpy as np
from error_bounds import assert_within
from moe_testing import loss_and_grads, make_problem, representable_cotangent, tracked_reference

from ktjax.ops.moe_capacity import dropless_capacity, moe_experts_capacity


def test_capacity_baseline_at_dropless_capacity_matches_the_reference():
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 5, (15, 3))
    p = make_problem(0, T=15, K=3, E=5, H=24, I=16, ids=ids, ranks={"gate": 2, "down": 3})
    capacity = dropless_capacity(ids, 5)

    def fn(x, ids, w, gate, up, down, lora, scale):
        return moe_experts_capacity(x, ids, w, gate, up, down, lora, scale, capacity=capacity)

    cot = representable_cotangent(1, p.x.shape, jnp.float32)
    y, grads = loss_and_grads(p, fn, jnp.asarray(cot))
    # An f32 evaluation of the same math (its own association order; XLA's logistic held to the
    # kernels' 8 ulps): within the bound of the kernels' arithmetic (tests/error_bounds.py).
    want = tracked_reference(p, cot)
    assert_within(y, want["y"], "y")
    for name in grads:
        assert_within(grads[name], want[name], name)


def test_capacity_below_the_largest_load_drops_slots():
    ids = np.zeros((6, 1), np.int64)  # all six tokens on expert 0
    p = make_problem(1, T=6, K=1, E=2, H=8, I=4, ids=ids)
    y = moe_experts_capacity(*p.args(), capacity=4)
    assert dropless_capacity(ids, 2) == 6
    assert np.all(np.asarray(y[4:]) == 0) and np.all(np.abs(np.asarray(y[:4])) > 0)
