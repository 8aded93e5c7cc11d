"""Experiments: a typed config (model + data + training + mode) and the default driver that trains,
evaluates before/after, and leaves a complete run directory:

    <workdir>/config.json  metrics.jsonl  checkpoints/  curves.png  summary.json
              peft_adapter/ (when the model has LoRA adapters)  merged/ (with export_merged)

The data is the digit-sorting task, or with data.path a jsonl file of SFT records (ktjax.sft). The
model is random, or with model.path a Hugging Face checkpoint directory (ktjax.models.from_hf).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from ktjax.data import SortTask, answer_accuracy
from ktjax.decoding import Generator
from ktjax.distributed import is_main, to_host
from ktjax.files import write_atomically
from ktjax.models import ModelConfig, build_model
from ktjax.models.hf_config import config_from_hf, read_hf_config
from ktjax.models.hf_export import export_hf
from ktjax.models.peft_adapter import export_peft
from ktjax.nn.decoder import MoeForCausalLM
from ktjax.optim import FULL_RULES, HYBRID_RULES, LORA_RULES
from ktjax.overrides import from_json, to_json
from ktjax.params import is_lora, merge_model
from ktjax.plots import plot_run
from ktjax.sft import SFTData
from ktjax.tokenizer import load_tokenizer, model_tokenizer
from ktjax.train import TrainConfig, TrainResult, evaluator, load_trained, train, training_mesh

MODES = {"full": FULL_RULES, "lora": LORA_RULES, "hybrid": HYBRID_RULES}
# ModelConfig fields that are not architecture: they still apply when model.path supplies the rest.
RUN_FIELDS = (
    "param_dtype",
    "expert_backend",
    "expert_policy",
    "expert_intermediates",
    "attention_backend",
    "attention_inputs",
    "remat",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "path",
)
Task = SortTask | SFTData


@dataclass
class DataConfig:
    path: str = ""  # a jsonl file of SFT records; empty: the digit-sorting task below
    seq_len: int = 256  # SFT: tokens per packed row
    tokenizer: str = ""  # SFT: a directory with tokenizer.json, or "bytes"; default: model.path's, else bytes
    eval_fraction: float = 0.1  # SFT: records held out for eval
    length: int = 8  # sort: digits to sort
    num_values: int = 10  # sort: digit range [0, num_values)
    seed: int = 0
    descending: bool = False  # sort: the other way


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    mode: str = "hybrid"  # full | lora | hybrid | rules (use train.rules as given)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export_peft: bool = True  # write LoRA adapters in PEFT format to <workdir>/peft_adapter
    export_merged: bool = False  # write a Hugging Face model directory, adapters merged, to <workdir>/merged
    # held-out prompts answered by greedy generation before and after training (0: none)
    generate_eval: int = 32

    def __post_init__(self) -> None:
        if self.mode not in (*MODES, "rules"):
            raise ValueError(f"mode must be one of {(*MODES, 'rules')}, got {self.mode!r}")


def resolve(cfg: ExperimentConfig, task: Task | None = None) -> ExperimentConfig:
    """Fills in what follows from other fields: the architecture from model.path's config.json (else
    the vocabulary from the task) and the mode's rules."""
    task = task or make_task(cfg.data, cfg.model.path)
    if cfg.model.path:
        run = {k: getattr(cfg.model, k) for k in RUN_FIELDS}
        if cfg.model.expert_quant != "none":  # "none" leaves the experts as stored (FP8 stays FP8)
            run["expert_quant"] = cfg.model.expert_quant
        source = str(pathlib.Path(cfg.model.path) / "config.json")
        model = config_from_hf(read_hf_config(cfg.model.path), source=source, **run)
        if task.vocab_size > model.vocab_size:
            raise ValueError(
                f"the data uses token ids up to {task.vocab_size - 1}, the model has {model.vocab_size}"
            )
    else:
        model = cfg.model.replace(vocab_size=task.vocab_size)
    rules = cfg.train.rules if cfg.mode == "rules" else MODES[cfg.mode]
    train_cfg = TrainConfig(**{**cfg.train.__dict__, "rules": tuple(tuple(r) for r in rules)})
    return dataclasses.replace(cfg, model=model, train=train_cfg)


