"""Kernel scratch memory is borrowed from a pool and reused: after the first call, repeated calls
allocate nothing, results do not depend on what the buffers held before, and idle memory can be freed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moe_testing import make_problem

from ktjax import ffi
from ktjax.ops import moe_experts

pytestmark = [pytest.mark.kernels, pytest.mark.sanitized]


def step_fn(p):
    def loss(x, w, gate, up, down, lora):
        y = moe_experts(x, p.ids, w, gate, up, down, lora=lora, lora_scale=p.scale)
        return jnp.sum(y.astype(jnp.float32) * jnp.cos(y.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))


def test_repeated_calls_reuse_scratch_and_match_bitwise():
    p = make_problem(0, T=40, K=3, E=5, H=72, I=40, dtype=jnp.bfloat16, ranks={"gate": 3, "down": 2})
    fn = step_fn(p)
    args = (p.x, p.weights, p.gate, p.up, p.down, p.lora)
    first = jax.block_until_ready(fn(*args))
    allocated = ffi.kernel_counters()["scratch_allocations"]
    for _ in range(3):
        again = jax.block_until_ready(fn(*args))
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    counters = ffi.kernel_counters()
    assert counters["scratch_allocations"] == allocated  # nothing allocated by the repeats
    assert counters["scratch_bytes"] > 0 and counters["scratch_peak_bytes"] >= counters["scratch_bytes"]


def test_released_scratch_is_allocated_again_with_the_same_results():
    p = make_problem(1, T=24, K=2, E=4, H=48, I=32, ranks={"up": 2})
    fn = step_fn(p)
    args = (p.x, p.weights, p.gate, p.up, p.down, p.lora)
    before = jax.block_until_ready(fn(*args))
    freed = ffi.release_scratch()
    assert freed > 0 and ffi.kernel_counters()["scratch_bytes"] == 0
    allocated = ffi.kernel_counters()["scratch_allocations"]
    after = jax.block_until_ready(fn(*args))
    assert ffi.kernel_counters()["scratch_allocations"] > allocated
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
