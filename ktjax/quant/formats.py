"""``QuantizedWeight``: a frozen stacked expert weight [E, out, in] (layout [out, in], as Hugging Face
stores it) kept quantized, one JAX pytree of data + scales with its format as static metadata, which
``moe_experts``, ``jax.jit`` and orbax accept. The layouts (xla_ffi/quant.h reads the same):

    int8  data int8 [E, out, in]; scales f32 [E, out]            w = q * scale[row]          (symmetric)
    int4  data uint8 [E, out, ceil(in / 2)], column 2j in the low nibble, 2j + 1 in the high one;
          scales bf16 [E, out, ceil(in / G), 2] = (scale, min) per group of G columns:
                                                                w = q * scale + min, q in 0..15
    fp8   data float8_e4m3fn [E, out, in]; scales f32 [E, ceil(out / B0), ceil(in / B1)] per block of
          B0 x B1 (the last ones ragged), as DeepSeek-V3 stores weight_scale_inv:
                                                                w = e4m3(q) * scale[row / B0, col / B1]

int4 is asymmetric (a min per group besides the scale): at G = 128 its RMS error on normal and on
Student-t(3) weights is 0.97x and 0.83x that of the best symmetric format (the largest magnitude mapped
to -8), and every value is within scale / 2 of the weight (docs/performance-log.md, "The int4 format").
Its (scale, min) pairs are bf16: 0.53125 bytes a parameter at G = 128 (f32 pairs would take 0.5625);
the quantizer rounds the min down and the scale up to bf16 before it rounds the values, so the
half-step bound holds with the stored pair.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FORMATS = ("int8", "int4", "fp8")
INT4_GROUPS = (32, 64, 128)
DATA_DTYPES = {
    "int8": np.dtype(np.int8),
    "int4": np.dtype(np.uint8),
    "fp8": np.dtype(ml_dtypes.float8_e4m3fn),
}
SCALE_DTYPES = {
    "int8": np.dtype(np.float32),
    "int4": np.dtype(ml_dtypes.bfloat16),
    "fp8": np.dtype(np.float32),
}


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized frozen weight [E, out, in]; see the module docstring for the formats.

    data, scales: arrays as laid out above; format: "int8" | "int4" | "fp8"; shape: (E, out, in);
    group: int4's G (columns per scale); block: fp8's (B0, B1).
    """

    data: Any
    scales: Any
    format: str
    shape: tuple[int, int, int]
    group: int = 0
    block: tuple[int, int] = (0, 0)

    @property
    def ndim(self) -> int:
        return 3

    @property
    def nbytes(self) -> int:
        data, scales = (int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in (self.data, self.scales))
        return data + scales

    def expected_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(data shape, scales shape) of this format at this shape."""
        E, out, in_ = self.shape
        if self.format == "int8":
            return (E, out, in_), (E, out)
        if self.format == "int4":
            return (E, out, (in_ + 1) // 2), (E, out, -(-in_ // self.group), 2)
        b0, b1 = self.block
        return (E, out, in_), (E, -(-out // b0), -(-in_ // b1))

    def check(self, name: str) -> None:
        """Raises ValueError / TypeError naming `name` unless data and scales fit the format."""
        if self.format not in FORMATS:
            raise ValueError(f"{name}: quantized format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "int4" and self.group not in INT4_GROUPS:
            raise ValueError(f"{name}: int4 group must be one of {INT4_GROUPS}, got {self.group}")
        if self.format == "fp8" and not (self.block[0] >= 1 and self.block[1] >= 1):
            raise ValueError(f"{name}: fp8 block must be two positive sizes, got {self.block}")
        want_data, want_scales = self.expected_shapes()
        if np.dtype(self.data.dtype) != DATA_DTYPES[self.format]:
            raise TypeError(
                f"{name}: {self.format} data must be {DATA_DTYPES[self.format]}, got {self.data.dtype}"
            )
        if np.dtype(self.scales.dtype) != SCALE_DTYPES[self.format]:
            raise TypeError(
                f"{name}: {self.format} scales must be {SCALE_DTYPES[self.format]}, got {self.scales.dtype}"
            )
        if tuple(self.data.shape) != want_data or tuple(self.scales.shape) != want_scales:
            raise ValueError(
                f"{name}: {self.format} data and scales of a {list(self.shape)} weight must have shapes "
                f"{list(want_data)} and {list(want_scales)}, "
                f"got {list(self.data.shape)} and {list(self.scales.shape)}"
            )

    def kernel_spec(self, projection: str) -> str:
        """The entry of the kernels' `quant` attribute (xla_ffi/moe_contract.h) for this weight."""
        if self.format == "int8":
            return f"{projection}:int8"
        if self.format == "int4":
            return f"{projection}:int4:{self.group}"
        return f"{projection}:fp8:{self.block[0]}:{self.block[1]}"

    def expert(self, e: int) -> QuantizedWeight:
        """Expert e alone, as a [1, out, in] weight of the same format."""
        _, out, in_ = self.shape
        return dataclasses.replace(
            self, data=self.data[e : e + 1], scales=self.scales[e : e + 1], shape=(1, out, in_)
        )

    def dequantize(self) -> jax.Array:
        """The weight [E, out, in] f32, with the kernels' arithmetic (one f32 product per value; int4
        adds its min after)."""
        E, out, in_ = self.shape
        s = jnp.asarray(self.scales, jnp.float32)
        if self.format == "int8":
            return jnp.asarray(self.data).astype(jnp.float32) * s[..., None]
        if self.format == "int4":
            d = jnp.asarray(self.data)
            q = jnp.stack([d & 0xF, d >> 4], axis=-1).reshape(E, out, -1)[..., :in_].astype(jnp.float32)
            scale = jnp.repeat(s[..., 0], self.group, axis=-1)[..., :in_]
            low = jnp.repeat(s[..., 1], self.group, axis=-1)[..., :in_]
            return q * scale + low
        b0, b1 = self.block
        full = jnp.repeat(jnp.repeat(s, b0, axis=1)[:, :out], b1, axis=2)[:, :, :in_]
        return jnp.asarray(self.data).astype(jnp.float32) * full


