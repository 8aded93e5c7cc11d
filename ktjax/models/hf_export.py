"""Write trained weights back in Hugging Face formats.

- ``export_hf``: a model directory (config.json + safetensors, sharded with an index when large) with the
  LoRA adapters folded into the base weights and routed experts split back into per-expert tensors, as
  transformers and ``from_hf`` read it. Quantized expert bases are written dequantized, in the model's
  param_dtype (bf16 by default), one expert at a time.
- ``export_peft``: the adapters alone as a PEFT LoRA adapter (adapter_config.json +
  adapter_model.safetensors), each routed expert's adapter under that expert's module name.

Both stream one tensor at a time, so exporting needs little memory beyond the model itself.
"""

from __future__ import annotations

import json
import pathlib
import re
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


def peft_module(cfg: ModelConfig, lora_name: str) -> list[str]:
    """PEFT module names of one ktjax adapter (``...q_proj.lora_A``): one per expert for routed experts."""
    base = lora_name.rsplit(".", 1)[0]
    return [n[: -len(".weight")] for n in hf_names(cfg, base + ".weight")]


def _module_pattern(module: str) -> str:
    """A regex for the module name with layer and expert indices generalised."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in module.split("."))


def export_peft(params: Params, cfg: ModelConfig, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes the adapters as a PEFT LoRA adapter directory: tensors
    ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r], and an
    adapter_config.json whose target_modules regex matches exactly the adapted modules."""
    adapters = sorted(n for n in params if is_lora(n))
    if not adapters:
        raise ValueError("the parameters hold no LoRA adapters (names ending in .lora_A / .lora_B)")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout, arrays, modules = {}, {}, set()
    for name in adapters:
        kind = name.rsplit(".", 1)[1]  # lora_A | lora_B
        value = np.asarray(params[name])
        per_module = peft_module(cfg, name)
        for i, module in enumerate(per_module):
            key = f"base_model.model.{module}.{kind}.weight"
            arrays[key] = value if len(per_module) == 1 else value[i]
            layout[key] = (arrays[key].dtype, arrays[key].shape)
            modules.add(_module_pattern(module))
    write_file(out / "adapter_model.safetensors", arrays.items(), layout)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.path or None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "target_modules": "(" + "|".join(sorted(modules)) + ")",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
