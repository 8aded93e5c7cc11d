"""LoRA adapters as PEFT adapter directories (adapter_config.json + adapter_model.safetensors), both ways.

Two layouts of the routed experts' adapters:

- ``"fused"`` (the default): transformers 5 keeps each MoE layer's routed experts as two fused
  parameters, ``model.layers.N.mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
  ``down_proj`` [E, H, I] (Mixtral too), and peft reaches them through ``target_parameters``: one LoRA
  per parameter, A stored [E * r, in] (expert e's rows e*r .. e*r + r - 1) and B [out, r * E] (expert e's
  column k at k * E + e). ktjax's separate gate and up adapters (rank r each) become one rank-2r adapter
  of gate_up_proj, exactly: A = [A_gate; A_up] and B block-diagonal, [[B_gate, 0], [0, B_up]], so that
  B A = [B_gate A_gate; B_up A_up]; ``rank_pattern`` and ``alpha_pattern`` give it rank 2r and alpha 2
  alpha, the same scale alpha / r. peft wraps gate_up_proj first (the experts' module's first parameter),
  so its tensors are named ``...experts.base_layer.lora_A.weight`` and down_proj's ``...experts.lora_A
  .weight``.
- ``"per_expert"``: transformers 4's per-expert modules (``...experts.3.down_proj``, Mixtral's
  ``block_sparse_moe.experts.3.w2``) through ``target_modules``, one rank-r adapter per expert.

Other adapters (attention, dense MLPs, shared experts) are plain modules under ``target_modules`` in
both layouts.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from ktjax.config import ModelConfig
from ktjax.models.hf_load import EXPERT_PARAM, hf_names
from ktjax.models.safetensors_io import read_header, read_into, write_file
from ktjax.params import Params, is_lora

LAYOUTS = ("fused", "per_expert")
PREFIX = "base_model.model."
# the fused parameters peft targets; gate_up_proj's adapter has twice the rank
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _module_pattern(module: str) -> str:
    """A regex for the module name with layer and expert indices generalised."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in module.split("."))


def _fused_key(layer: str, projection: str, kind: str) -> str:
    """The peft tensor name of a fused expert adapter: projection gate_up | down, kind A | B."""
    wrapper = ".base_layer" if projection == "gate_up" else ""
    return f"{PREFIX}model.layers.{layer}.mlp.experts{wrapper}.lora_{kind}.weight"


def _fused_tensors(params: Params, experts: str) -> dict[str, np.ndarray]:
    """The peft tensors of one MoE layer's routed-expert adapters (ktjax name prefix `experts`)."""
    get = {
        f"{p}_{k}": np.asarray(params[f"{experts}.{p}_proj.lora_{k}"])
        for p in ("gate", "up", "down")
        for k in "AB"
    }  # noqa: E501
    E, r, _ = get["gate_A"].shape
    inter = get["gate_B"].shape[1]
    b = np.zeros((E, 2 * inter, 2 * r), get["gate_B"].dtype)
    b[:, :inter, :r], b[:, inter:, r:] = get["gate_B"], get["up_B"]
    a = np.concatenate([get["gate_A"], get["up_A"]], axis=1)  # [E, 2r, H]
    layer = experts.split(".")[2]
    return {
        _fused_key(layer, "gate_up", "A"): a.reshape(E * 2 * r, -1),
        _fused_key(layer, "gate_up", "B"): b.transpose(1, 2, 0).reshape(2 * inter, 2 * r * E),
        _fused_key(layer, "down", "A"): get["down_A"].reshape(E * r, -1),
        _fused_key(layer, "down", "B"): get["down_B"].transpose(1, 2, 0).reshape(-1, r * E),
    }


