"""The kernels' elementwise code (bf16 rounding, SiLU gating and its gradient) called from Python on the
selected ISA, so that tests can compare it with the float64 math."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ktjax.ffi import extension


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 exactly as the kernels round their bf16 outputs (the selected ISA's rounder).

    x: any shape, converted to float32. Returns the same shape as ``ml_dtypes.bfloat16``.
    """
    x = np.asarray(x, np.float32)
    bits = extension.round_to_bf16(np.ascontiguousarray(x).reshape(-1))
    return bits.view(ml_dtypes.bfloat16).reshape(x.shape)


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """h = silu(g) * u exactly as the kernels gate the experts' hidden units (the selected ISA's code).

    g, u: the same shape, converted to float32. Returns h: that shape, float32.
    """
    g, u = np.asarray(g, np.float32), np.asarray(u, np.float32)
    return extension.silu_mul(g.reshape(-1), u.reshape(-1)).reshape(g.shape)


def silu_mul_grad(g: np.ndarray, u: np.ndarray, dh: np.ndarray, w: float) -> tuple[np.ndarray, np.ndarray]:
    """(dg, du) of h = silu(g) * u for the upstream gradient ``w * dh``, exactly as the kernels compute them.

    g, u, dh: the same shape, converted to float32; w: a router weight. Returns two float32 arrays of
    that shape.
    """
    g, u, dh = (np.asarray(a, np.float32) for a in (g, u, dh))
    dg, du = extension.silu_mul_grad(g.reshape(-1), u.reshape(-1), dh.reshape(-1), w)
    return dg.reshape(g.shape), du.reshape(g.shape)


def dequantize(w, expert: int = 0) -> np.ndarray:
    """Expert `expert` of a QuantizedWeight [E, out, in], dequantized by the kernels' code: [out, in] f32."""
    E, rows, cols = w.shape
    data = np.ascontiguousarray(np.asarray(w.data)[expert]).view(np.uint8).reshape(-1)
    scales = np.ascontiguousarray(np.asarray(w.scales)[expert]).view(np.uint8).reshape(-1)
    group = w.group if w.format == "int4" else w.block[0]
    return extension.dequantize(w.format, data, scales, rows, cols, group, w.block[1])
