"""Fine-tune on records of 8K tokens (flash attention kernels, layer rematerialisation): tokens/s, peak RSS.

    python -m experiments.run long_context                             # 8192-token records, ~3 min
    python -m experiments.run long_context --set data.seq_len=16384 --set model.remat=experts

Each record is a long document (random words, byte tokenizer) that states a secret word at its start,
followed by the question "What was the secret word?"; the loss is on the answer, so every step
back-propagates through the whole 8K-token context. The data is written to <run dir>/long_records.jsonl
(data.seq_len sets the record length). The model is sft_lora's (a small Qwen3-MoE-style model, hybrid
mode) with the attention kernels (memory linear in the sequence) and remat="full" (each layer's
activations recomputed in the backward). The run prints tokens/s and the peak resident memory, and
leaves them in summary.json beside the default driver's results.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random

from experiments import sft_lora
from ktjax.distributed import is_main, sync
from ktjax.experiment import DataConfig, ExperimentConfig, run_experiment
from ktjax.files import write_atomically
from ktjax.memory import peak_rss_bytes
from ktjax.optim import GroupConfig
from ktjax.train import TrainConfig

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="long_context",
        mode="hybrid",
        # sft_lora's model, rematerialised layer by layer, with room for long records
        model=sft_lora.get_config().model.replace(remat="full", max_position_embeddings=32768),
        data=DataConfig(seq_len=8192, eval_fraction=0.1),
        train=TrainConfig(
            steps=8,
            batch_size=1,
            log_every=1,
            eval_every=0,
            eval_batch_size=1,
            checkpoint_every=0,
            groups={"full": GroupConfig(lr_peak=1e-3), "lora": GroupConfig(lr_peak=1e-3)},
        ),
        generate_eval=2,
    )


def long_records(n: int, length: int, seed: int = 0) -> list[dict]:
    """n prompt/completion records of `length` bytes in all (the byte tokenizer adds <bos> and <eos>)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        secret = "".join(rng.choice(LETTERS) for _ in range(6))
        head, question = f"The secret word is {secret}. ", "\nWhat was the secret word?\nAnswer: "
        room = length - 2 - len(head) - len(question) - len(secret)  # 2: <bos> and <eos>
        body = ""
        while len(body) < room:
            body += "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9))) + " "
        records.append({"prompt": head + body[:room] + question, "completion": secret})
    return records


def run(cfg: ExperimentConfig, workdir: pathlib.Path, resume: bool = False) -> dict:
    data = workdir / "long_records.jsonl"
    if not data.exists() and is_main():
        records = long_records(max(10, cfg.train.steps + 2), cfg.data.seq_len, cfg.data.seed)
        write_atomically(data, "".join(json.dumps(r) + "\n" for r in records))
    sync("long_context records written")  # every process reads them
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data), tokenizer="bytes"))
    result = run_experiment(cfg, workdir, resume)
    timed = result.history[1:] or result.history  # the first step includes compilation
    tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
    peak = peak_rss_bytes()
    print(
        f"long_context: {cfg.data.seq_len}-token records, remat {cfg.model.remat}, attention "
        f"{cfg.model.attention_backend}: {tokens_per_s:.0f} tokens/s over {len(timed)} steps after the "
        f"first; peak RSS {peak / 1e9:.2f} GB"
    )
    summary = json.loads((workdir / "summary.json").read_text())
    summary.update(
        seq_len=cfg.data.seq_len, tokens_per_s=round(tokens_per_s, 1), peak_rss_gb=round(peak / 1e9, 2)
    )
    if is_main():
        write_atomically(workdir / "summary.json", json.dumps(summary, indent=2))
    return summary
