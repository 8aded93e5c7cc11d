"""Random initialisation of large weights in blocks (ktjax.nn.init)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.nn import init


def test_a_weight_larger_than_one_draw_is_drawn_in_independent_blocks_of_rows(monkeypatch):
    monkeypatch.setattr(init, "CHUNK", 1000)  # 15 rows of 64 per block: 7 blocks, the last one short
    w = np.asarray(init.normal(jax.random.key(0), (100, 64), 0.5, jnp.bfloat16).astype(jnp.float32))
    assert w.shape == (100, 64)
    assert init.normal(jax.random.key(0), (100, 64), 0.5, jnp.bfloat16).dtype == jnp.bfloat16
    assert abs(w.std() / 0.5 - 1) < 0.05 and abs(w.mean()) < 0.03
    assert not np.array_equal(w[:15], w[15:30])  # a key per block, not one block repeated
    again = np.asarray(init.normal(jax.random.key(0), (100, 64), 0.5, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(w, again)


def test_a_small_weight_is_one_draw_as_before():
    key = jax.random.key(4)
    want = (jax.random.normal(key, (8, 16)) * 0.25).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(init.normal(key, (8, 16), 0.25, jnp.float32)), np.asarray(want))
