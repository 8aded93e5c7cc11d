"""Quantizers of expert weights [E, out, in] (float32 or bfloat16, numpy or JAX arrays) into the
formats of ``QuantizedWeight``, on the host, one expert at a time. Each value is rounded to the
nearest level, so |w - dequantize(w)| <= scale / 2 per element (fp8: half an e4m3 step of w / scale,
times scale)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ktjax.quant.formats import INT4_GROUPS, QuantizedWeight, parse_spec

FP8_MAX = 448.0  # the largest finite e4m3fn value


def _f32(w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 3:
        raise ValueError(f"expert weights must have shape [E, out, in], got {list(w.shape)}")
    return w.astype(np.float32)


def quantize_int8(w) -> QuantizedWeight:
    """Symmetric int8, one scale per output row: scale = max|row| / 127 (1 for an all-zero row)."""
    w = _f32(w)
    absmax = np.abs(w).max(axis=-1)
    scales = np.where(absmax > 0, absmax / 127, 1).astype(np.float32)
    q = np.clip(np.rint(w / scales[..., None]), -127, 127).astype(np.int8)
    return QuantizedWeight(q, scales, "int8", w.shape)


def _bf16_down(x: np.ndarray) -> np.ndarray:
    """The largest bf16 value <= x (f32 in, bf16 out)."""
    r = x.astype(ml_dtypes.bfloat16)
    return np.where(r.astype(np.float32) > x, np.nextafter(r, ml_dtypes.bfloat16(-np.inf)), r)


def _bf16_up(x: np.ndarray) -> np.ndarray:
    """The smallest bf16 value >= x (f32 in, bf16 out)."""
    r = x.astype(ml_dtypes.bfloat16)
    return np.where(r.astype(np.float32) < x, np.nextafter(r, ml_dtypes.bfloat16(np.inf)), r)


def quantize_int4(w, group: int = 128) -> QuantizedWeight:
    """Asymmetric int4 per group of `group` consecutive input columns (the last group may be shorter),
    (scale, min) stored in bf16: min = the group's min rounded down to bf16, scale = (max - min) / 15
    rounded up to bf16 (1 for a constant group), q = round((w - min) / scale) in 0..15, so that the 16
    levels cover the group and every value is within scale / 2 of its weight."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group must be one of {INT4_GROUPS}, got {group}")
    w = _f32(w)
    E, out, in_ = w.shape
    groups = -(-in_ // group)
    padded = np.pad(w, ((0, 0), (0, 0), (0, groups * group - in_)), mode="edge").reshape(
        E, out, groups, group
    )
    low = _bf16_down(padded.min(axis=-1))
    span = padded.max(axis=-1) - low.astype(np.float32)
    scale = np.where(span > 0, _bf16_up(span / np.float32(15)), ml_dtypes.bfloat16(1))
    step = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint((padded - low.astype(np.float32)[..., None]) / step), 0, 15).astype(np.uint8)
    q = q.reshape(E, out, groups * group)[..., :in_]
    if in_ % 2:
        q = np.pad(q, ((0, 0), (0, 0), (0, 1)))
    data = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = np.stack([scale, low], axis=-1).astype(ml_dtypes.bfloat16)
    return QuantizedWeight(data, scales, "int4", (E, out, in_), group=group)


def fp8_weight(data, scale_inv, block: tuple[int, int]) -> QuantizedWeight:
    """An fp8 weight as a checkpoint stores it: e4m3fn data [E, out, in] and its block scales
    (``weight_scale_inv``) [E, ceil(out / B0), ceil(in / B1)], used as they are."""
    data = np.asarray(data)
    if data.dtype != ml_dtypes.float8_e4m3fn:
        data = data.view(ml_dtypes.float8_e4m3fn) if data.dtype == np.uint8 else data
    w = QuantizedWeight(data, np.asarray(scale_inv, np.float32), "fp8", tuple(data.shape), block=tuple(block))
    w.check("fp8 weight")
    return w


def quantize_fp8(w, block: tuple[int, int] = (128, 128)) -> QuantizedWeight:
    """e4m3fn with one scale per block of B0 x B1 (the last blocks ragged): scale = max|block| / 448."""
    w = _f32(w)
    E, out, in_ = w.shape
    b0, b1 = block
    br, bc = -(-out // b0), -(-in_ // b1)
    padded = np.zeros((E, br * b0, bc * b1), np.float32)
    padded[:, :out, :in_] = w
    absmax = np.abs(padded.reshape(E, br, b0, bc, b1)).max(axis=(2, 4))
    scales = np.where(absmax > 0, absmax / FP8_MAX, 1).astype(np.float32)
    full = np.repeat(np.repeat(scales, b0, axis=1), b1, axis=2)[:, :out, :in_]
    data = (w / full).astype(ml_dtypes.float8_e4m3fn)
    return QuantizedWeight(data, scales, "fp8", (E, out, in_), block=(b0, b1))


def quantize(w, spec: str) -> QuantizedWeight:
    """`w` [E, out, in] in the format an ``expert_quant`` text names ("int8", "int4:64", "fp8:128x128";
    formats.parse_spec)."""
    parsed = parse_spec(spec)
    if parsed is None:
        raise ValueError("quantize: spec 'none' names no format")
    fmt, group, block = parsed
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w, group)
    return quantize_fp8(w, block)
