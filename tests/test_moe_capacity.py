"""The benchmark's pure-XLA baseline computes the same op (so its timings compare like with like)."""

import jax.numpy as jnp
import numpy as np
from moe_testing import loss_and_grads, make_problem, reference_loss_and_grads, rel_err

from ktjax.ops.moe_capacity import dropless_capacity, moe_experts_capacity


def test_capacity_baseline_at_dropless_capacity_matches_the_reference():
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 5, (15, 3))
    p = make_problem(0, T=15, K=3, E=5, H=24, I=16, ids=ids, ranks={"gate": 2, "down": 3})
    capacity = dropless_capacity(ids, 5)

    def fn(x, ids, w, gate, up, down, lora, scale):
        return moe_experts_capacity(x, ids, w, gate, up, down, lora, scale, capacity=capacity)

    cot = rng.standard_normal(p.x.shape)
    y, grads = loss_and_grads(p, fn, jnp.asarray(cot, jnp.float32))
    y_ref, grads_ref = reference_loss_and_grads(p, cot)
    assert rel_err(y, y_ref) < 2e-5
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 2e-5, name


def test_capacity_below_the_largest_load_drops_slots():
    ids = np.zeros((6, 1), np.int64)  # all six tokens on expert 0
    p = make_problem(1, T=6, K=1, E=2, H=8, I=4, ids=ids)
    y = moe_experts_capacity(*p.args(), capacity=4)
    assert dropless_capacity(ids, 2) == 6
    assert np.all(np.asarray(y[4:]) == 0) and np.all(np.abs(np.asarray(y[:4])) > 0)