jax.tree_util.register_dataclass(
    QuantizedWeight, data_fields=["data", "scales"], meta_fields=["format", "shape", "group", "block"]
)


def is_quantized(w: Any) -> bool:
    return isinstance(w, QuantizedWeight)


def parse_spec(spec: str) -> tuple[str, int, tuple[int, int]] | None:
    """A model's ``expert_quant`` text -> (format, group, block), or None for "none".

    "int8"; "int4" (G = 128) or "int4:G" (G in 32, 64, 128); "fp8" (128 x 128 blocks) or "fp8:B0xB1".
    Raises ValueError on anything else."""
    fmt, _, arg = spec.partition(":")
    try:
        if spec == "none":
            return None
        if fmt == "int8" and not arg:
            return "int8", 0, (0, 0)
        if fmt == "int4" and int(arg or 128) in INT4_GROUPS:
            return "int4", int(arg or 128), (0, 0)
        if fmt == "fp8":
            b0, b1 = (int(b) for b in (arg or "128x128").split("x"))
            if b0 >= 1 and b1 >= 1:
                return "fp8", 0, (b0, b1)
    except ValueError:
        pass
    raise ValueError(
        f"expert_quant must be none, int8, int4, int4:G (G in {INT4_GROUPS}), fp8 or fp8:B0xB1, got {spec!r}"
    )


def spec_of(w: QuantizedWeight) -> str:
    """The ``expert_quant`` text of a quantized weight's format (parse_spec's inverse)."""
    if w.format == "int4":
        return f"int4:{w.group}"
    if w.format == "fp8":
        return f"fp8:{w.block[0]}x{w.block[1]}"
    return w.format
