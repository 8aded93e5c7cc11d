"""Helpers for tests that run whole models."""

from __future__ import annotations

import jax

from ktjax.params import merge_model, split_model


def jit_logits(model, *inputs) -> jax.Array:
    """model(*inputs) under jax.jit: an eager call of a whole model dispatches op by op (slow)."""
    defn, params = split_model(model)
    return jax.jit(lambda p, *a: merge_model(defn, p)(*a))(params, *inputs)
