"""Export trained weights as safetensors: LoRA adapters alone, or merged into the base weights.

Names are ktjax's dotted parameter names (Hugging Face-style, routed experts stacked [E, ...]).
"""

from __future__ import annotations

import pathlib

import numpy as np
import safetensors.numpy

from ktjax.params import Params, is_lora, merge_lora


def export_lora(params: Params, path: str | pathlib.Path) -> list[str]:
    """Writes only the adapters (``*.lora_A`` [.., r, in], ``*.lora_B`` [.., out, r]); returns their names."""
    adapters = {n: np.asarray(v) for n, v in params.items() if is_lora(n)}
    if not adapters:
        raise ValueError("the parameters hold no LoRA adapters (names ending in .lora_A / .lora_B)")
    safetensors.numpy.save_file(adapters, str(path))
    return sorted(adapters)


def export_merged(params: Params, lora_scale: float, path: str | pathlib.Path) -> list[str]:
    """Writes every weight with the adapters folded in (W + scale * B A); returns the names written."""
    merged = {n: np.asarray(v) for n, v in merge_lora(params, lora_scale).items()}
    safetensors.numpy.save_file(merged, str(path))
    return sorted(merged)


def load_weights(path: str | pathlib.Path) -> Params:
    """Reads a safetensors file written by the functions above."""
    return dict(safetensors.numpy.load_file(str(path)))
