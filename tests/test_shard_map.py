"""moe_experts inside jax.shard_map (check_vma on, JAX's default), 2 host devices: data- and
expert-parallel layouts give the kernels' own results shard by shard, bit for bit, with the gradients
of replicated weights summed over the shards; and ktjax.ops.moe_sharded's expert parallelism (slots
sent to their experts' shards with all_to_all) gives one device's results, alone and in a model with
ModelConfig.expert_axis, and in a training step (tests/shard_map_check.py, in its own process: the
device count is fixed when JAX starts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("shard_map_check.py")


def test_moe_experts_in_shard_map_matches_the_kernels_shard_by_shard_and_sums_replicated_gradients():
    # and moe_experts_sharded's all_to_all expert parallelism gives moe_experts' results
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    for layout in ("data_parallel", "expert_parallel"):
        for dtype in ("float32", "bfloat16"):
            assert f"ok {layout} {dtype}" in lines, result.stdout
    assert "ok all_to_all float32" in lines, result.stdout
    assert "ok model float32" in lines and "ok quantized model" in lines, result.stdout
    for rules in ("full", "hybrid"):
        assert f"ok training {rules}" in lines, result.stdout
    assert "ok training bf16" in lines and "ok resume" in lines, result.stdout
