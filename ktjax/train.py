"""The training loop: jit-compiled step with micro-batch gradient accumulation in f32, hybrid
full/LoRA/frozen optimizer, metrics (jsonl), periodic eval, progress bar, orbax checkpoints/resume."""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from ktjax.checkpoint import Checkpoints, Restored
from ktjax.config import ModelConfig
from ktjax.data import Batch
from ktjax.distributed import is_main, to_host
from ktjax.files import write_atomically
from ktjax.optim import (
    HYBRID_RULES,
    GroupConfig,
    init_optimizer_state,
    label_params,
    make_optimizer,
    parameter_summary,
    split_trainable,
)
from ktjax.params import ModelDef, Params, merge_model, split_model
from ktjax.sharding import expert_mesh, expert_specs, onto_mesh, place_params, shard_batch


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32  # sequences per optimizer step
    micro_batches: int = 1  # the batch is split into this many micro-batches; gradients summed in f32
    # tokens whose logits exist at once in the loss ([rows, V] f32; the backward computes them again):
    # 0 = all while they fit LOSS_CHUNK_BYTES (256 MiB: 441 tokens of Qwen3's 151936-token vocabulary)
    loss_chunk: int = 0
    aux_loss_coef: float = 0.01  # weight of the router load-balancing loss
    clip_norm: float = 1.0  # global gradient-norm clip (0: off)
    log_every: int = 10
    eval_every: int = 100  # 0: only at the start and the end
    eval_batch_size: int = 256
    checkpoint_every: int = 100  # 0: only at the end; -1: never (a run too large to save, no resume)
    keep_checkpoints: int = 2
    seed: int = 0
    rules: tuple[tuple[str, str], ...] = HYBRID_RULES  # parameter name pattern -> full | lora | frozen
    groups: dict[str, GroupConfig] = field(
        default_factory=lambda: {"full": GroupConfig(lr_peak=3e-3), "lora": GroupConfig(lr_peak=3e-3)}
    )
    progress: bool = True  # show a progress bar
    # A step whose loss or gradient norm is NaN or infinite: "stop" raises TrainingStopped naming the
    # step; "skip" leaves the parameters and optimizer state as they were and counts it (skipped_steps).
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        if self.checkpoint_every < -1:
            raise ValueError(
                "checkpoint_every must be -1 (never), 0 (at the end) or a step count, "
                f"got {self.checkpoint_every}"
            )
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0: automatic), got {self.loss_chunk}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")


class TrainingStopped(RuntimeError):
    """Training stopped at a step whose loss or gradient norm was not finite."""


@dataclass
class TrainResult:
    params: Params  # all parameters after training (trainable and frozen)
    defn: ModelDef  # the model without its parameters: merge_model(defn, params) rebuilds it
    labels: dict[str, str]
    history: list[dict]  # one record per logged step
    evals: list[dict]  # one record per eval