def make_task(data: DataConfig, model_path: str = "") -> Task:
    """The sorting task, or SFT data from data.path tokenized with data.tokenizer (default: the model
    directory's tokenizer when it has one, else bytes)."""
    if not data.path:
        return SortTask(
            length=data.length, num_values=data.num_values, seed=data.seed, descending=data.descending
        )
    tokenizer = load_tokenizer(data.tokenizer) if data.tokenizer else model_tokenizer(model_path)
    return SFTData(
        data.path, tokenizer, seq_len=data.seq_len, seed=data.seed, eval_fraction=data.eval_fraction
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


def show_examples(task: Task, logits: np.ndarray, batch: dict, n: int = 3) -> str:
    """A few eval sequences: the digits, the true sorted answer and the model's (teacher-forced) one;
    for SFT data, the trained text and the model's teacher-forced prediction of it."""
    if isinstance(task, SFTData):
        return show_sft_examples(task, logits, batch, n)
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


def show_sft_examples(task: SFTData, logits: np.ndarray, batch: dict, n: int = 2) -> str:
    pred = logits.argmax(-1)
    rows = []
    for i in range(min(n, len(pred))):
        first = (batch["segment_ids"][i] == 1) & (batch["loss_mask"][i] > 0)
        want = task.tokenizer.decode(batch["targets"][i][first])
        got = task.tokenizer.decode(pred[i][first])
        rows.append(f"  target: {want[:200]!r}\n  model:  {got[:200]!r}")
    return "\n".join(rows)


def generated_answers(gen: Generator, task: Task, n: int, show: int = 3) -> tuple[float, str]:
    """Greedy generation on n held-out prompts -> (the fraction whose generated tokens begin with the
    whole answer: exact match, text showing the first `show`)."""
    pairs = task.eval_prompts(n)
    new = gen([p for p, _ in pairs], max_new_tokens=max(len(a) for _, a in pairs))
    exact = [got[: len(want)] == want for got, (_, want) in zip(new, pairs)]
    if isinstance(task, SFTData):
        text = lambda ids: repr(task.tokenizer.decode(ids))  # noqa: E731
        shown = lambda prompt: text(prompt)[-48:]  # noqa: E731
    else:  # digits; "." for a special token (<bos>, <sep>) where a digit belongs
        text = lambda ids: "".join(str(t - 3) if t >= 3 else "." for t in ids)  # noqa: E731
        shown = lambda prompt: text(prompt[1:-1])  # noqa: E731
    rows = []
    for ok, got, (prompt, want) in list(zip(exact, new, pairs))[:show]:
        mark = "ok " if ok else "   "
        rows.append(f"  {mark} {shown(prompt)} -> {text(got[: len(want)])}  (answer: {text(want)})")
    return sum(exact) / len(exact), "\n".join(rows)


def run_experiment(cfg: ExperimentConfig, workdir: pathlib.Path, resume: bool = False) -> TrainResult:
    """The default driver: train on the task, eval before and after, plot, summarise, export."""
    task = make_task(cfg.data, cfg.model.path)
    cfg = resolve(cfg, task)
    main = is_main()
    processes = jax.process_count()
    if processes > 1 and cfg.export_merged:
        raise ValueError(
            "export_merged with several processes: export the merged model from the run directory in one "
            "process afterwards (ktjax.experiment.load_run, then ktjax.models.hf_export.export_hf)"
        )
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(workdir / "config.json", json.dumps(to_json(cfg), indent=2))
    print(f"experiment {cfg.name}: {cfg.mode} mode -> {workdir}")
    print(format_config(cfg))
    print(f"task: {task.describe()}")
    start = time.perf_counter()
    mesh = training_mesh(cfg.model, cfg.train)
    if mesh is not None:
        print(
            f"expert parallelism: {cfg.model.num_experts} routed experts over {mesh.devices.size} devices "
            f"of {processes} process{'es' if processes > 1 else ''} (axis {cfg.model.expert_axis!r})"
        )
    model = build_model(cfg.model, seed=cfg.train.seed, mesh=mesh)
    generated, gen = {}, None
    if cfg.generate_eval and processes > 1:
        print("generation eval skipped: it runs in one process (generate from the run directory afterwards)")
    elif cfg.generate_eval:
        gen = Generator(model)  # compiled once, used again after training
        generated["before"] = generated_answers(gen, task, cfg.generate_eval)
        gen.release()  # training takes the model's parameters over
    result = train(
        model,
        task,
        cfg.train,
        workdir,
        resume=resume,
        eval_metrics=answer_accuracy,
        keep_model=False,
    )
    seconds = time.perf_counter() - start
    if main:
        plot_run(workdir / "metrics.jsonl", workdir / "curves.png", title=f"{cfg.name} ({cfg.mode})")
    before, after = result.evals[0], result.evals[-1]
    head = f"before (step {before['step']})   after (step {after['step']})"
    print(f"\neval on {cfg.train.eval_batch_size} held-out sequences      {head}")
    for key in ("eval_loss", "token_accuracy", "sequence_accuracy"):
        print(f"  {key:<38} {before[key]:>16.4f} {after[key]:>16.4f}")
    if isinstance(task, SortTask):
        print(f"  (chance token accuracy: {1 / cfg.data.num_values:.2f})")
    if gen is not None:
        gen.use(merge_model(result.defn, result.params))
        generated["after"] = generated_answers(gen, task, cfg.generate_eval)
        rates = (generated["before"][0], generated["after"][0])
        label = f"generated_exact_match ({cfg.generate_eval} greedy)"
        print(f"  {label:<38} {rates[0]:>16.4f} {rates[1]:>16.4f}")
    batch = task.eval_batch(8 * (mesh.devices.size if mesh is not None else 1))
    _, logits = evaluator(result.defn, mesh)(result.params, batch)
    print("examples (teacher-forced):")
    print(show_examples(task, logits, batch))
    if generated:
        print("examples (generated, before training):")
        print(generated["before"][1])
        print("examples (generated, after training):")
        print(generated["after"][1])
    summary = {
        "name": cfg.name,
        "mode": cfg.mode,
        "seconds": seconds,
        "before": before,
        "after": after,
        **{f"generated_exact_match_{k}": v[0] for k, v in generated.items()},
        "final_train": result.history[-1] if result.history else None,
    }
    adapters = {n: to_host(v) for n, v in result.params.items() if is_lora(n)}  # on every process
    if main:
        write_atomically(workdir / "summary.json", json.dumps(summary, indent=2))
        if cfg.export_peft and adapters:
            print(
                f"LoRA adapters (PEFT format): {export_peft(adapters, cfg.model, workdir / 'peft_adapter')}"
            )
        if cfg.export_merged:
            print(f"merged Hugging Face model: {export_hf(result.params, cfg.model, workdir / 'merged')}")
    print(f"\nrun directory: {workdir} ({run_contents(workdir)}) — {seconds:.0f} s")
    return result


def run_contents(workdir: pathlib.Path) -> str:
    """What a run directory holds, for the end-of-run line: 'checkpoints/, config.json, ...'."""
    return ", ".join(p.name + "/" if p.is_dir() else p.name for p in sorted(workdir.iterdir()))


def load_run(workdir: str | pathlib.Path) -> tuple[ExperimentConfig, MoeForCausalLM, Task, int]:
    """A run directory's config, its model with the newest checkpoint's parameters, its task (data and
    tokenizer) and the checkpoint's step. Raises FileNotFoundError without config.json or a checkpoint."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir} is not a run directory: it has no config.json")
    cfg = from_json(ExperimentConfig, json.loads((workdir / "config.json").read_text()))
    task = make_task(cfg.data, cfg.model.path)
    model, step = load_trained(build_model(cfg.model, seed=cfg.train.seed), cfg.train, workdir)
    return cfg, model, task, step
