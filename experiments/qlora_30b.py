"""QLoRA at Qwen3-30B-A3B's exact shapes on a small machine: int4 routed experts, LoRA adapters.

    python -m experiments.run qlora_30b                                    # 48 layers: ~18.5 GB of weights
    python -m experiments.run qlora_30b --set model.num_hidden_layers=2    # the same code, 2 layers
    python -m experiments.run qlora_30b --set model.expert_quant=int8      # 1.9x the bytes: 2 layers only

The model: 48 layers, 128 routed experts (top-8), H=2048, moe I=768, 32 query / 4 key-value heads of
128, vocab 151936, random weights. The routed experts are generated directly in int4 (G=128, bf16
(scale, min) pairs), expert stack by expert stack (ktjax.quant.init): 0.53125 bytes a parameter, 15.4 GB
for the 29 billion expert parameters, where bf16 would need 58 GB. Attention, embeddings and the head
stay bf16 and frozen.

Trained: LoRA adapters of rank 1 on every routed expert's gate/up/down (52M parameters: at rank r the
expert adapters, their gradients and bf16 Adam moments cost about 0.4 GB x r: rank 1 leaves the most
room) and rank 8 on attention's q/k/v/o, for a few steps of the arithmetic SFT set with the byte
tokenizer, each layer recomputed in the backward (remat "full") and glibc held to 2 malloc arenas
(limit_malloc_arenas), both for a lower peak (docs/performance.md has the measured peak and tokens/s). No
checkpoints (saving 18 GB of frozen weights is not the point here). Prints the build time, peak RSS and
tokens/s; writes them to summary.json.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import pathlib
import sys
import time

import jax

from ktjax.distributed import is_main
from ktjax.experiment import DataConfig, ExperimentConfig, make_task, resolve
from ktjax.files import write_atomically
from ktjax.memory import current_rss_bytes, peak_rss_bytes
from ktjax.models import build_model, qwen3_moe
from ktjax.optim import GroupConfig
from ktjax.train import TrainConfig, train, training_mesh

DATA = pathlib.Path(__file__).parent / "data" / "arithmetic_sft.jsonl"
VOCAB = 151936  # Qwen3's; the byte tokenizer uses the first few hundred ids
M_ARENA_MAX = -8  # glibc's mallopt parameter


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="qlora_30b",
        mode="rules",
        model=qwen3_moe(
            vocab_size=VOCAB,
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            intermediate_size=6144,
            rope_theta=1e6,
            param_dtype="bfloat16",
            expert_quant="int4",
            expert_policy="recompute",
            remat="full",
            lora_rank=1,
            lora_alpha=2.0,
            lora_targets=("experts", "q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        data=DataConfig(path=str(DATA), seq_len=64, eval_fraction=0.1),
        train=TrainConfig(
            steps=4,
            batch_size=2,
            log_every=1,
            eval_every=0,
            eval_batch_size=2,
            checkpoint_every=-1,
            rules=(("*.lora_A", "lora"), ("*.lora_B", "lora"), ("*", "frozen")),
            groups={"lora": GroupConfig(lr_peak=1e-3, warmup_steps=0, moment_dtype="bfloat16")},
        ),
        export_peft=False,
    )


def limit_malloc_arenas(arenas: int = 2) -> None:
    """At most `arenas` glibc malloc arenas from now on (as MALLOC_ARENA_MAX; arenas made before this
    call stay): glibc gives threads arenas of their own (up to 8 per core), and memory freed in one (XLA
    compiling the 48-layer step on its threads) serves no other."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)


def run(cfg: ExperimentConfig, workdir: pathlib.Path, resume: bool = False) -> dict:
    limit_malloc_arenas()
    task = make_task(cfg.data)
    vocab = cfg.model.vocab_size
    cfg = resolve(cfg, task)
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(vocab_size=vocab))  # keep Qwen3's vocabulary
    runtime = current_rss_bytes()
    print(
        f"qlora_30b: {cfg.model.num_hidden_layers} layers, {cfg.model.num_experts} experts of "
        f"[{cfg.model.moe_intermediate_size}, {cfg.model.hidden_size}], experts {cfg.model.expert_quant}, "
        f"LoRA rank {cfg.model.lora_rank} on {', '.join(cfg.model.lora_targets)}"
    )
    start = time.perf_counter()
    model = build_model(cfg.model, seed=cfg.train.seed, mesh=training_mesh(cfg.model, cfg.train))
    jax.effects_barrier()
    built = time.perf_counter() - start
    print(f"built in {built:.0f} s; resident {current_rss_bytes() / 1e9:.2f} GB")
    start = time.perf_counter()
    result = train(model, task, cfg.train, workdir, resume=resume, keep_model=False)
    seconds = time.perf_counter() - start
    timed = result.history[1:] or result.history  # the first step includes compilation
    tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
    peak = peak_rss_bytes()
    losses = [round(r["loss"], 4) for r in result.history]
    summary = {
        "layers": cfg.model.num_hidden_layers,
        "expert_quant": cfg.model.expert_quant,
        "build_s": round(built, 1),
        "train_s": round(seconds, 1),
        "tokens_per_s": round(tokens_per_s, 2),
        "peak_rss_gb": round(peak / 1e9, 2),
        "runtime_rss_gb": round(runtime / 1e9, 2),
        "losses": losses,
        "eval_loss": [round(e["eval_loss"], 4) for e in result.evals],
    }
    print(
        f"\npeak RSS {peak / 1e9:.2f} GB ({peak / 2**30:.2f} GiB); {tokens_per_s:.1f} tokens/s over "
        f"{len(timed)} steps after the first; losses {losses}; eval loss "
        f"{summary['eval_loss'][0]} -> {summary['eval_loss'][-1]}; {seconds:.0f} s training"
    )
    if is_main():
        write_atomically(workdir / "summary.json", json.dumps(summary, indent=2))
    return summary
