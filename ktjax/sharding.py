"""Expert parallelism's layout: the mesh of every device (of every process) on the model's expert axis,
the routed experts split over it along E, everything else replicated, and each batch's sequences split
over it. A process only ever holds its own devices' parts (ktjax.distributed)."""

from __future__ import annotations

import re

import jax
import numpy as np

from ktjax.config import ModelConfig
from ktjax.distributed import place
from ktjax.params import Params

P = jax.sharding.PartitionSpec


def expert_specs(params: Params, axis: str) -> dict:
    """Expert parallelism's layout of a parameter dict: the routed experts' tensors ([E, ...]: weights,
    adapters, a quantized weight's data and scales) split over mesh axis `axis` along E, the rest
    replicated."""
    return {name: P(axis) if ".experts." in name else P() for name in params}


def expert_mesh(cfg: ModelConfig, batch_sizes: dict[str, int]) -> jax.sharding.Mesh | None:
    """The mesh of expert parallelism: every device (of every process) on cfg.expert_axis, or None (no
    expert_axis, or one device). Checks that the experts split evenly over the devices, and each named
    batch size (e.g. {"batch_size / micro_batches": 16}) too."""
    axis, devices = cfg.expert_axis, jax.device_count()
    if not axis or devices == 1:
        if jax.process_count() > 1:
            raise ValueError(
                "several processes train with their experts split over them: set model.expert_axis "
                "(e.g. --set model.expert_axis=expert)"
            )
        return None
    if cfg.num_experts % devices:
        raise ValueError(
            f"expert_axis {axis!r}: {cfg.num_experts} routed experts do not split over {devices} devices"
        )
    for name, size in batch_sizes.items():
        if size % devices:
            raise ValueError(f"expert_axis {axis!r}: {name} = {size} does not split over {devices} devices")
    return jax.make_mesh((devices,), (axis,))


def param_shardings(params: Params, mesh: jax.sharding.Mesh) -> dict:
    """Each parameter's NamedSharding on `mesh` (expert_specs)."""
    specs = expert_specs(params, mesh.axis_names[0])
    return {n: jax.sharding.NamedSharding(mesh, s) for n, s in specs.items()}


def experts_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The layout of a routed experts' tensor [E, ...] on `mesh`: split along E."""
    return jax.sharding.NamedSharding(mesh, P(mesh.axis_names[0]))


def local_experts(sharding: jax.sharding.Sharding, num_experts: int) -> range:
    """The routed experts this process holds under `sharding` (experts_sharding): consecutive ids."""
    rows = sorted(
        {
            i[0].indices(num_experts)[:2]
            for i in sharding.addressable_devices_indices_map((num_experts,)).values()
        }
    )
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's experts are not consecutive: {rows}")
    return range(start, stop)


def global_from_local(
    sharding: jax.sharding.Sharding, local: np.ndarray, shape: tuple[int, ...]
) -> jax.Array:
    """A global [E, ...] array laid out by `sharding` (experts_sharding), from this process's experts
    (local_experts) alone."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(shape))


def place_params(params: Params, mesh: jax.sharding.Mesh) -> Params:
    """Parameters held in whole by every process, laid out on `mesh` (each process keeps its parts)."""
    shardings = param_shardings(params, mesh)
    return {n: jax.tree.map(lambda a, s=shardings[n]: _place(a, s), v) for n, v in params.items()}


def _place(a, sharding: jax.sharding.NamedSharding) -> jax.Array:
    """Array `a` laid out by `sharding`: as it is when it already is; a replicated array from this
    process's own buffer; else each process copying its part."""
    if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(sharding, a.ndim):
        return a
    if isinstance(a, jax.Array) and not a.is_fully_addressable:  # laid out otherwise over processes
        return jax.device_put(a, sharding)
    if isinstance(a, jax.Array) and sharding.is_fully_replicated:  # this process's copy, not another
        parts = [a if a.devices() == {d} else jax.device_put(a, d) for d in sharding.addressable_devices]
        return jax.make_array_from_single_device_arrays(a.shape, sharding, parts)
    return place(np.asarray(a), sharding)


def onto_mesh(tree, mesh: jax.sharding.Mesh):
    """`tree` with every array laid out on `mesh`: those already on it as they are, the others (held in
    whole by every process: the optimizer's step counters) replicated over it."""
    replicated = jax.sharding.NamedSharding(mesh, P())

    def leaf(a):
        if isinstance(a, jax.Array) and isinstance(a.sharding, jax.sharding.NamedSharding):
            if a.sharding.mesh == mesh:
                return a
        return _place(a, replicated)

    return jax.tree.map(leaf, tree)


def shard_batch(batch: dict, mesh: jax.sharding.Mesh, micro_batches: int = 1) -> dict:
    """The batch's sequences split over the mesh's axis so that each micro-batch is the one a single
    device would take (its sequences spread over the shards): shard s holds, micro-batch by micro-batch,
    its share of each, which its step splits again in order. Every process passes the whole batch and
    keeps its devices' rows."""
    shards = mesh.devices.size

    def order(a: np.ndarray) -> np.ndarray:  # [B, ...]: micro-batch m's rows, shard s's part of them
        parts = a.reshape(micro_batches, shards, a.shape[0] // (micro_batches * shards), *a.shape[1:])
        return np.swapaxes(parts, 0, 1).reshape(a.shape)

    sharding = jax.sharding.NamedSharding(mesh, P(mesh.axis_names[0]))
    return {k: place(order(np.asarray(v)), sharding) for k, v in batch.items()}


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4}
_HLO_BYTES.update({"u32": 4, "f64": 8, "s64": 8, "u64": 8})


def all_to_all_bytes(hlo: str) -> int:
    """Bytes of the results of every all-to-all in a compiled (per-device) HLO module's text, each
    counted once (an all-to-all inside a loop runs once per iteration)."""
    total = 0
    for line in hlo.splitlines():
        if " all-to-all(" not in line or "=" not in line:
            continue
        result = line.split("=", 1)[1].split(" all-to-all(", 1)[0]
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", result):
            total += _HLO_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total
