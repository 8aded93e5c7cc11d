"""orbax checkpoints of a training run, verified before they are trusted.

    workdir/checkpoints/steps/<step>/{trainable, opt_state, meta}   every N steps (async)
    workdir/checkpoints/frozen/                                     frozen parameters, once
    workdir/checkpoints/rejected/step_<step>/                       checkpoints that failed verification

Every save records a CRC-32 of each array's bytes (trainable, optimizer state, frozen) in the step's
`meta`; restoring recomputes them on what was read. Resuming walks back from the newest step to the
newest one that restores and verifies, saying which it skipped and why, and moves the bad ones to
`rejected/` (kept on disk, out of the way of later saves). Non-finite parameters are never saved.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import sys
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ktjax.distributed import is_main, sync
from ktjax.params import Params


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or the run's frozen parameters could not be trusted."""


class _Unusable(Exception):
    """This step's checkpoint cannot be restored or fails verification (the message says why)."""


@dataclass
class Restored:
    step: int
    trainable: Params
    opt_state: Any
    frozen: Params
    meta: dict


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))


def _owned_shards(a: Any) -> list[tuple[int, np.ndarray | None]]:
    """The distinct parts of a (possibly sharded) array in the order of their indices, as (owner's process,
    the part's bytes where this process owns it, else None); a host array is one part of process 0."""
    if not isinstance(a, jax.Array):
        return [(0, np.asarray(a))]
    parts: dict[tuple, tuple[int, Any]] = {}
    for device, index in a.sharding.devices_indices_map(a.shape).items():
        key = tuple((i.start, i.stop) for i in index)
        if key not in parts or device.id < parts[key][1].id:
            parts[key] = (device.process_index, device)
    local = {s.device: s for s in a.addressable_shards}
    owned = []
    for key in sorted(parts):
        process, device = parts[key]
        owned.append((process, np.asarray(local[device].data) if device in local else None))
    return owned


def _per_part(tree: Any, fn) -> dict[str, list]:
    """fn(part) -> int in [0, 2^32) of every distinct part of every leaf of `tree`, keyed by the leaf's
    path in `tree` (e.g. "['layers.0.attn.q_proj']"): each process computes its own parts', and with
    several processes they exchange them, so that every process returns the same."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names, values, owners = [], [], []
    me = jax.process_index()
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        for process, part in _owned_shards(leaf):
            names.append(name)
            owners.append(process)
            values.append(fn(part) if process == me and part is not None else 0)
    values = np.asarray(values, np.uint32)  # (JAX without x64 exchanges 32-bit integers)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(values))  # [processes, parts]
        values = every[np.asarray(owners, np.int64), np.arange(len(values))] if len(values) else values
    result: dict[str, list] = {}
    for name, value in zip(names, values.tolist()):
        result.setdefault(name, []).append(value)
    return result


def checksums(tree: Any) -> dict[str, int | list[int]]:
    """CRC-32 of every leaf's bytes, keyed by its path in `tree` (e.g. "['layers.0.attn.q_proj']"): one
    number for a leaf held in one piece, a list (one per distinct part, in index order) for a
    leaf split over devices (expert parallelism); the same on every process."""
    return {name: v[0] if len(v) == 1 else v for name, v in _per_part(tree, _crc).items()}


def first_nonfinite(tree: Any) -> str | None:
    """The path of the first floating-point leaf holding a NaN or an infinity, else None (the same on
    every process)."""

    def bad(a: np.ndarray) -> int:
        return int(jax.numpy.issubdtype(a.dtype, jax.numpy.floating) and not np.isfinite(a).all())

    return next((name for name, flags in _per_part(tree, bad).items() if any(flags)), None)


def _verify(what: str, tree: Any, expected: dict[str, int | list[int]]) -> None:
    """Raises _Unusable naming the first leaf whose checksums differ from `expected`. A leaf saved in
    parts (a list) and read whole, by one process, is compared part by part: the parts of expert
    parallelism are its equal slices along the first axis."""
    got = checksums(tree)
    leaves = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for name, crc in expected.items():
        mine = got.get(name)
        if isinstance(crc, list) and not isinstance(mine, list) and name in leaves:
            mine = [_crc(part) for part in np.split(np.asarray(leaves[name]), len(crc))]
        if mine != crc:
            raise _Unusable(f"{what} {name} does not match its checksum")


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
        # A quantized weight (ktjax.quant) is two arrays, data and scales: compared one by one.
        metas, values = jax.tree.leaves(saved[name]), jax.tree.leaves(value)
        if len(metas) != len(values):
            raise ValueError(
                f"{what}: parameter {name!r} is {len(metas)} arrays in the checkpoint but {len(values)} in "
                "the model (a quantized weight is two)"
            )
        for meta, leaf in zip(metas, values):
            if tuple(meta.shape) != tuple(leaf.shape):
                raise ValueError(
                    f"{what}: parameter {name!r} has shape {tuple(meta.shape)} in the checkpoint but "
                    f"{tuple(leaf.shape)} in the model"
                )
            if jax.numpy.dtype(meta.dtype) != jax.numpy.dtype(leaf.dtype):
                raise ValueError(
                    f"{what}: parameter {name!r} is {meta.dtype} in the checkpoint but {leaf.dtype} "
                    "in the model"
                )


def _reason(err: BaseException) -> str:
    """The first line of an exception's message, short enough for one log line."""
    text = str(err).strip().splitlines()
    first = (text[0] if text else "").split(" See full TensorStore details")[0]  # a whole spec follows
    return f"{type(err).__name__}: {first[:240]}"


