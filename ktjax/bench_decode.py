"""Benchmark KV-cached decoding against the weight-streaming floor, the CPU kernels against pure XLA.

    python -m ktjax.bench_decode                       # the throughput experiment's model, batch 1 and 8
    python -m ktjax.bench_decode --batches 1,4,8 --new-tokens 64 --vocab 151936

The model is experiments/throughput.py's (Qwen3-30B-A3B layer widths: H=2048, I=768, 32 experts top-8,
16 heads of 128, 2 layers, bf16); --vocab sets its vocabulary (the experiment's task uses 13 tokens).
Each row: the mean time of one decode step (every step after the prefill, prompts of --prompt tokens),
tokens/s, and the floor: the bytes a step must read (attention, router and norm weights, the distinct
routed experts its tokens reach, the embedding rows and the head, the key/value cache so far), divided by
the read bandwidth measured in the same run. At batch 1 a token reaches top-k experts per layer; at
batch b the expected number of distinct experts of E under uniform routing, E (1 - (1 - k/E)^b).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from ktjax.config import ModelConfig
from ktjax.decoding import Generator
from ktjax.machine import measure_read_bandwidth_gbs
from ktjax.models import build_model, qwen3_moe
from ktjax.params import split_model

# The throughput experiment's model (experiments/throughput.py adds LoRA adapters to it).
THROUGHPUT_SHAPES = dict(
    hidden_size=2048,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=32,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    param_dtype="bfloat16",
)


def step_bytes(cfg: ModelConfig, params: dict, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` rows reads at `context` cached positions (see the module doc)."""
    total = 0.0
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    distinct = E * (1 - (1 - k / E) ** batch)
    for name, value in params.items():
        nbytes = value.size * value.dtype.itemsize
        if ".experts." in name:
            total += nbytes * distinct / E
        elif "embed_tokens" in name and not cfg.tie_word_embeddings:
            total += nbytes * batch / cfg.vocab_size  # one row per token
        else:
            total += nbytes
    kv_per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # f32 keys and values
    return total + batch * context * kv_per_position * cfg.num_hidden_layers


def time_decode(gen: Generator, batch: int, prompt: int, new_tokens: int, vocab: int) -> float:
    """Mean seconds per decode step (after the prefill), greedy, after a warm-up call."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, vocab, (batch, prompt)).tolist()
    gen(prompts, max_new_tokens=new_tokens)  # compiles the prefill and the decode step
    stamps = []
    gen(prompts, max_new_tokens=new_tokens, on_token=lambda i, t: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ktjax.bench_decode", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (>= 2)")
    parser.add_argument("--vocab", type=int, default=13, help="vocabulary size of the model")
    parser.add_argument("--backends", default="xla,cpu", help="expert backends: xla (the baseline), cpu")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (a decode step is timed between two tokens)")
    cfg = qwen3_moe(**THROUGHPUT_SHAPES, vocab_size=args.vocab)
    threads = int(os.environ.get("KTJAX_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
    bandwidth = measure_read_bandwidth_gbs(threads)
    print(
        f"ktjax.bench_decode: H={cfg.hidden_size}, I={cfg.moe_intermediate_size}, E={cfg.num_experts} "
        f"top-{cfg.num_experts_per_tok}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
        f"{cfg.param_dtype}; prompt {args.prompt}, {args.new_tokens} new tokens; read bandwidth "
        f"{bandwidth:.1f} GB/s ({threads} threads); jax {jax.__version__}"
    )
    header = f"{'backend':<8} {'batch':>5} {'ms/step':>9} {'tok/s':>8} {'floor ms':>9} {'floor tok/s':>11}"
    print(header + f" {'x floor':>8} {'vs xla':>7}")
    times: dict[tuple[str, int], float] = {}
    for backend in args.backends.split(","):
        model = build_model(cfg.replace(expert_backend=backend))
        _, params = split_model(model)
        gen = Generator(model)
        for batch in (int(b) for b in args.batches.split(",")):
            seconds = time_decode(gen, batch, args.prompt, args.new_tokens, cfg.vocab_size)
            times[backend, batch] = seconds
            context = args.prompt + args.new_tokens // 2
            floor = step_bytes(cfg, params, batch, context) / (bandwidth * 1e9)
            xla = times.get(("xla", batch))
            ratio = f"{xla / seconds:>7.2f}" if xla and backend != "xla" else f"{'':>7}"
            print(
                f"{backend:<8} {batch:>5} {seconds * 1e3:>9.1f} {batch / seconds:>8.1f} {floor * 1e3:>9.1f} "
                f"{batch / floor:>11.1f} {seconds / floor:>8.2f} {ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
