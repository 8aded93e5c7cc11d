"""orbax checkpoints of a training run: trainable parameters, optimizer state, step, RNG seed and data
position every N steps (async); frozen parameters once, in their own directory.

    workdir/checkpoints/steps/<step>/{trainable, opt_state, meta}
    workdir/checkpoints/frozen/
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from ktjax.params import Params


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def check_compatible(what: str, saved: dict[str, Any], target: Params) -> None:
    """Raises ValueError naming the first parameter whose presence, shape or dtype differs."""
    missing = sorted(set(target) - set(saved))
    if missing:
        raise ValueError(
            f"{what}: parameter {missing[0]!r} is not in the checkpoint ({len(missing)} missing)"
        )
    extra = sorted(set(saved) - set(target))
    if extra:
        raise ValueError(f"{what}: the checkpoint has parameter {extra[0]!r}, which the model does not")
    for name, value in target.items():
        meta = saved[name]
        if tuple(meta.shape) != tuple(value.shape):
            raise ValueError(
                f"{what}: parameter {name!r} has shape {tuple(meta.shape)} in the checkpoint but "
                f"{tuple(value.shape)} in the model"
            )
        if jax.numpy.dtype(meta.dtype) != jax.numpy.dtype(value.dtype):
            raise ValueError(
                f"{what}: parameter {name!r} is {meta.dtype} in the checkpoint but {value.dtype} in the model"
            )


class Checkpoints:
    """Save and restore one run's state. `max_to_keep` step checkpoints are kept."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory / "steps",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save
            ),
            item_handlers={
                "trainable": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def frozen_path(self) -> pathlib.Path:
        return self.directory / "frozen"

    def save_frozen(self, frozen: Params) -> None:
        """Saves the frozen parameters once (they never change during the run)."""
        if self.frozen_path.exists() or not frozen:
            return
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self.frozen_path, frozen)

    def restore_frozen(self, like: Params) -> Params:
        if not like:
            return {}
        with ocp.StandardCheckpointer() as ckptr:
            check_compatible("frozen parameters", ckptr.metadata(self.frozen_path).item_metadata.tree, like)
            return ckptr.restore(self.frozen_path, _abstract(like))

    def save(self, step: int, trainable: Params, opt_state: Any, meta: dict) -> None:
        """Starts an async save of step `step`; `meta` is JSON (step, seed, data position, ...)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, trainable_like: Params, opt_state_like: Any) -> tuple[Params, Any, dict]:
        """Restores step `step` into the structure of the given (abstract or concrete) targets."""
        saved = self.manager.item_metadata(step)["trainable"].tree
        check_compatible(f"checkpoint step {step}", saved, trainable_like)
        r = self.manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(_abstract(trainable_like)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return r["trainable"], r["opt_state"], r["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