class _OrbaxErrors(logging.Filter):
    """Keeps what orbax logs about a failed write (one record per array and thread: hundreds of lines
    for one full disk) off the terminal; the run reports the failure once, as a CheckpointError
    quoting the first of them."""

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or record.name not in ("absl", "asyncio"):
            return True
        if self.first is None:
            exc = record.exc_info[1] if record.exc_info else None
            self.first = _reason(exc) if exc is not None else record.getMessage()[:240]
        return False


def _orbax_errors() -> _OrbaxErrors:
    """The process's one _OrbaxErrors filter, installed on the loggers orbax and asyncio use."""
    for f in logging.getLogger("absl").filters:
        if isinstance(f, _OrbaxErrors):
            return f
    errors = _OrbaxErrors()
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(errors)
    return errors


def _loop_closed(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _quiet_stragglers() -> None:
    """After a failed save, orbax's remaining writes finish after their event loop closed and each
    reports "Event loop is closed" as the process exits (dozens of tracebacks): through
    sys.unraisablehook, or through sys.excepthook where a native thread's callback prints its error
    (tensorstore's, with no header). Its writes never started warn that they were never awaited.
    Those, and only those, are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "ktjax_quiet", False):
        return

    def hook(unraisable) -> None:
        if not _loop_closed(unraisable.exc_value):
            previous(unraisable)

    previous_except = sys.excepthook

    def excepthook(kind, value, tb) -> None:
        if not _loop_closed(value):
            previous_except(kind, value, tb)

    hook.ktjax_quiet = True
    sys.unraisablehook = hook
    sys.excepthook = excepthook
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


# orbax copies the arrays an async save writes (the step donates their buffers next) and, unthrottled,
# copies all of them at once: a full-mode checkpoint would briefly double the state in host memory. At
# most this many GB of one item (trainable parameters, optimizer state, frozen parameters) are in
# flight at a time.
SAVE_CONCURRENT_GB = 1


def _handler() -> ocp.StandardCheckpointHandler:
    return ocp.StandardCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB)


class Checkpoints:
    """Save and restore one run's state. `max_to_keep` step checkpoints are kept."""

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        expert_shards: int = 1,
    ):
        """`expert_shards`: the devices the routed experts are split over (expert parallelism), saved
        with each step: several processes resume only a checkpoint split as they split it."""
        self.directory = pathlib.Path(directory).absolute()
        self.expert_shards = expert_shards
        self.errors = _orbax_errors()
        self.frozen_checksums: dict[str, int | list[int]] = {}
        self._saving: int | None = None  # the step of the pending async save
        self.manager = ocp.CheckpointManager(
            self.directory / "steps",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # the partial saves of a killed run
            ),
            item_handlers={
                "trainable": _handler(),
                "opt_state": _handler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Closes the manager; after an error, quietly (the error is the one to report)."""
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            pass

    @property
    def frozen_path(self) -> pathlib.Path:
        return self.directory / "frozen"

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def start_fresh(self, frozen: Params) -> None:
        """Begins a run from step 0: (re)writes the frozen parameters and records their checksums."""
        if self.steps():
            raise CheckpointError(
                f"{self.directory} already holds checkpoints of steps {self.steps()}: resume the run, or "
                f"train in a new directory"
            )
        self.frozen_checksums = checksums(frozen)
        if is_main() and self.frozen_path.exists():  # from a run killed before its first step checkpoint
            shutil.rmtree(self.frozen_path)
        sync("ktjax_checkpoint_start_fresh")
        if frozen:
            with ocp.Checkpointer(_handler()) as ckptr:
                ckptr.save(self.frozen_path, args=ocp.args.StandardSave(frozen))

    def save(self, step: int, trainable: Params, opt_state: Any, meta: dict) -> None:
        """Starts an async save of step `step`; `meta` is JSON (step, seed, data position, ...). Raises
        CheckpointError if an earlier save failed or the state is not finite."""
        self.wait()
        bad = first_nonfinite(trainable) or first_nonfinite(opt_state)
        if bad is not None:
            raise CheckpointError(f"refusing to save step {step}: {bad} holds NaN or infinity")
        sums = {
            "trainable": checksums(trainable),
            "opt_state": checksums(opt_state),
            "frozen": self.frozen_checksums,
        }
        self._saving = step
        self.errors.first = None  # orbax's errors from here on are this save's
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    trainable=ocp.args.StandardSave(trainable),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave({**meta, "expert_shards": self.expert_shards, "checksums": sums}),
                ),
            )
        except Exception as e:
            raise self._failed(_reason(e)) from e

    def _failed(self, reason: str) -> CheckpointError:
        _quiet_stragglers()
        step = f"step {self._saving}" if self._saving is not None else "a checkpoint"
        self._saving = None
        return CheckpointError(
            f"saving {step} to {self.manager.directory} failed: {self.errors.first or reason}"
        )

    def check_for_errors(self) -> None:
        """Raises CheckpointError if the pending async save has failed. (orbax's finalize thread logs
        some failures rather than raising them: a save that finished without its step directory
        appearing failed.)"""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failed(_reason(e)) from e
        if self._saving is None or self.manager.is_saving_in_progress():
            return
        # Process 0 finishes the step's directory (others may see their own part done before it is).
        if is_main() and not (pathlib.Path(self.manager.directory) / str(self._saving)).is_dir():
            raise self._failed("orbax did not finish writing it")
        self._saving = None

    def restore_latest(self, trainable_like: Params, opt_state_like: Any, frozen: Params) -> Restored | None:
        """The newest step that restores and verifies, or None when there is none. Steps that fail are
        reported in one line each and moved to `rejected/`. `frozen` is the model's frozen parameters as
        built: kept when they match the checkpoint's checksums, else restored from `frozen/`."""
        for step in reversed(self.steps()):
            try:
                restored = self._restore(step, trainable_like, opt_state_like, frozen)
            except _Unusable as e:
                moved = self._set_aside(step)
                print(f"checkpoint step {step} skipped: {e}; moved to {moved}")
                continue
            self.frozen_checksums = restored.meta["checksums"]["frozen"]  # what restored.frozen matched
            return restored
        return None

    def _restore(self, step: int, trainable_like: Params, opt_state_like: Any, frozen: Params) -> Restored:
        try:
            saved = self.manager.item_metadata(step)["trainable"]
        except Exception as e:
            raise _Unusable(f"its metadata cannot be read ({_reason(e)})") from e
        if saved is None or getattr(saved, "tree", None) is None:
            raise _Unusable("its trainable parameters have no metadata")
        check_compatible(f"checkpoint step {step}", saved.tree, trainable_like)
        try:
            r = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    trainable=ocp.args.StandardRestore(_abstract(trainable_like)),
                    opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise _Unusable(f"it cannot be read ({_reason(e)})") from e
        meta = r["meta"]
        if not isinstance(meta, dict) or "checksums" not in meta:
            raise _Unusable("its meta has no checksums")
        saved_shards = meta.get("expert_shards", 1)
        if jax.process_count() > 1 and saved_shards != self.expert_shards:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds the routed experts split over "
                f"{saved_shards} devices, this run splits them over {self.expert_shards}: resume with the "
                f"processes it was saved with (one process can also read it whole)"
            )
        sums = meta["checksums"]
        _verify("trainable", r["trainable"], sums["trainable"])
        _verify("opt_state", r["opt_state"], sums["opt_state"])
        return Restored(step, r["trainable"], r["opt_state"], self._frozen(frozen, sums["frozen"]), meta)

    def _frozen(self, frozen: Params, expected: dict[str, int | list[int]]) -> Params:
        """The model's frozen parameters if they are the run's, else those saved in `frozen/`."""
        try:
            _verify("frozen", frozen, expected)
            return frozen
        except _Unusable:
            pass
        try:
            with ocp.StandardCheckpointer() as ckptr:
                saved = ckptr.metadata(self.frozen_path).item_metadata
                if saved is None or saved.tree is None:
                    raise CheckpointError(f"{self.frozen_path}: the frozen parameters have no metadata")
                check_compatible("frozen parameters", saved.tree, frozen)
                restored = ckptr.restore(self.frozen_path, _abstract(frozen))
        except (CheckpointError, ValueError):
            raise
        except Exception as e:
            raise CheckpointError(
                f"{self.frozen_path}: the frozen parameters cannot be read ({_reason(e)})"
            ) from e
        try:
            _verify("frozen", restored, expected)
        except _Unusable as e:
            raise CheckpointError(
                f"{self.frozen_path}: {e}, and the model's own frozen parameters differ from the run's: "
                f"the run cannot resume"
            ) from None
        return restored

    def _set_aside(self, step: int) -> pathlib.Path:
        source = pathlib.Path(self.manager.directory) / str(step)
        target = self.directory / "rejected" / f"step_{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / "rejected" / f"step_{step}.{n}"
        sync(f"ktjax_checkpoint_set_aside_{step}")  # every process has found it unusable: move it once
        if is_main():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), target)
        sync(f"ktjax_checkpoint_set_aside_{step}_done")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Waits for the pending async save; raises CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(_reason(e)) from e
        self.check_for_errors()

    def close(self) -> None:
        self.manager.close()