def masked_cross_entropy_sum(logits: jax.Array, batch: Batch) -> jax.Array:
    """Sum over trained targets of -log p(target). logits: [B, S, V] f32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["loss_mask"])


LOSS_CHUNK_BYTES = 256 * 2**20  # f32 logits above this are taken in chunks (TrainConfig.loss_chunk = 0)


def loss_chunk_rows(vocab_size: int, tokens: int, loss_chunk: int = 0) -> int:
    """Tokens a chunk of the training loss over `tokens` tokens: `loss_chunk`, or for 0 all of them
    while their f32 logits [tokens, vocab_size] fit LOSS_CHUNK_BYTES, else the largest power of two (at
    least 256, so that a chunk's product amortises reading the output projection) whose logits fit."""
    if loss_chunk:
        return loss_chunk
    if tokens * vocab_size * 4 <= LOSS_CHUNK_BYTES:
        return tokens
    rows = 256
    while rows * 2 * vocab_size * 4 <= LOSS_CHUNK_BYTES:
        rows *= 2
    return rows


def loss_sum(model: nnx.Module, batch: Batch, loss_chunk: int = 0) -> tuple[jax.Array, dict]:
    """(sum over trained targets of -log p(target), router statistics) of `model` (merge_model's) on
    `batch` ([B, S] arrays). The logits [B, S, V] f32 at once when loss_chunk_rows(V, B S, loss_chunk)
    covers every token, else that many tokens at a time (MoeForCausalLM.cross_entropy_sum, whose
    backward computes them again)."""
    x, aux = model.hidden(batch["input_ids"], batch["segment_ids"], batch["positions"])
    tokens = x.shape[0] * x.shape[1]
    rows = loss_chunk_rows(model.config.vocab_size, tokens, loss_chunk)
    if rows >= tokens:
        return masked_cross_entropy_sum(model.logits(x), batch), aux
    return model.cross_entropy_sum(x, batch["targets"], batch["loss_mask"], rows), aux


def make_train_step(
    defn: ModelDef, tx: optax.GradientTransformation, cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None
) -> Callable:
    """The jitted step's function. With `mesh` (one axis, the model's expert_axis), the gradients are
    computed inside ``jax.shard_map``: each shard its share of the batch and of the routed experts, the
    loss normalised by the whole batch's targets; the optimizer then updates the sharded arrays."""
    n_micro = cfg.micro_batches
    axis = mesh.axis_names[0] if mesh is not None else ""

    def total(a: jax.Array) -> jax.Array:  # over every shard's batch
        return jax.lax.psum(a, axis) if axis else a

    def gradients(trainable: Params, frozen: Params, batch: Batch):
        shards = jax.lax.axis_size(axis) if axis else 1
        n_targets = jnp.maximum(total(jnp.sum(batch["loss_mask"])), 1.0)
        micro = jax.tree.map(lambda a: a.reshape(n_micro, a.shape[0] // n_micro, *a.shape[1:]), batch)

        def micro_loss(trainable: Params, mb: Batch):
            ce_sum, aux = loss_sum(merge_model(defn, {**trainable, **frozen}), mb, cfg.loss_chunk)
            # Normalised by the whole batch's targets: micro-batch gradients then sum to the batch gradient.
            # Split over shards, every shard's loss holds the whole load-balancing loss (its statistics
            # are summed over the shards) and the shards' gradients of it add up: a share of it each.
            loss = ce_sum / n_targets + cfg.aux_loss_coef * aux["load_balance_loss"] / (n_micro * shards)
            return loss, (ce_sum, aux)

        def accumulate(carry, mb):
            grads_acc, ce_acc, lb_acc, load_acc = carry
            (_, (ce_sum, aux)), grads = jax.value_and_grad(micro_loss, has_aux=True)(trainable, mb)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (
                grads_acc,
                ce_acc + ce_sum,
                lb_acc + aux["load_balance_loss"],
                jnp.maximum(load_acc, aux["max_load"]),
            ), None

        # The scan's carry has its updates' types: inside shard_map the split parameters' gradients
        # (expert_specs) and the cross-entropy sum differ from shard to shard (the other gradients and
        # statistics are summed).
        def varying(a: jax.Array, split: bool = True) -> jax.Array:
            return jax.lax.pcast(a, (axis,), to="varying") if axis and split else a

        split = {n: spec != jax.sharding.PartitionSpec() for n, spec in expert_specs(trainable, axis).items()}
        zeros = {
            n: jax.tree.map(lambda p, n=n: varying(jnp.zeros(p.shape, jnp.float32), split[n]), v)
            for n, v in trainable.items()
        }
        init = (zeros, varying(jnp.zeros(())), jnp.zeros(()), jnp.zeros(()))
        (grads, ce_sum, lb_sum, max_load), _ = jax.lax.scan(accumulate, init, micro)
        return grads, total(ce_sum), lb_sum, max_load, n_targets

    def step(trainable: Params, opt_state: Any, frozen: Params, batch: Batch):
        grads_of = gradients
        if mesh is not None:
            P = jax.sharding.PartitionSpec
            specs = expert_specs(trainable, axis)
            grads_of = jax.shard_map(
                gradients,
                mesh=mesh,
                in_specs=(specs, expert_specs(frozen, axis), P(axis)),
                out_specs=(specs, P(), P(), P(), P()),
            )
        grads, ce_sum, lb_sum, max_load, n_targets = grads_of(trainable, frozen, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(ce_sum) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        if cfg.on_nonfinite == "skip":
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_trainable = jax.tree.map(keep, new_trainable, trainable)
            new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = {
            "loss": ce_sum / n_targets,
            "load_balance_loss": lb_sum / n_micro,
            "max_expert_load": max_load,
            "grad_norm": grad_norm,
            "finite": finite,
        }
        return new_trainable, new_opt_state, metrics

    return step


def make_eval_step(defn: ModelDef, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """(params, batch) -> (mean cross-entropy over the batch's targets, logits [B, S, V] f32), to jit.
    With `mesh` the model runs inside ``jax.shard_map`` as the train step's does (the batch's sequences
    and the routed experts split over the mesh's axis): pass the batch through shard_batch; the
    logits come back split the same way (to_host gathers them)."""
    axis = mesh.axis_names[0] if mesh is not None else ""

    def evaluate(params: Params, batch: Batch):
        logits = merge_model(defn, params)(batch["input_ids"], batch["segment_ids"], batch["positions"])
        ce, n = masked_cross_entropy_sum(logits, batch), jnp.sum(batch["loss_mask"])
        if axis:
            ce, n = jax.lax.psum(ce, axis), jax.lax.psum(n, axis)
        return ce / jnp.maximum(n, 1.0), logits

    if mesh is None:
        return evaluate

    def sharded(params: Params, batch: Batch):
        P = jax.sharding.PartitionSpec
        specs = expert_specs(params, axis)
        return jax.shard_map(evaluate, mesh=mesh, in_specs=(specs, P(axis)), out_specs=(P(), P(axis)))(
            params, batch
        )

    return sharded


def evaluator(defn: ModelDef, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """The jitted eval step as (params, batch of host arrays) -> (loss: float, logits: np.ndarray): with
    a mesh the batch is split over it and the logits gathered (on every process: call it on all)."""
    step = jax.jit(make_eval_step(defn, mesh))

    def run(params: Params, batch: Batch) -> tuple[float, np.ndarray]:
        loss, logits = step(params, shard_batch(batch, mesh) if mesh is not None else batch)
        return float(loss), to_host(logits)

    return run


def _to_float(tree: dict) -> dict:
    return {k: float(v) for k, v in tree.items()}


def _nonfinite_message(step: int, metrics: dict, ckpt: Checkpoints) -> str:
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(float(metrics[k]))]
    what = " and ".join(f"the {k.replace('_', ' ')} is {float(metrics[k])}" for k in bad)
    steps = ckpt.steps()
    last = (
        f"the last checkpoint is step {steps[-1]} in {ckpt.directory}" if steps else "no checkpoint was saved"
    )
    return (
        f"step {step}: {what}; training stopped ({last}). Lower the learning rate, or set "
        f"train.on_nonfinite=skip to skip such steps"
    )


def train(
    model: nnx.Module,
    data: Any,
    cfg: TrainConfig,
    workdir: str | pathlib.Path,
    *,
    resume: bool = False,
    eval_metrics: Callable[[np.ndarray, Batch], dict] | None = None,
    stop_after: int | None = None,
    keep_model: bool = True,
) -> TrainResult:
    """Trains `model` on `data` (an object with ``batch(step, batch_size)`` and
    ``eval_batch(batch_size)``) for cfg.steps steps, logging to workdir/metrics.jsonl and saving
    checkpoints under workdir/checkpoints. With `resume`, continues from the newest checkpoint that
    verifies (the log is cut back to it). `eval_metrics(logits, batch)` adds task metrics to each eval.
    `stop_after` ends the run early after that many steps (as if interrupted), after checkpointing.
    Raises TrainingStopped on a non-finite step (cfg.on_nonfinite="stop") and CheckpointError when a
    checkpoint cannot be saved. With `keep_model=False` the first step takes over the memory of the
    model's trainable parameters (in full mode, one copy of the model less) and `model` is unusable
    afterwards: use the result's params. A model whose config names an expert_axis trains with its routed
    experts split over every device JAX sees (expert_mesh; one device: as without)."""
    if cfg.batch_size % cfg.micro_batches:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by micro_batches {cfg.micro_batches}")
    workdir = pathlib.Path(workdir)
    main = is_main()
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
    defn, params = split_model(model)
    mesh = training_mesh(model.config, cfg) if hasattr(model, "config") else None
    if mesh is not None:  # the routed experts split over the devices, the rest replicated
        params = place_params(params, mesh)
    labels, trainable, frozen, tx, opt_state = _initial_state(params, cfg)
    if mesh is not None:
        opt_state = onto_mesh(opt_state, mesh)
    if keep_model:  # the step donates its trainable buffers: copy them once, for the caller's model
        trainable = jax.tree.map(jnp.copy, trainable)
    print(parameter_summary(params, labels))
    # Closing the checkpointer on any error keeps a pending save from outliving it (or printing its own).
    shards = mesh.devices.size if mesh is not None else 1
    with Checkpoints(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints, expert_shards=shards) as ckpt:
        restored: Restored | None = ckpt.restore_latest(trainable, opt_state, frozen) if resume else None
        start, skipped = 0, 0
        if restored is not None:
            if restored.meta["data_seed"] != cfg.seed:
                raise ValueError(
                    f"checkpoint was trained with seed {restored.meta['data_seed']}, config says {cfg.seed}"
                )
            start, skipped = restored.step, restored.meta.get("skipped_steps", 0)
            trainable, opt_state, frozen = restored.trainable, restored.opt_state, restored.frozen
            print(f"resumed from step {start} ({ckpt.directory})")
            if start >= cfg.steps:
                print(
                    f"this run already trained its {cfg.steps} steps: nothing more to train; to continue it, "
                    f"resume with a larger step count, e.g. --set train.steps={2 * start}"
                )
        elif cfg.checkpoint_every >= 0:  # frozen parameters are saved once, when a run starts
            ckpt.start_fresh(frozen)
        history, evals = _load_logs(workdir, start, rewrite=main) if start else ([], [])

        train_step = jax.jit(make_train_step(defn, tx, cfg, mesh), donate_argnums=(0, 1))
        eval_step = evaluator(defn, mesh)
        eval_batch = data.eval_batch(cfg.eval_batch_size)
        log_file = (workdir / "metrics.jsonl").open("a" if start else "w") if main else None

        def log(record: dict) -> None:
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()

        def run_eval(step: int) -> None:
            loss, logits = eval_step({**trainable, **frozen}, eval_batch)
            record = {"step": step, "eval_loss": loss}
            if eval_metrics is not None:
                record.update(eval_metrics(logits, eval_batch))
            evals.append(record)
            log({"kind": "eval", **record})

        def save(step: int) -> None:
            meta = {"step": step, "data_seed": cfg.seed, "data_position": step, "skipped_steps": skipped}
            ckpt.save(step, trainable, opt_state, meta)

        if start == 0:
            run_eval(0)
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            disable=not (cfg.progress and main),
            desc="train",
            unit="step",
            mininterval=1.0,
        )
        tick, tokens = time.perf_counter(), 0
        try:
            for step in range(start + 1, end + 1):
                batch = data.batch(step - 1, cfg.batch_size)
                tokens += int((batch["segment_ids"] > 0).sum())
                if mesh is not None:
                    batch = shard_batch(batch, mesh, cfg.micro_batches)
                trainable, opt_state, metrics = train_step(trainable, opt_state, frozen, batch)
                finite = bool(metrics.pop("finite"))
                skipped += not finite
                if step % cfg.log_every == 0 or step == end or not finite:
                    record = {"step": step, **_to_float(metrics), "skipped_steps": skipped}
                    now = time.perf_counter()
                    record["tokens_per_s"] = tokens / (now - tick)
                    tick, tokens = now, 0
                    history.append(record)
                    log({"kind": "train", **record})
                    postfix = {"loss": f"{record['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
                    bar.set_postfix(postfix, refresh=False)
                if not finite and cfg.on_nonfinite == "stop":
                    raise TrainingStopped(_nonfinite_message(step, metrics, ckpt))
                ckpt.check_for_errors()
                bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    run_eval(step)
                due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end
                if due and cfg.checkpoint_every >= 0:
                    save(step)
        finally:
            bar.close()
        if end == cfg.steps and (not evals or evals[-1]["step"] != cfg.steps):
            run_eval(cfg.steps)
        ckpt.wait()
        if log_file is not None:
            log_file.close()
        return TrainResult(
            params={**trainable, **frozen}, defn=defn, labels=labels, history=history, evals=evals
        )


def training_mesh(model: ModelConfig, cfg: TrainConfig) -> jax.sharding.Mesh | None:
    """The expert mesh (ktjax.sharding.expert_mesh) a run of `model` with `cfg` trains on, checked
    against the run's batch sizes: each micro-batch and the eval batch split over its devices."""
    sizes = {
        "train.batch_size / micro_batches": cfg.batch_size // cfg.micro_batches,
        "train.eval_batch_size": cfg.eval_batch_size,
    }
    return expert_mesh(model, sizes)


def _initial_state(params: Params, cfg: TrainConfig) -> tuple:
    """(labels, trainable, frozen, optimizer, optimizer state) of a run starting from `params`."""
    labels = label_params(params, cfg.rules)
    trainable, frozen = split_trainable(params, labels)
    if not trainable:
        raise ValueError("no parameter is trainable under the rules: every label is 'frozen'")
    tx = make_optimizer(labels, cfg.groups, cfg.steps, cfg.clip_norm or None)
    return labels, trainable, frozen, tx, init_optimizer_state(tx, trainable)


def load_trained(model: nnx.Module, cfg: TrainConfig, workdir: str | pathlib.Path) -> tuple[nnx.Module, int]:
    """`model` (built as the run in `workdir` built it) with the parameters of that run's newest
    checkpoint that verifies -> (the trained model, its step). Raises FileNotFoundError when the run
    has no usable checkpoint."""
    defn, params = split_model(model)
    _, trainable, frozen, _, opt_state = _initial_state(params, cfg)
    directory = pathlib.Path(workdir) / "checkpoints"
    with Checkpoints(directory, max_to_keep=cfg.keep_checkpoints) as ckpt:
        restored = ckpt.restore_latest(trainable, opt_state, frozen) if directory.is_dir() else None
    if restored is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint to load (looked in {directory})")
    return merge_model(defn, {**restored.trainable, **restored.frozen}), restored.step


def _load_logs(workdir: pathlib.Path, upto: int, rewrite: bool = True) -> tuple[list[dict], list[dict]]:
    """Train and eval records logged up to step `upto`; later ones (from an interrupted run past its
    last checkpoint) are dropped from the file too (with `rewrite`: by one process only), so the log
    matches the resumed state. A last line torn by a kill is dropped; any other line that is not a record
    is an error naming it."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return [], []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError as e:
            if n == len(lines):
                break  # torn by a kill while it was written
            raise ValueError(f"{path}:{n}: not a metrics record ({e}): {line[:80]!r}") from None
        records.append(record)
    kept = [r for r in records if r["step"] <= upto]
    if rewrite:
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    strip = lambda r: {k: v for k, v in r.items() if k != "kind"}  # noqa: E731
    return [strip(r) for r in kept if r["kind"] == "train"], [strip(r) for r in kept if r["kind"] == "eval"]
