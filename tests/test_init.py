"""Random initialisation of large weights in blocks (ktjax.nn.init)."""

from __future__ import annotations

import subprocess
import sys

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


def test_eager_and_traced_block_draws_give_the_same_weight(monkeypatch):
    monkeypatch.setattr(init, "CHUNK", 1000)
    key = jax.random.key(2)
    eager = init.normal(key, (100, 64), 0.5, jnp.bfloat16)  # blocks written in place, one at a time
    traced = jax.jit(lambda k: init.normal(k, (100, 64), 0.5, jnp.bfloat16))(key)  # one concatenation
    np.testing.assert_array_equal(
        np.asarray(eager.astype(jnp.float32)), np.asarray(traced.astype(jnp.float32))
    )


DRAW_PEAK = """
import jax, jax.numpy as jnp
from ktjax.memory import peak_rss_bytes
from ktjax.nn.init import normal
start = peak_rss_bytes()
w = jax.block_until_ready(normal(jax.random.key(0), (151936, 2048), 0.02, jnp.bfloat16))
print((peak_rss_bytes() - start) / w.nbytes)
"""


def test_drawing_a_vocabulary_sized_weight_takes_little_more_than_its_bytes():
    # Qwen3's 151936 x 2048 embedding, 0.62 GB in bf16, in a process of its own (peak RSS is per
    # process). With the blocks' draws dispatched side by side the peak grew by 6.0x its bytes; drawn
    # one after the other into the result, 1.2x (docs/performance-log.md).
    done = subprocess.run([sys.executable, "-c", DRAW_PEAK], capture_output=True, text=True, check=True)
    growth = float(done.stdout.strip().splitlines()[-1])
    assert growth < 1.6, growth
