"""Quantized expert bases against bf16 in the same run (``python -m ktjax.bench --quant``).

For each shape, the same inputs with gate/up/down in bf16 and quantized from those weights (int8 per
row, int4 at G=128, fp8 in 128 x 128 blocks), the kernels in their default mode: the forward and the
LoRA forward+backward (gradients of x, router weights and adapters; a quantized base is frozen), min
and median over interleaved rounds. Beside each time: the ratio to bf16, the expert bytes (data +
scales) per expert, and a roofline of the forward: the time to stream those bytes once at the measured
bandwidth against the FLOPs at the measured f32 peak (the quantized path multiplies f32 panels).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.ops import moe_experts
from ktjax.quant import quantize

BASES = {"bf16": None, "int8": "int8", "int4": "int4:128", "fp8": "fp8:128x128"}  # base -> expert_quant
CASES = ("forward", "lora")


def weight_bytes(w) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(w))


def bench_quant_shape(name: str, inp: dict, reps: int, timed: Callable) -> dict:
    """`inp`: ktjax.bench.make_inputs' arrays; `timed(fn, *args)`: seconds of one call."""
    bases = {}
    for base, spec in BASES.items():
        ws = tuple(inp[p] for p in ("gate", "up", "down"))
        if spec is not None:
            # on the device: numpy leaves would be copied into XLA's buffers on every call
            ws = tuple(jax.device_put(quantize(np.asarray(w, np.float32), spec)) for w in ws)
        bases[base] = ws

    def moe(x, w, gate, up, down, ids, lora):
        return moe_experts(x, ids, w, gate, up, down, lora=lora, lora_scale=2.0)

    def loss(x, w, gate, up, down, ids, lora, cot):
        return jnp.sum(moe(x, w, gate, up, down, ids, lora).astype(jnp.float32) * cot)

    cot = inp["cot"].astype(jnp.float32)
    fns = {}
    for base, ws in bases.items():
        args = (inp["x"], inp["w"], *ws, inp["ids"])
        fns[(base, "forward")] = (jax.jit(lambda *a: moe(*a, None)), args)
        fns[(base, "lora")] = (jax.jit(jax.grad(loss, argnums=(0, 1, 6))), (*args, inp["lora"], cot))
    print(f"  {name}: compiling and warming up {len(fns)} functions", file=sys.stderr, flush=True)
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times = {key: [] for key in fns}
    for rep in range(reps):
        print(f"  {name}: round {rep + 1} of {reps}", file=sys.stderr, flush=True)
        for key, (fn, args) in fns.items():
            times[key].append(timed(fn, *args))
    E = inp["gate"].shape[0]
    return {
        "times": {f"{b}/{c}": v for (b, c), v in times.items()},
        "bytes_per_expert": {b: sum(weight_bytes(w) for w in ws) // E for b, ws in bases.items()},
    }


def report_quant(name: str, shape: dict, result: dict, peak_gflops: float, bandwidth_gbs: float) -> str:
    T, H, I, K, E = (shape[k] for k in ("T", "H", "I", "K", "E"))
    F = 2 * T * K * 3 * H * I
    t = {k: (min(v), statistics.median(v)) for k, v in result["times"].items()}
    compute_ms = F / (peak_gflops * 1e9) * 1e3
    lines = [
        f"\n{name} quantized bases: T={T} H={H} I={I} K={K} E={E} (~{T * K / E:.0f} tokens per expert); "
        f"forward F = {F / 1e9:.2f} GFLOP = {compute_ms:.1f} ms at the f32 peak",
        f"{'base':<6}{'KiB/expert':>11}{'stream ms':>10}{'forward ms min/med':>22}{'x bf16':>8}"
        f"{'LoRA fwd+bwd ms min/med':>26}{'x bf16':>8}",
    ]
    for base in BASES:
        nbytes = result["bytes_per_expert"][base]
        stream_ms = nbytes * E / (bandwidth_gbs * 1e9) * 1e3
        fwd, lora = t[f"{base}/forward"], t[f"{base}/lora"]
        lines.append(
            f"{base:<6}{nbytes / 1024:>11.0f}{stream_ms:>10.1f}"
            f"{fwd[0] * 1e3:>13.1f}/{fwd[1] * 1e3:<8.1f}{fwd[0] / t['bf16/forward'][0]:>8.2f}"
            f"{lora[0] * 1e3:>17.1f}/{lora[1] * 1e3:<8.1f}{lora[0] / t['bf16/lora'][0]:>8.2f}"
        )
    lines.append(
        "stream ms: all experts' bytes read once at the measured bandwidth; x bf16: time / bf16's (below 1 "
        "is faster)"
    )
    return "\n".join(lines)
