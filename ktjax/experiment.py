"""Experiments: a typed config (model + data + training + mode) and the default driver that trains,
evaluates before/after, and leaves a complete run directory:

    <workdir>/config.json  metrics.jsonl  checkpoints/  curves.png  summary.json
"""

from __future__ import annotations

import json
import pathlib
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from ktjax.data import SortTask, answer_accuracy
from ktjax.models import ModelConfig, build_model
from ktjax.optim import FULL_RULES, HYBRID_RULES, LORA_RULES
from ktjax.overrides import to_json
from ktjax.plots import plot_run
from ktjax.train import TrainConfig, TrainResult, make_eval_step, train

MODES = {"full": FULL_RULES, "lora": LORA_RULES, "hybrid": HYBRID_RULES}


@dataclass
class DataConfig:
    length: int = 8  # digits to sort
    num_values: int = 10  # digit range [0, num_values)
    seed: int = 0
    descending: bool = False


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    mode: str = "hybrid"  # full | lora | hybrid | rules (use train.rules as given)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.mode not in (*MODES, "rules"):
            raise ValueError(f"mode must be one of {(*MODES, 'rules')}, got {self.mode!r}")


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fills in what follows from other fields: the task's vocabulary and the mode's rules."""
    task = make_task(cfg.data)
    model = cfg.model.replace(vocab_size=task.vocab_size)
    rules = cfg.train.rules if cfg.mode == "rules" else MODES[cfg.mode]
    train_cfg = TrainConfig(**{**cfg.train.__dict__, "rules": tuple(tuple(r) for r in rules)})
    return ExperimentConfig(name=cfg.name, mode=cfg.mode, model=model, data=cfg.data, train=train_cfg)


def make_task(data: DataConfig) -> SortTask:
    return SortTask(
        length=data.length, num_values=data.num_values, seed=data.seed, descending=data.descending
    )


def format_config(cfg: ExperimentConfig) -> str:
    lines = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            lines.append(f"  {prefix[:-1]:<34} {value}")

    walk("", to_json(cfg))
    return "\n".join(lines)


def show_examples(task: SortTask, logits: np.ndarray, batch: dict, n: int = 3) -> str:
    """A few eval sequences: the digits, the true sorted answer and the model's (teacher-forced) one."""
    pred = logits.argmax(-1)
    rows = []
    for i in range(n):
        digits = batch["input_ids"][i, 1 : 1 + task.length] - 3
        answer_slice = slice(task.length + 1, task.seq_len)
        want = batch["targets"][i, answer_slice] - 3
        got = pred[i, answer_slice] - 3
        mark = "ok " if np.array_equal(want, got) else "   "
        text = ["".join(map(str, v)) for v in (digits, got, want)]
        rows.append(f"  {mark} {text[0]} -> {text[1]}  (sorted: {text[2]})")
    return "\n".join(rows)


def run_experiment(cfg: ExperimentConfig, workdir: pathlib.Path, resume: bool = False) -> TrainResult:
    """The default driver: train on the task, eval before and after, plot, summarise."""
    cfg = resolve(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(to_json(cfg), indent=2))
    print(f"experiment {cfg.name}: {cfg.mode} mode -> {workdir}")
    print(format_config(cfg))
    task = make_task(cfg.data)
    print(f"task: {task.describe()}")
    start = time.perf_counter()
    result = train(
        build_model(cfg.model, seed=cfg.train.seed),
        task,
        cfg.train,
        workdir,
        resume=resume,
        eval_metrics=answer_accuracy,
    )
    seconds = time.perf_counter() - start
    plot_run(workdir / "metrics.jsonl", workdir / "curves.png", title=f"{cfg.name} ({cfg.mode})")
    before, after = result.evals[0], result.evals[-1]
    head = f"before (step {before['step']})   after (step {after['step']})"
    print(f"\neval on {cfg.train.eval_batch_size} held-out sequences      {head}")
    for key in ("eval_loss", "token_accuracy", "sequence_accuracy"):
        print(f"  {key:<38} {before[key]:>16.4f} {after[key]:>16.4f}")
    print(f"  (chance token accuracy: {1 / cfg.data.num_values:.2f})")
    batch = task.eval_batch(8)
    _, logits = jax.jit(make_eval_step(result.defn))(result.params, batch)
    print("examples (digits -> model's sorted answer):")
    print(show_examples(task, np.asarray(logits), batch))
    summary = {
        "name": cfg.name,
        "mode": cfg.mode,
        "seconds": seconds,
        "before": before,
        "after": after,
        "final_train": result.history[-1] if result.history else None,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nrun directory: {workdir} (config.json, metrics.jsonl, checkpoints/, curves.png) — {seconds:.0f} s"
    )
    return result
