"""Benchmark the routed experts: CPU FFI kernels vs the best pure-XLA formulation, same run, same CPU.

    python -m ktjax.bench --quick                      # small shapes, under a minute
    python -m ktjax.bench --shapes S1,S2 --reps 3 --json bench.json --png bench.png
    python -m ktjax.bench --shapes S2 --backends cpu,xla            # the default mode only
    python -m ktjax.bench --quant --shapes D1,S1,S2                 # quantized bases against bf16

For each shape it times (interleaving backends and cases, min and median over --reps) the forward and
forward+backward in three training modes: ``full`` (grads of x, router weights, gate/up/down),
``lora`` (x, router weights, LoRA adapters on all three projections) and ``frozen`` (x and router
weights only); backward = forward+backward - forward. Backends (all three by default): ``cpu``, the
kernels in their default mode (for these bf16 weights: ``intermediates="bf16"``, moe_experts);
``cpu_f32``, the kernels with ``intermediates="f32"``; ``xla``, the baseline:
``ktjax.ops.moe_capacity`` (capacity buffers at dropless capacity, index-gather dispatch, batched
einsum, f32 weights). Reports ms, tokens/s, effective GFLOP/s (nominal: forward F = 2*T*K*3*H*I,
full 3F, lora and frozen 2F), % of a measured micro-kernel peak (the bf16 pair kernel's where the CPU
has AVX512_BF16, else the f32 kernel's), the speed-up over XLA, and for the
forward a bytes-moved model: the time to stream the expert weights once at the memory bandwidth
that the kernels' threads measure together. Tables go to stdout, progress lines to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import ffi, machine
from ktjax.bench_quant import bench_quant_shape, report_quant
from ktjax.ops import moe_experts
from ktjax.ops.moe_capacity import dropless_capacity, moe_experts_capacity

LAYER = dict(H=2048, I=768, K=8, r=16)
SHAPES = {
    "Q1": dict(T=256, H=512, I=256, K=4, E=16, r=8),  # --quick
    "Q2": dict(T=512, H=1024, I=384, K=8, E=32, r=8),  # --quick
    "D1": dict(T=32, E=64, **LAYER),  # decode and small micro-batches: ~4 tokens per expert
    "S1": dict(T=128, E=64, **LAYER),
    "S2": dict(T=1024, E=64, **LAYER),
    "S3": dict(T=4096, E=32, **LAYER),
    # Expert shapes of released models (shapes only: their activations and biases differ), small batches
    "M1": dict(T=256, H=2048, I=1408, K=6, E=64, r=16),  # DeepSeek-V2-Lite's layer: ~24 tokens per expert
    "M2": dict(T=128, H=2880, I=2880, K=4, E=32, r=16),  # gpt-oss-20b's expert shape: ~16 tokens per expert
}
CASES = ("forward", "full", "lora", "frozen")
# backend -> moe_experts(intermediates=...): "auto" is the default, by dtype (bf16 here).
CPU_BACKENDS = {"cpu": "auto", "cpu_f32": "f32"}


def make_inputs(shape: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    T, H, I, K, E, r = (shape[k] for k in ("T", "H", "I", "K", "E", "r"))
    bf16 = jnp.bfloat16

    def randn(*s, scale=1.0):
        return jnp.asarray(rng.standard_normal(s) * scale, bf16)

    logits = rng.standard_normal((T, E))
    ids = np.argsort(-logits, axis=1)[:, :K].astype(np.int32)  # distinct experts per token, like a router
    lora = {
        p: (randn(E, r, i, scale=i**-0.5), randn(E, o, r, scale=r**-0.5))
        for p, (o, i) in {"gate": (I, H), "up": (I, H), "down": (H, I)}.items()
    }
    return dict(
        x=randn(T, H),
        ids=jnp.asarray(ids),
        w=jnp.asarray(rng.uniform(0.05, 0.3, (T, K)), jnp.float32),
        gate=randn(E, I, H, scale=H**-0.5),
        up=randn(E, I, H, scale=H**-0.5),
        down=randn(E, H, I, scale=I**-0.5),
        lora=lora,
        cot=randn(T, H),
        capacity=dropless_capacity(ids, E),
    )


def make_fns(backend: str, inp: dict) -> dict[str, tuple[Callable, tuple]]:
    """case -> (jitted function, its arguments) for one backend.

    The routing (ids) and the output cotangent are arguments, as they are in training, not constants:
    XLA would otherwise sort the slots by expert at compile time (the baseline's dispatch would cost
    nothing) and fold work on the cotangent into the compiled program.
    """
    if backend in CPU_BACKENDS:
        weights = (inp["gate"], inp["up"], inp["down"])
        lora = inp["lora"]
        mode = CPU_BACKENDS[backend]

        def moe(x, w, gate, up, down, ids, lora):
            return moe_experts(x, ids, w, gate, up, down, lora=lora, lora_scale=2.0, intermediates=mode)
    else:  # the baseline runs in f32: weights converted once, outside the timing
        weights = tuple(t.astype(jnp.float32) for t in (inp["gate"], inp["up"], inp["down"]))
        lora = {k: tuple(t.astype(jnp.float32) for t in v) for k, v in inp["lora"].items()}

        def moe(x, w, gate, up, down, ids, lora):
            return moe_experts_capacity(
                x.astype(jnp.float32), ids, w, gate, up, down, lora, 2.0, capacity=inp["capacity"]
            )

    def loss(x, w, gate, up, down, ids, lora, cot):
        return jnp.sum(moe(x, w, gate, up, down, ids, lora).astype(jnp.float32) * cot)

    def no_lora_loss(x, w, gate, up, down, ids, cot):
        return loss(x, w, gate, up, down, ids, None, cot)

    args = (inp["x"], inp["w"], *weights, inp["ids"])
    cot = inp["cot"].astype(jnp.float32)
    return {
        "forward": (jax.jit(lambda *a: moe(*a, None)), args),
        "full": (jax.jit(jax.grad(no_lora_loss, argnums=(0, 1, 2, 3, 4))), (*args, cot)),
        "lora": (jax.jit(jax.grad(loss, argnums=(0, 1, 6))), (*args, lora, cot)),
        "frozen": (jax.jit(jax.grad(no_lora_loss, argnums=(0, 1))), (*args, cot)),
    }


def _timed(fn: Callable, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench_shape(name: str, shape: dict, backends: list[str], reps: int) -> dict:
    def progress(msg: str) -> None:  # on stderr: stdout keeps the tables
        print(f"  {name}: {msg}", file=sys.stderr, flush=True)

    inp = make_inputs(shape)
    fns = {b: make_fns(b, inp) for b in backends}
    progress(f"compiling and warming up {len(backends)} backend(s) x {len(CASES)} cases")
    for b in backends:
        for case in CASES:
            fn, args = fns[b][case]
            jax.block_until_ready(fn(*args))
    times = {(b, c): [] for b in backends for c in CASES}
    for rep in range(reps):  # interleaved: every case of every backend once per round
        progress(f"round {rep + 1} of {reps}")
        for b in backends:
            for case in CASES:
                fn, args = fns[b][case]
                times[(b, case)].append(_timed(fn, *args))
    return {
        "shape": shape,
        "capacity": inp["capacity"],
        "times": {f"{b}/{c}": v for (b, c), v in times.items()},
    }


def report(name: str, result: dict, peak_gflops: float, bandwidth_gbs: float) -> str:
    s = result["shape"]
    T, H, I, K, E = (s[k] for k in ("T", "H", "I", "K", "E"))
    F = 2 * T * K * 3 * H * I
    flops = {"forward": F, "full": 3 * F, "lora": 2 * F, "frozen": 2 * F}
    t = {k: (min(v), statistics.median(v)) for k, v in result["times"].items()}
    backends = sorted({k.split("/")[0] for k in t})
    cpus = [b for b in backends if b in CPU_BACKENDS]
    ratios = [b for b in cpus if "xla" in backends]
    lines = [
        f"\n{name}: T={T} H={H} I={I} K={K} E={E} bf16 (dropless capacity {result['capacity']}); "
        f"forward F = {F / 1e9:.1f} GFLOP"
        + (f"; tokens/s, GFLOP/s and % peak of {'/'.join(cpus)}" if len(cpus) > 1 else "")
    ]
    head = f"{'case':<22}" + "".join(f"{b + ' ms min/med':>20}" for b in backends)
    # tokens/s, GFLOP/s and % peak of each CPU backend, "/"-separated when there are several
    widths = [w * len(cpus) + len(cpus) + 1 for w in (9, 7, 6)]
    for width, title in zip(widths, ("tokens/s", "GFLOP/s", "% peak")):
        head += f"{title:>{width}}"
    lines.append(head + "".join(f"{'xla/' + b:>{len(b) + 6}}" for b in ratios))
    rows = [(c, c if c == "forward" else f"{c} fwd+bwd") for c in CASES]
    rows += [(f"bwd:{c}", f"{c} backward") for c in CASES[1:]]
    for key, label in rows:

        def get(b, key=key):
            if key.startswith("bwd:"):
                c = key[4:]
                return tuple(max(x - y, 0.0) for x, y in zip(t[f"{b}/{c}"], t[f"{b}/forward"]))
            return t[f"{b}/{key}"]

        vals = {b: get(b) for b in backends}
        line = f"{label:<22}" + "".join(f"{v[0] * 1e3:>11.1f}/{v[1] * 1e3:<8.1f}" for v in vals.values())
        if key.startswith("bwd:"):
            line += " " * sum(widths)
        else:
            gf = [flops[key] / vals[b][0] / 1e9 for b in cpus]
            metrics = (
                "/".join(f"{T / vals[b][0]:.0f}" for b in cpus),
                "/".join(f"{g:.1f}" for g in gf),
                "/".join(f"{g / peak_gflops:.1%}" for g in gf),
            )
            line += "".join(f"{m:>{w}}" for m, w in zip(metrics, widths))
        for b in ratios:
            line += f"{vals['xla'][0] / max(vals[b][0], 1e-9):>{len(b) + 5}.2f}x"
        lines.append(line)
    lines.append("backward rows: fwd+bwd minus forward (min - min, median - median), not timed on their own")
    weight_bytes = 3 * E * H * I * 2
    stream = weight_bytes / (bandwidth_gbs * 1e9)
    if cpus:
        forwards = "; ".join(f"{b} forward = {t[f'{b}/forward'][0] / stream:.1f}x that" for b in cpus)
        lines.append(
            f"bytes model: expert weights {weight_bytes / 2**20:.0f} MiB -> {stream * 1e3:.1f} ms to stream "
            f"once at {bandwidth_gbs:.1f} GB/s; {forwards}"
        )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        backends = sorted({k.split("/")[0] for k in res["times"]})
        xs = np.arange(len(CASES))
        width = 0.8 / len(backends)
        for i, b in enumerate(backends):
            ax.bar(xs + i * width, [min(res["times"][f"{b}/{c}"]) * 1e3 for c in CASES], width, label=b)
        ax.set_xticks(
            xs + width / 2 * (len(backends) - 1), [c if c == "forward" else f"{c}\nfwd+bwd" for c in CASES]
        )
        ax.set_ylabel("ms (min)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def allocator() -> str:
    """The malloc the process runs on: a preloaded one (LD_PRELOAD, e.g. tcmalloc) or glibc's. XLA
    allocates every step's large buffers anew, so the allocator moves full-mode times (README)."""
    preloaded = [lib for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if "malloc" in lib]
    return os.path.basename(preloaded[0]) if preloaded else "glibc malloc"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ktjax.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes Q1, Q2")
    parser.add_argument("--shapes", default="S1,S2,S3", help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument(
        "--backends",
        default="cpu,cpu_f32,xla",
        help="comma-separated, of cpu (default mode: bf16 intermediates for bf16 weights), "
        "cpu_f32 (intermediates='f32'), xla (baseline)",
    )
    parser.add_argument(
        "--quant",
        action="store_true",
        help="quantized bases (int8, int4, fp8) against bf16 (ktjax.bench_quant)",
    )
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (>= 1); min and median over them")
    parser.add_argument("--json", help="write the raw timings here")
    parser.add_argument("--png", help="write a bar chart here")
    args = parser.parse_args(argv)
    names = ["Q1", "Q2"] if args.quick else args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {list(SHAPES)}")
    backends = args.backends.split(",")
    if not set(backends) <= {*CPU_BACKENDS, "xla"}:
        parser.error(f"unknown backend(s) in {args.backends!r}; known: {[*CPU_BACKENDS, 'xla']}")
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    for flag, path in (("--json", args.json), ("--png", args.png)):  # fail now, not after the run
        folder = os.path.dirname(os.path.abspath(path)) if path is not None else None
        if folder is not None and not os.path.isdir(folder):
            parser.error(f"{flag}: no directory {folder!r} to write {path!r} into")
    threads = int(os.environ.get("KTJAX_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
    # The best of several short probes: this VM's hypervisor takes whole time slices away.
    f32_peak = max(machine.measure_peak_gflops(threads, seconds=0.1) for _ in range(8))
    bf16_peak = max(machine.measure_peak_gflops(threads, seconds=0.1, bf16_pairs=True) for _ in range(8))
    peak = bf16_peak or f32_peak  # "% peak" is of the bf16 pair kernel's peak where the CPU has one
    bw = machine.measure_read_bandwidth_gbs(threads)
    malloc = allocator()
    peaks = f"f32 peak {f32_peak:.0f} GFLOP/s"
    if bf16_peak:
        peaks += f", bf16 peak {bf16_peak:.0f} (% peak)"
    print(
        f"ktjax.bench: {threads} threads, micro-kernel {ffi.selected_isa()}; all threads together: "
        f"{peaks}, read bandwidth {bw:.1f} GB/s; jax {jax.__version__}; {malloc}"
    )
    results = {}
    for name in names:
        if args.quant:
            results[name] = bench_quant_shape(name, make_inputs(SHAPES[name]), args.reps, _timed)
            print(report_quant(name, SHAPES[name], results[name], f32_peak, bw), flush=True)
            continue
        results[name] = bench_shape(name, SHAPES[name], backends, args.reps)
        print(report(name, results[name], peak, bw), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    counters = ffi.kernel_counters()
    print(
        f"\npeak RSS of this process: {rss:.2f} GiB; kernel scratch pool: "
        f"{counters['scratch_peak_bytes'] / 2**20:.0f} MiB at most, "
        f"{counters['scratch_allocations']} buffers allocated over "
        f"{counters['forward_calls'] + counters['backward_calls']} kernel calls (reused across calls)"
    )
    if args.json:
        with open(args.json, "w") as f:
            record = {
                "peak_gflops": f32_peak,
                "bf16_peak_gflops": bf16_peak,
                "bandwidth_gbs": bw,
                "allocator": malloc,
                "results": results,
            }
            json.dump(record, f, indent=1)
    if args.png and not args.quant:
        plot(results, args.png)


if __name__ == "__main__":
    main()
