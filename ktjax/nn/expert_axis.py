"""Expert parallelism's axis: whether the model is being traced inside a ``jax.shard_map`` over
ModelConfig.expert_axis (then each shard holds its share of the routed experts and of the tokens)."""

from __future__ import annotations

import jax


def axis_bound(name: str) -> bool:
    """Whether `name` names a mesh axis of the ``jax.shard_map`` being traced ("" never does): with the
    expert axis bound, the experts are this shard's (ktjax.ops.moe_experts_sharded) and the router's
    statistics are summed over the shards; elsewhere the same model computes every expert itself."""
    if not name:
        return False
    try:
        jax.lax.axis_size(name)
    except NameError:
        return False
    return True
