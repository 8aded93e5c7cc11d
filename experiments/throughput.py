"""Throughput of a larger MoE (Qwen3-30B-A3B-like layer widths, 2 layers) in hybrid training.

    python -m experiments.run throughput
    python -m experiments.run throughput --set model.param_dtype=float32 --set train.steps=10
    python -m experiments.run throughput --set model.expert_intermediates=f32   # bf16 weights default to bf16
    python -m experiments.run throughput --processes 2   # expert parallelism: half the experts each

Routed experts: H=2048, I=768, E=32, top-8, bf16 weights, LoRA r=16 on the experts (attention and
routers full). Reports tokens/s, the expert kernels' work per kind (GFLOP, from
ktjax.ffi.kernel_counters) and host memory part by part against the measured peak (ktjax.memory): a
quick look at where a real-width step spends time and memory. Over several processes: process 0's
tokens/s (of the whole batch), its peak RSS, and the bytes its step's all_to_all exchanges.
"""

from __future__ import annotations

import pathlib
import time

import jax

from ktjax import ffi
from ktjax.bench_decode import THROUGHPUT_SHAPES
from ktjax.experiment import DataConfig, ExperimentConfig, make_task, resolve
from ktjax.memory import current_rss_bytes, format_memory, peak_rss_bytes, training_memory
from ktjax.models import ModelConfig, build_model, qwen3_moe
from ktjax.ops.moe_checks import default_intermediates
from ktjax.optim import GroupConfig, init_optimizer_state, make_optimizer, split_trainable
from ktjax.sharding import all_to_all_bytes, onto_mesh, shard_batch
from ktjax.train import TrainConfig, TrainResult, make_train_step, train, training_mesh


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="throughput",
        mode="hybrid",
        model=qwen3_moe(
            **THROUGHPUT_SHAPES,
            lora_rank=16,
            lora_alpha=32.0,
            lora_targets=("experts",),
        ),
        data=DataConfig(length=32, num_values=10),  # 65 tokens per sequence
        train=TrainConfig(
            steps=6,
            batch_size=8,
            log_every=1,
            eval_every=0,
            eval_batch_size=8,
            checkpoint_every=0,
            groups={"full": GroupConfig(lr_peak=1e-4), "lora": GroupConfig(lr_peak=1e-4)},
        ),
    )


def resolved_intermediates(model: ModelConfig) -> str:
    """The expert chain's intermediates the model runs with ("auto" resolved as moe_experts does: the
    experts get x in the weights' dtype)."""
    if model.expert_intermediates != "auto":
        return model.expert_intermediates
    return default_intermediates(model.param_dtype, model.param_dtype, model.expert_backend)


def run(cfg: ExperimentConfig, workdir: pathlib.Path, resume: bool = False) -> dict:
    cfg = resolve(cfg)
    runtime = current_rss_bytes()
    mesh = training_mesh(cfg.model, cfg.train)
    model = build_model(cfg.model, seed=cfg.train.seed, mesh=mesh)
    print(
        f"expert backend {cfg.model.expert_backend}, {cfg.model.param_dtype} weights, "
        f"{resolved_intermediates(cfg.model)} intermediates, "
        f"{cfg.train.batch_size * make_task(cfg.data).seq_len} tokens per step"
    )
    ffi.reset_kernel_counters()
    start = time.perf_counter()
    result = train(model, make_task(cfg.data), cfg.train, workdir, resume=resume, keep_model=False)
    jax.effects_barrier()
    seconds = time.perf_counter() - start
    counts = ffi.kernel_counters()
    timed = result.history[1:]  # the first step includes compilation
    step_s = (
        sum(1 / r["tokens_per_s"] for r in timed)
        / len(timed)
        * cfg.train.batch_size
        * make_task(cfg.data).seq_len
    )
    tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
    print(
        f"\n{len(timed)} timed steps: {step_s * 1e3:.0f} ms/step, {tokens_per_s:.0f} tokens/s "
        f"(whole run incl. compile and evals: {seconds:.0f} s)"
    )
    print("expert kernel work over the whole run (GFLOP):")
    for kind in ("forward", "recompute", "input_grad", "lora_grad", "base_grad"):
        print(f"  {kind:<12}{counts[kind] / 1e9:>10.2f}")
    batch = make_task(cfg.data).batch(0, cfg.train.batch_size)
    if mesh is not None:
        exchanged = exchanged_bytes(result, cfg, mesh, batch)
        shards = mesh.devices.size
        print(
            f"expert parallelism over {shards} devices of {jax.process_count()} process(es): each step's "
            f"all_to_all results hold {exchanged / 2**20:.1f} MiB per device, {(shards - 1) / shards:.0%} "
            f"of them from other devices; peak RSS of process 0: {peak_rss_bytes() / 2**30:.2f} GiB"
        )
        return {"tokens_per_s": tokens_per_s, "counters": counts, "all_to_all_bytes": exchanged}
    memory = training_memory(result.defn, result.labels, result.params, cfg.train, batch, runtime)
    print(f"host memory ({cfg.mode} mode; ktjax.memory):")
    print(format_memory(memory))
    return {"tokens_per_s": tokens_per_s, "counters": counts, "memory": memory}


def exchanged_bytes(result: TrainResult, cfg: ExperimentConfig, mesh: jax.sharding.Mesh, batch: dict) -> int:
    """Bytes of the all_to_all results of one training step on one device, read from the compiled step
    (compiled again here: the same program as train's)."""
    trainable, frozen = split_trainable(result.params, result.labels)
    tx = make_optimizer(result.labels, cfg.train.groups, cfg.train.steps, cfg.train.clip_norm or None)
    opt_state = onto_mesh(init_optimizer_state(tx, trainable), mesh)
    step = jax.jit(make_train_step(result.defn, tx, cfg.train, mesh))
    hlo = step.lower(trainable, opt_state, frozen, shard_batch(batch, mesh, cfg.train.micro_batches))
    return all_to_all_bytes(hlo.compile().as_text()) * cfg.train.micro_batches
