"""Benchmark one training step at long sequences: time and peak resident memory per sequence length,
attention backend, remat policy and loss chunk, each in a process of its own (the peak is per process).

    python -m ktjax.bench_sequence                                   # 2048, 4096; cpu; remat off, full
    python -m ktjax.bench_sequence --seqs 32768 --remat full
    python -m ktjax.bench_sequence --vocab 151936 --loss-chunks 4096,0   # whole logits, then chunks

The model is a 4-layer bf16 Qwen3-MoE-style model: H=1024, 16 heads of 64 (4 key/value heads), 16 routed
experts top-4 of I=512, vocabulary 2048 (--vocab), LoRA rank 8 on the experts (0.23 GB of weights);
batch 1, one jitted ``jax.value_and_grad`` of the LoRA adapters over one sequence, of the training loss
(ktjax.train.loss_sum with TrainConfig.loss_chunk = --loss-chunks). "step" is the median of the
calls after the first (--steps of them); "first" is the first, compilation included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from ktjax.config import ATTENTION_BACKENDS, REMAT_POLICIES, ModelConfig
from ktjax.memory import peak_rss_bytes
from ktjax.models import build_model
from ktjax.params import is_lora, merge_model, split_model
from ktjax.train import loss_chunk_rows, loss_sum

MODEL = dict(
    vocab_size=2048,
    hidden_size=1024,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=512,
    param_dtype="bfloat16",
    lora_rank=8,
    lora_targets=("experts",),
)


def one_step(seq: int, backend: str, remat: str, steps: int, vocab: int = 2048, loss_chunk: int = 0) -> dict:
    """Builds the model, runs the step 1 + `steps` times; the times and this process's peak RSS."""
    cfg = ModelConfig(
        **{**MODEL, "vocab_size": vocab}, attention_backend=backend, remat=remat, max_position_embeddings=seq
    )
    defn, params = split_model(build_model(cfg, seed=0))
    lora = {n: p for n, p in params.items() if is_lora(n)}
    frozen = {n: p for n, p in params.items() if not is_lora(n)}
    ids = jax.random.randint(jax.random.key(0), (1, seq + 1), 0, cfg.vocab_size)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": jnp.ones((1, seq), jnp.int32),
        "positions": jnp.arange(seq)[None],
        "loss_mask": jnp.ones((1, seq), jnp.float32),
    }

    @jax.jit
    def step(lora, frozen):
        def loss(lora):
            return loss_sum(merge_model(defn, {**lora, **frozen}), batch, loss_chunk)[0] / seq

        return jax.value_and_grad(loss)(lora)

    times = []
    for _ in range(1 + steps):
        start = time.perf_counter()
        jax.block_until_ready(step(lora, frozen))
        times.append(time.perf_counter() - start)
    return {
        "first_s": times[0],
        "step_s": statistics.median(times[1:]),
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ktjax.bench_sequence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seqs", default="2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--backends", default="cpu", help="comma-separated attention backends")
    parser.add_argument("--remat", default="off,full", help="comma-separated remat policies")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first (>= 1)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (Qwen3's: 151936)")
    parser.add_argument(
        "--loss-chunks", default="0", help="comma-separated TrainConfig.loss_chunk values (0: automatic)"
    )
    one = ("SEQ", "BACKEND", "REMAT", "CHUNK")
    parser.add_argument("--one", nargs=4, metavar=one, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process: one configuration, its result as a JSON line
        seq, backend, remat, chunk = args.one
        result = one_step(int(seq), backend, remat, args.steps, args.vocab, int(chunk))
        print(json.dumps(result), flush=True)
        return
    seqs = [int(s) for s in args.seqs.split(",")]
    chunks = [int(c) for c in args.loss_chunks.split(",")]
    backends, remats = args.backends.split(","), args.remat.split(",")
    if (
        min(seqs) < 1
        or args.vocab < 1
        or min(chunks) < 0
        or not set(backends) <= set(ATTENTION_BACKENDS)
        or not set(remats) <= set(REMAT_POLICIES)
    ):
        parser.error(
            f"--steps, --seqs and --vocab must be >= 1, --loss-chunks >= 0, --backends of "
            f"{ATTENTION_BACKENDS}, --remat of {REMAT_POLICIES}"
        )
    print(
        "ktjax.bench_sequence: one LoRA step, 4-layer bf16 MoE (H=1024, 16 heads, 16 experts top-4), "
        f"batch 1, vocabulary {args.vocab}"
    )
    print(
        f"{'tokens':>7} {'attention':<10} {'remat':<8} {'loss chunk':>10} {'step s':>8} {'first s':>8} "
        f"{'peak RSS GB':>12}"
    )
    for seq in seqs:
        for backend in backends:
            for remat in remats:
                for chunk in chunks:
                    rows = loss_chunk_rows(args.vocab, seq, chunk)
                    label = f"{seq:>7} {backend:<10} {remat:<8} {'all' if rows >= seq else rows:>10}"
                    cmd = [sys.executable, "-m", "ktjax.bench_sequence", "--steps", str(args.steps)]
                    cmd += ["--vocab", str(args.vocab), "--one", str(seq), backend, remat, str(chunk)]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                        print(f"{label} failed: {reason}", flush=True)
                        continue
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    times = f"{r['step_s']:>8.2f} {r['first_s']:>8.2f}"
                    print(f"{label} {times} {r['peak_rss_gb']:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
