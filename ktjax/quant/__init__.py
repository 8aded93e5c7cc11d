"""Quantized frozen expert weights: int8 per row, int4 per group, fp8 e4m3 per block (formats.py), and
their quantizers (quantize.py). The CPU kernels dequantize them where they read them."""

from ktjax.quant.formats import FORMATS, INT4_GROUPS, QuantizedWeight, is_quantized
from ktjax.quant.quantize import fp8_weight, quantize, quantize_fp8, quantize_int4, quantize_int8

__all__ = [
    "FORMATS",
    "INT4_GROUPS",
    "QuantizedWeight",
    "fp8_weight",
    "is_quantized",
    "quantize",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
]
