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

from ktjax.checkpoint import Checkpoints
from ktjax.data import Batch
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


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32  # sequences per optimizer step
    micro_batches: int = 1  # the batch is split into this many micro-batches; gradients summed in f32
    aux_loss_coef: float = 0.01  # weight of the router load-balancing loss
    clip_norm: float = 1.0  # global gradient-norm clip (0: off)
    log_every: int = 10
    eval_every: int = 100  # 0: only at the start and the end
    eval_batch_size: int = 256
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    rules: tuple[tuple[str, str], ...] = HYBRID_RULES  # parameter name pattern -> full | lora | frozen
    groups: dict[str, GroupConfig] = field(
        default_factory=lambda: {"full": GroupConfig(lr_peak=3e-3), "lora": GroupConfig(lr_peak=3e-3)}
    )
    progress: bool = True  # show a progress bar


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


def make_train_step(defn: ModelDef, tx: optax.GradientTransformation, cfg: TrainConfig) -> Callable:
    n_micro = cfg.micro_batches

    def step(trainable: Params, opt_state: Any, frozen: Params, batch: Batch):
        n_targets = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        micro = jax.tree.map(lambda a: a.reshape(n_micro, a.shape[0] // n_micro, *a.shape[1:]), batch)

        def micro_loss(trainable: Params, mb: Batch):
            logits, aux = merge_model(defn, {**trainable, **frozen}).forward(
                mb["input_ids"], mb["segment_ids"], mb["positions"]
            )
            ce_sum = masked_cross_entropy_sum(logits, mb)
            # Normalised by the whole batch's targets: micro-batch gradients then sum to the batch gradient.
            loss = ce_sum / n_targets + cfg.aux_loss_coef * aux["load_balance_loss"] / n_micro
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

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (grads, ce_sum, lb_sum, max_load), _ = jax.lax.scan(accumulate, init, micro)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {
            "loss": ce_sum / n_targets,
            "load_balance_loss": lb_sum / n_micro,
            "max_expert_load": max_load,
            "grad_norm": optax.tree.norm(grads),
        }
        return trainable, opt_state, metrics

    return step


def make_eval_step(defn: ModelDef) -> Callable:
    def evaluate(params: Params, batch: Batch):
        logits = merge_model(defn, params)(batch["input_ids"], batch["segment_ids"], batch["positions"])
        n = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        return masked_cross_entropy_sum(logits, batch) / n, logits

    return evaluate


def _to_float(tree: dict) -> dict:
    return {k: float(v) for k, v in tree.items()}


def train(
    model: nnx.Module,
    data: Any,
    cfg: TrainConfig,
    workdir: str | pathlib.Path,
    *,
    resume: bool = False,
    eval_metrics: Callable[[np.ndarray, Batch], dict] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Trains `model` on `data` (an object with ``batch(step, batch_size)`` and
    ``eval_batch(batch_size)``) for cfg.steps steps, logging to workdir/metrics.jsonl and saving
    checkpoints under workdir/checkpoints. With `resume`, continues from the latest checkpoint.
    `eval_metrics(logits, batch)` adds task metrics to each eval. `stop_after` ends the run early
    after that many steps (as if interrupted), after checkpointing."""
    if cfg.batch_size % cfg.micro_batches:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by micro_batches {cfg.micro_batches}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    defn, params = split_model(model)
    labels = label_params(params, cfg.rules)
    trainable, frozen = split_trainable(params, labels)
    # The step donates its trainable buffers; copy them once so the caller's model stays usable.
    trainable = jax.tree.map(jnp.copy, trainable)
    if not trainable:
        raise ValueError("no parameter is trainable under the rules: every label is 'frozen'")
    print(parameter_summary(params, labels))
    tx = make_optimizer(labels, cfg.groups, cfg.steps, cfg.clip_norm or None)
    opt_state = init_optimizer_state(tx, trainable)
    ckpt = Checkpoints(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)
    start = 0
    if resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        trainable, opt_state, meta = ckpt.restore(start, trainable, opt_state)
        frozen = ckpt.restore_frozen(frozen)
        if meta["data_seed"] != cfg.seed:
            raise ValueError(f"checkpoint was trained with seed {meta['data_seed']}, config says {cfg.seed}")
        print(f"resumed from step {start} ({ckpt.directory})")
    else:
        ckpt.save_frozen(frozen)
    history, evals = _load_logs(workdir, start) if start else ([], [])

    train_step = jax.jit(make_train_step(defn, tx, cfg), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(defn))
    eval_batch = data.eval_batch(cfg.eval_batch_size)
    log_file = (workdir / "metrics.jsonl").open("a")

    def run_eval(step: int) -> None:
        loss, logits = eval_step({**trainable, **frozen}, eval_batch)
        record = {"step": step, "eval_loss": float(loss)}
        if eval_metrics is not None:
            record.update(eval_metrics(np.asarray(logits), eval_batch))
        evals.append(record)
        log_file.write(json.dumps({"kind": "eval", **record}) + "\n")
        log_file.flush()

    def save(step: int) -> None:
        ckpt.save(step, trainable, opt_state, {"step": step, "data_seed": cfg.seed, "data_position": step})

    if start == 0:
        run_eval(0)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(
        total=cfg.steps, initial=start, disable=not cfg.progress, desc="train", unit="step", mininterval=1.0
    )
    tick, tokens = time.perf_counter(), 0
    for step in range(start + 1, end + 1):
        batch = data.batch(step - 1, cfg.batch_size)
        tokens += int((batch["segment_ids"] > 0).sum())
        trainable, opt_state, metrics = train_step(trainable, opt_state, frozen, batch)
        if step % cfg.log_every == 0 or step == end:
            record = {"step": step, **_to_float(metrics)}
            now = time.perf_counter()
            record["tokens_per_s"] = tokens / (now - tick)
            tick, tokens = now, 0
            history.append(record)
            log_file.write(json.dumps({"kind": "train", **record}) + "\n")
            log_file.flush()
            postfix = {"loss": f"{record['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            run_eval(step)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end:
            save(step)
    bar.close()
    if end == cfg.steps and (not evals or evals[-1]["step"] != cfg.steps):
        run_eval(cfg.steps)
    ckpt.wait()
    ckpt.close()
    log_file.close()
    return TrainResult(params={**trainable, **frozen}, defn=defn, labels=labels, history=history, evals=evals)


def _load_logs(workdir: pathlib.Path, upto: int) -> tuple[list[dict], list[dict]]:
    """Train and eval records logged up to step `upto`; later ones (from an interrupted run past its
    last checkpoint) are dropped from the file too, so the log matches the resumed state."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] <= upto]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    strip = lambda r: {k: v for k, v in r.items() if k != "kind"}  # noqa: E731
    return [strip(r) for r in kept if r["kind"] == "train"], [strip(r) for r in kept if r["kind"] == "eval"]
