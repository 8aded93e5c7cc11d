"""Fine-tune one pretrained MoE to a new task in full, LoRA and hybrid mode; compare in a table.

    python -m experiments.run compare_modes
    python -m experiments.run compare_modes --set train.steps=100

Stage 1 pretrains a small model (all weights, full) to sort digits ascending. Stage 2 fine-tunes
three copies of it to sort *descending*: `full` trains every weight, `lora` only the adapters (on the
routed experts and the attention projections), `hybrid` trains attention and routers in full and the
experts through LoRA. The table compares what each learned, what it trained and what it cost.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from ktjax.data import answer_accuracy
from ktjax.distributed import is_main
from ktjax.experiment import MODES, DataConfig, ExperimentConfig, make_task, resolve
from ktjax.models import build_model, qwen3_moe
from ktjax.optim import GroupConfig
from ktjax.params import merge_model
from ktjax.plots import plot_comparison
from ktjax.train import TrainConfig, train, training_mesh

PRETRAIN_RULES = (("*.lora_A", "frozen"), ("*.lora_B", "frozen"), ("*", "full"))


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="compare_modes",
        mode="hybrid",  # unused: every mode runs
        model=qwen3_moe(
            hidden_size=96,
            num_hidden_layers=2,
            head_dim=24,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=96,
            lora_rank=8,
            lora_alpha=16.0,
            lora_targets=("experts", "q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        data=DataConfig(length=6, num_values=8),
        train=TrainConfig(
            steps=150,
            batch_size=32,
            eval_every=50,
            checkpoint_every=0,
            log_every=10,
            groups={
                "full": GroupConfig(lr_peak=2e-3, warmup_steps=10),
                "lora": GroupConfig(lr_peak=5e-3, warmup_steps=10),
            },
        ),
    )


def run(cfg: ExperimentConfig, workdir: pathlib.Path, resume: bool = False) -> dict:
    if resume:
        print("compare_modes reruns every stage; --resume is not supported for it")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = resolve(cfg)
    print(f"stage 1: pretrain on {make_task(cfg.data).describe()} ({cfg.train.steps} steps, full)")
    pre_cfg = dataclasses.replace(cfg.train, rules=PRETRAIN_RULES)
    pretrained = train(
        build_model(cfg.model, seed=cfg.train.seed, mesh=training_mesh(cfg.model, cfg.train)),
        make_task(cfg.data),
        pre_cfg,
        workdir / "pretrain",
        eval_metrics=answer_accuracy,
    )
    target = dataclasses.replace(cfg.data, descending=True)
    task = make_task(target)
    rows = []
    for mode, rules in MODES.items():
        print(f"\nstage 2 [{mode}]: fine-tune to {task.describe()}")
        model = merge_model(pretrained.defn, pretrained.params)
        start = time.perf_counter()
        result = train(
            model,
            task,
            dataclasses.replace(cfg.train, rules=rules),
            workdir / mode,
            eval_metrics=answer_accuracy,
        )
        seconds = time.perf_counter() - start
        trainable = sum(int(v.size) for n, v in result.params.items() if result.labels[n] != "frozen")
        rows.append(
            {
                "mode": mode,
                "trainable_params": trainable,
                "seconds": seconds,
                # mean over logged steps, leaving out the first (it includes compilation) when there are more
                "tokens_per_s": float(
                    np.mean([r["tokens_per_s"] for r in result.history[1:] or result.history])
                ),
                "before": result.evals[0],
                "after": result.evals[-1],
            }
        )
    print(f"\nfine-tuning {cfg.train.steps} steps from the ascending-sort model to descending sort:")
    print(
        f"{'mode':<8}{'trainable':>12}{'eval loss':>22}{'token acc':>20}{'seq acc':>20}{'s':>7}{'tok/s':>8}"
    )
    for r in rows:
        b, a = r["before"], r["after"]
        print(
            f"{r['mode']:<8}{r['trainable_params']:>12,}{b['eval_loss']:>10.3f} -> {a['eval_loss']:<7.3f}"
            f"{b['token_accuracy']:>10.3f} -> {a['token_accuracy']:<6.3f}"
            f"{b['sequence_accuracy']:>10.3f} -> {a['sequence_accuracy']:<6.3f}"
            f"{r['seconds']:>7.0f}{r['tokens_per_s']:>8.0f}"
        )
    if is_main():
        (workdir / "comparison.json").write_text(json.dumps(rows, indent=2))
        plot_comparison(
            {m: workdir / m / "metrics.jsonl" for m in MODES},
            workdir / "comparison.png",
            title="fine-tuning to descending sort",
        )
    print(f"\nrun directory: {workdir} (comparison.json, comparison.png, one sub-directory per stage)")
    return {"rows": rows}
