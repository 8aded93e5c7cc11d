"""Benchmark one causal attention layer: ktjax's attention kernels (backend "cpu") and blockwise JAX
attention against XLA's dense attention (``jax.nn.dot_product_attention``) and torch's CPU
``scaled_dot_product_attention`` when torch is installed, same run, same inputs.

    python -m ktjax.bench_attention                              # S = 2048, 4096; bf16 and f32
    python -m ktjax.bench_attention --seqs 16384 --backends cpu --reps 1

One layer of 16 heads of 64 (batch 1), forward and forward + backward (gradients of q, k, v), minimum
over interleaved rounds. Beside each JAX time: XLA's temporary buffers of the compiled function (its
memory beyond inputs and outputs). The dense backends are skipped where their [heads, S, S] f32 scores
alone would pass --dense-limit GB.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.ops.attention import attention

HEADS, HEAD_DIM = 16, 64


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def jax_cases(S: int, dtype, dense: bool, backends: list[str]) -> dict[str, tuple[Callable, float]]:
    """name -> (a function of no arguments running one call, XLA's temporary bytes)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, S, HEADS, HEAD_DIM)), dtype) for _ in range(3))
    cot = jnp.asarray(rng.standard_normal((1, S, HEADS * HEAD_DIM)), jnp.float32)
    seg = jnp.ones((1, S), jnp.int32)
    scale = HEAD_DIM**-0.5
    impls = {
        f"ktjax {backend}": lambda q, k, v, b=backend: attention(q, k, v, seg, scale=scale, backend=b)
        for backend in backends
    }
    if dense:
        impls["jax.nn.dot_product_attention"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True
        ).reshape(1, S, -1)
    cases = {}
    for name, impl in impls.items():
        fwd = jax.jit(impl)
        grad = jax.jit(
            jax.grad(lambda q, k, v, f=impl: jnp.sum(f(q, k, v).astype(jnp.float32) * cot), (0, 1, 2))
        )
        for kind, fn in (("forward", fwd), ("fwd+bwd", grad)):
            temp = fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
            cases[f"{name} {kind}"] = (lambda fn=fn: fn(q, k, v), temp)
    return cases


def torch_cases(S: int, dtype) -> dict[str, tuple[Callable, float]]:
    try:
        import torch
    except ImportError:
        return {}
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, S, HEAD_DIM, generator=gen, dtype=tdtype) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            return sdpa(q, k, v, is_causal=True)

    def fwd_bwd():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        sdpa(qq, kk, vv, is_causal=True).float().sum().backward()
        return qq.grad

    return {"torch sdpa forward": (forward, float("nan")), "torch sdpa fwd+bwd": (fwd_bwd, float("nan"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ktjax.bench_attention", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seqs", default="2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--dtypes", default="bf16,f32", help="comma-separated, of bf16, f32")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (>= 1)")
    parser.add_argument(
        "--backends", default="cpu,blockwise", help="comma-separated ktjax backends, of cpu, blockwise"
    )
    parser.add_argument("--dense-limit", type=float, default=4.0, help="GB of dense scores at most")
    args = parser.parse_args(argv)
    dtypes = {"bf16": jnp.bfloat16, "f32": jnp.float32}
    backends = args.backends.split(",")
    if args.reps < 1 or not set(args.dtypes.split(",")) <= set(dtypes):
        parser.error("--reps must be >= 1 and --dtypes a list of bf16, f32")
    if not set(backends) <= {"cpu", "blockwise"}:
        parser.error("--backends must be a list of cpu, blockwise")
    print(
        f"ktjax.bench_attention: one causal layer, {HEADS} heads of {HEAD_DIM}, batch 1; "
        f"jax {jax.__version__}"
    )
    print(f"{'S':>6} {'dtype':<5} {'implementation':<40} {'ms (min)':>10} {'XLA temp MB':>12}")
    for S in (int(s) for s in args.seqs.split(",")):
        for dname in args.dtypes.split(","):
            dense = HEADS * S * S * 4 / 1e9 <= args.dense_limit
            print(f"  S={S} {dname}: compiling", file=sys.stderr, flush=True)
            cases = {**jax_cases(S, dtypes[dname], dense, backends), **torch_cases(S, dtypes[dname])}
            for fn, _ in cases.values():  # warm-up, each to its end: JAX dispatches asynchronously, and a
                jax.block_until_ready(fn())  # call still running would be timed with the next case
            best = {name: float("inf") for name in cases}
            for _ in range(args.reps):
                for name, (fn, _) in cases.items():
                    best[name] = min(best[name], _time(fn))
            for name, (_, temp) in cases.items():
                print(
                    f"{S:>6} {dname:<5} {name:<40} {best[name] * 1e3:>10.1f} {temp / 1e6:>12.1f}", flush=True
                )


if __name__ == "__main__":
    main()
