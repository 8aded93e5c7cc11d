"""Write trained weights back in Hugging Face formats.

- ``export_hf``: a model directory (config.json + safetensors, sharded with an index when large) with the
  LoRA adapters folded into the base weights and routed experts split back into per-expert tensors, as
  transformers and ``from_hf`` read it. Quantized expert bases are written dequantized, in the model's
  param_dtype (bf16 by default), one expert at a time.
It streams one tensor at a time, so exporting needs little memory beyond the model itself. The
adapters alone go out as a PEFT adapter: ktjax.models.peft_adapter.export_peft.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from ktjax.config import ModelConfig
from ktjax.models.hf_config import hf_config, read_hf_config
from ktjax.models.hf_load import hf_names
from ktjax.models.safetensors_io import write_file
from ktjax.params import Params, is_lora, merged_weight
from ktjax.quant.formats import is_quantized

# Files of a model directory that travel with the weights (tokenizer, chat template, generation).
SIDECARS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _hf_tensors(params: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) for every merged base weight, experts split per expert (and merged,
    or dequantized, one expert at a time)."""
    dtype = jnp.dtype(cfg.param_dtype)
    for name in sorted(n for n in params if not is_lora(n)):
        targets = hf_names(cfg, name)
        if len(targets) == 1:
            yield targets[0], np.asarray(merged_weight(params, name, cfg.lora_scale, float_dtype=dtype))
            continue
        for e, target in enumerate(targets):
            yield target, np.asarray(merged_weight(params, name, cfg.lora_scale, expert=e, float_dtype=dtype))


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards, current, total = [], [], 0
    for name, size in sizes.items():
        if current and total + size > max_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    return shards + [current]


def export_hf(
    params: Params, cfg: ModelConfig, out_dir: str | pathlib.Path, *, max_shard_bytes: int = 5 * 2**30
) -> pathlib.Path:
    """Writes a Hugging Face model directory with the adapters merged. config.json starts from the one
    at cfg.path (if the model was loaded from there; its tokenizer files are copied too)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = pathlib.Path(cfg.path) if cfg.path else None
    base = read_hf_config(source) if source else None
    (out / "config.json").write_text(json.dumps(hf_config(cfg, base), indent=2))
    for sidecar in SIDECARS if source else ():
        if (source / sidecar).is_file():
            shutil.copyfile(source / sidecar, out / sidecar)

    layout = {}  # HF name -> (dtype, shape), in writing order
    for name in sorted(n for n in params if not is_lora(n)):
        w = params[name]
        targets = hf_names(cfg, name)
        shape = w.shape if len(targets) == 1 else w.shape[1:]
        dtype = np.dtype(cfg.param_dtype) if is_quantized(w) else np.dtype(w.dtype)
        for target in targets:
            layout[target] = (dtype, tuple(shape))
    sizes = {n: int(np.prod(s)) * d.itemsize for n, (d, s) in layout.items()}
    shards = _shards(sizes, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    tensors = _hf_tensors(params, cfg)
    for file, names in zip(files, shards):
        write_file(out / file, (next(tensors) for _ in names), {n: layout[n] for n in names})
    if len(shards) > 1:
        weight_map = {n: f for f, names in zip(files, shards) for n in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
