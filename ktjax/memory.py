"""What a training run must hold in host memory, part by part, beside what it held at its peak.

    parameters         every parameter, in its dtype (trainable and frozen)
    gradients (f32)    one float32 gradient per trainable parameter (the step's accumulator)
    optimizer state    the optimizer's state (Adam: two moments per trainable parameter)
    activations        the temporaries of the model's compiled forward + backward alone: what is kept
                       for the backward and the backward's own intermediates (XLA's buffer assignment)
    kernel scratch     the expert kernels' scratch pool at its largest (ktjax.ffi.kernel_counters)
    runtime            the process before the model exists: Python, jaxlib, XLA's CPU client

Their sum is what the run must hold. Beside it: the compiled train step's temporaries (activations,
gradients and the optimizer's intermediates, as XLA assigned them) and the measured peak resident set.
"""

from __future__ import annotations

import resource
from typing import Any

import jax
import numpy as np

from ktjax import ffi
from ktjax.data import Batch
from ktjax.optim import init_optimizer_state, make_optimizer, split_trainable
from ktjax.params import ModelDef, Params, merge_model
from ktjax.train import TrainConfig, loss_sum, make_train_step

GIB = 2**30


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def current_rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's largest resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _temporaries(fn: Any, *args: Any) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes) if analysis is not None else 0


def training_memory(
    defn: ModelDef, labels: dict[str, str], params: Params, cfg: TrainConfig, batch: Batch, runtime: int
) -> dict[str, int]:
    """Bytes of each part (module docstring) for training `params` with `cfg` on batches like `batch`
    ([B, S] arrays); `runtime`: current_rss_bytes() before the model was built. Compiles the step
    again from shapes alone (allocates no arrays)."""
    peak = peak_rss_bytes()  # before compiling anything here
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    trainable, frozen = split_trainable(shapes, labels)
    tx = make_optimizer(labels, cfg.groups, cfg.steps, cfg.clip_norm or None)
    opt_state = jax.eval_shape(lambda t: init_optimizer_state(tx, t), trainable)

    def loss(trainable: Params, frozen: Params, batch: Batch) -> jax.Array:
        return loss_sum(merge_model(defn, {**trainable, **frozen}), batch, cfg.loss_chunk)[0]

    micro = jax.tree.map(lambda a: a[: a.shape[0] // cfg.micro_batches], batch)
    parts = {
        "parameters": tree_bytes(shapes),
        "gradients (f32)": sum(int(np.prod(v.shape)) * 4 for v in trainable.values()),
        "optimizer state": tree_bytes(opt_state),
        "activations": _temporaries(jax.grad(loss), trainable, frozen, micro),
        "kernel scratch": int(ffi.kernel_counters().get("scratch_peak_bytes", 0)),
        "runtime": runtime,
    }
    parts["sum"] = sum(parts.values())
    parts["train step temporaries"] = _temporaries(
        make_train_step(defn, tx, cfg), trainable, opt_state, frozen, batch
    )
    parts["measured peak RSS"] = peak
    return parts


def format_memory(parts: dict[str, int]) -> str:
    """One line per part in GiB, and the peak as a multiple of the sum."""
    lines = [f"  {name:<24}{value / GIB:>8.2f} GiB" for name, value in parts.items()]
    lines.append(f"  {'peak / sum':<24}{parts['measured peak RSS'] / parts['sum']:>8.2f} x")
    return "\n".join(lines)