def export_peft(
    params: Params, cfg: ModelConfig, out_dir: str | pathlib.Path, *, layout: str = "fused"
) -> pathlib.Path:
    """Writes the adapters in `params` (names ending .lora_A / .lora_B) as a PEFT LoRA adapter
    directory that peft loads onto the base model (``PeftModel.from_pretrained``): `layout` "fused"
    for transformers 5 (module docstring), "per_expert" for transformers 4."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    adapters = sorted(n for n in params if is_lora(n))
    if not adapters:
        raise ValueError("the parameters hold no LoRA adapters (names ending in .lora_A / .lora_B)")
    arrays, modules, fused_layers = {}, set(), set()
    for name in adapters:
        base, kind = name.rsplit(".", 1)  # kind: lora_A | lora_B
        expert = EXPERT_PARAM.match(base + ".weight")
        if expert and layout == "fused":
            fused_layers.add(expert.group(1))
            continue
        value = np.asarray(params[name])
        per_module = [n[: -len(".weight")] for n in hf_names(cfg, base + ".weight")]
        for i, module in enumerate(per_module):
            arrays[f"{PREFIX}{module}.{kind}.weight"] = value if len(per_module) == 1 else value[i]
            modules.add(_module_pattern(module))
    for experts in sorted(fused_layers):
        arrays.update(_fused_tensors(params, experts))
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_file(
        out / "adapter_model.safetensors", arrays.items(), {k: (v.dtype, v.shape) for k, v in arrays.items()}
    )
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
        "target_modules": "(" + "|".join(sorted(modules)) + ")" if modules else [],
    }
    if fused_layers:
        config.update(
            target_parameters=list(FUSED),
            rank_pattern={"gate_up_proj": 2 * cfg.lora_rank},
            alpha_pattern={"gate_up_proj": 2 * cfg.lora_alpha},
        )
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def read_peft_config(adapter_dir: str | pathlib.Path) -> tuple[int, float, tuple[str, ...]]:
    """(rank, alpha, ktjax lora_targets) of a PEFT LoRA adapter directory written by ``export_peft``."""
    path = pathlib.Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a PEFT adapter directory: it has no adapter_config.json"
        )
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{path}: only plain LoRA adapters are read (peft_type LORA, no rsLoRA or DoRA)")
    names = _tensor_names(pathlib.Path(adapter_dir))
    targets = set()
    for name in names:
        module = name[len(PREFIX) :].split(".lora_")[0]
        if ".experts" in module:
            targets.add("experts")
        else:
            targets.add(module.rsplit(".", 1)[-1])
    return int(config["r"]), float(config["lora_alpha"]), tuple(sorted(targets))


def _tensor_names(adapter_dir: pathlib.Path) -> list[str]:
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
    return sorted(read_header(file))


def read_peft(adapter_dir: str | pathlib.Path, cfg: ModelConfig, expected: Params) -> Params:
    """The adapters of a PEFT directory (either layout) as ktjax parameters, for the model `cfg` whose
    adapter parameters are `expected` (name -> array, or anything with a shape). Raises ValueError
    naming the tensor when the adapter does not fit that model: a tensor it has no place for, a missing
    one, or a wrong shape (an adapter trained for another base model)."""
    file = pathlib.Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
    tensors = {name: _read(info) for name, info in read_header(file).items()}
    out: Params = {}
    used: set[str] = set()
    for name in sorted(n for n in expected if is_lora(n)):
        shape = tuple(expected[name].shape)
        base, kind = name.rsplit(".", 1)
        expert = EXPERT_PARAM.match(base + ".weight")
        layer = expert.group(1).split(".")[2] if expert else ""
        if expert and _fused_key(layer, "down", "A") in tensors:
            keys = [_fused_key(layer, "down" if expert.group(2) == "down" else "gate_up", kind[-1])]
            if keys[0] not in tensors:
                raise ValueError(f"{file}: no tensor {keys[0]} for the model's adapter {name}")
            value = _unfuse(tensors[keys[0]], expert.group(2), kind[-1], shape, f"{file}: {keys[0]}")
        else:
            keys = [f"{PREFIX}{m[: -len('.weight')]}.{kind}.weight" for m in hf_names(cfg, base + ".weight")]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ValueError(f"{file}: no tensor {missing[0]} for the model's adapter {name}")
            value = tensors[keys[0]] if len(keys) == 1 else np.stack([tensors[k] for k in keys])
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{file}: the adapter {name} has shape {tuple(value.shape)}, the model expects {shape} "
                "(an adapter trained for another base model?)"
            )
        out[name] = value.astype(expected[name].dtype)
        used.update(keys)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{file}: tensor {unused[0]} has no place in the model (another base model?)")
    return out


def _read(info) -> np.ndarray:
    out = np.empty(info.shape, info.dtype)
    read_into(info, out)
    return out


def _unfuse(flat: np.ndarray, proj: str, kind: str, shape: tuple, what: str) -> np.ndarray:
    """One ktjax expert adapter ([E, r, in] for A, [E, out, r] for B) from its fused peft tensor."""
    E, r = shape[0], shape[1] if kind == "A" else shape[2]
    if proj == "down":
        if kind == "A":
            return flat.reshape(E, r, -1) if flat.shape[0] == E * r else flat
        return flat.reshape(flat.shape[0], r, E).transpose(2, 0, 1) if flat.shape[1] == r * E else flat
    gate = proj == "gate"
    if kind == "A":
        if flat.shape[0] != E * 2 * r:
            return flat
        a = flat.reshape(E, 2 * r, -1)
        return a[:, :r] if gate else a[:, r:]
    if flat.shape[1] != 2 * r * E or flat.shape[0] % 2:
        return flat
    b = flat.reshape(flat.shape[0], 2 * r, E).transpose(2, 0, 1)  # [E, 2I, 2r]
    inter = b.shape[1] // 2
    if np.any(b[:, :inter, r:]) or np.any(b[:, inter:, :r]):
        raise ValueError(f"{what}: gate_up_proj's B is not block-diagonal: not separate gate and up adapters")
    return b[:, :inter, :r] if gate else b[:, inter:, r:]
