"""Load a local Hugging Face MoE checkpoint (config.json + *.safetensors) into a ktjax model.

Weights stream tensor by tensor into their final arrays: per-expert tensors
(``...experts.{e}.gate_proj.weight`` [I, H], Mixtral's w1/w3/w2) are read straight into slot e of the
stacked [E, I, H] array the kernels use, and the arrays are handed to JAX without a copy, so peak memory
stays close to one copy of the weights. LoRA adapters, which a base checkpoint does not hold, are
initialised (A random, B zero).

Quantized experts (``expert_quant``): each expert's tensor is quantized as it is read, into its slot of
the quantized stack, so no float copy of more than one expert exists. Block-FP8 checkpoints
(``quantization_config``: quant_method fp8, weight_block_size; each FP8 ``...weight`` with its f32
``...weight_scale_inv``) keep their routed experts in FP8 as stored, bytes and scales copied; their other
FP8 weights (attention, dense MLPs, shared experts) are dequantized to the model's dtype at load.
"""

from __future__ import annotations

import json
import pathlib
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ktjax.config import ModelConfig
from ktjax.models.hf_config import config_from_hf, fp8_block, read_hf_config
from ktjax.models.safetensors_io import TensorInfo, aligned_empty, read_header, read_into, to_jax
from ktjax.nn.decoder import MoeForCausalLM
from ktjax.params import ModelDef, Params, is_lora, merge_model, split_model
from ktjax.quant.formats import QuantizedWeight, is_quantized, spec_of
from ktjax.quant.quantize import quantize
from ktjax.sharding import experts_sharding, global_from_local, local_experts

# ktjax's stacked routed-expert parameters, and the per-expert names Hugging Face stores them under.
EXPERT_PARAM = re.compile(
    r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts)\.(gate|up|down)_proj\.(.+)$"
)
MIXTRAL_EXPERT = {"gate": "w1", "down": "w2", "up": "w3"}


def expert_name(style: str, prefix: str, proj: str, expert: int, suffix: str) -> str:
    """Hugging Face name of one expert's tensor: prefix ``model.layers.3.mlp.experts``, proj gate|up|down."""
    module = MIXTRAL_EXPERT[proj] if style == "mixtral" else f"{proj}_proj"
    return f"{prefix}.{expert}.{module}.{suffix}"


def hf_names(cfg: ModelConfig, name: str) -> list[str]:
    """The Hugging Face tensors one ktjax parameter is made of: a list of E per-expert tensors for a
    stacked expert parameter, else the same name."""
    match = EXPERT_PARAM.match(name)
    if not match:
        return [name]
    prefix, proj, suffix = match.groups()
    return [expert_name(cfg.style, prefix, proj, e, suffix) for e in range(cfg.num_experts)]


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors that are not model weights ktjax uses: cached RoPE tables, DeepSeek's
    multi-token-prediction layers (numbered past num_hidden_layers), a tied head stored anyway."""
    layer = re.match(r"^model\.layers\.(\d+)\.", name)
    return (
        name.endswith("rotary_emb.inv_freq")
        or (layer is not None and int(layer.group(1)) >= cfg.num_hidden_layers)
        or (cfg.tie_word_embeddings and name == "lm_head.weight")
    )


def index_checkpoint(path: str | pathlib.Path) -> dict[str, TensorInfo]:
    """Tensor name -> location, over model.safetensors or the shards model.safetensors.index.json lists."""
    path = pathlib.Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes()).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{index}: not a JSON object ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' of tensor names to file names")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_header(path / file))
    return tensors


def abstract_model(cfg: ModelConfig, seed: int = 0) -> tuple[ModelDef, dict[str, jax.ShapeDtypeStruct]]:
    """The model's structure and parameter shapes, without allocating any weights."""
    return split_model(nnx.eval_shape(lambda: MoeForCausalLM(cfg, rngs=nnx.Rngs(seed))))


def _init_lora(name: str, shape: jax.ShapeDtypeStruct, seed: int) -> jax.Array:
    if name.endswith(".lora_B"):
        return jnp.zeros(shape.shape, shape.dtype)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return (jax.random.normal(key, shape.shape) * shape.shape[-1] ** -0.5).astype(shape.dtype)


def scale_name(name: str) -> str:
    """The block-scale tensor that goes with FP8 weight `name` (``...weight`` -> ``...weight_scale_inv``)."""
    return name + "_scale_inv"


def read_scales(tensors: dict[str, TensorInfo], info: TensorInfo, block) -> np.ndarray:
    """The f32 block scales [ceil(out / B0), ceil(in / B1)] of FP8 tensor `info`."""
    scale = tensors.get(scale_name(info.name))
    if scale is None or block is None or len(info.shape) != 2:
        raise ValueError(
            f"{info.path}: FP8 tensor {info.name!r} needs a 2-d shape, a tensor {scale_name(info.name)!r} "
            "and a quantization_config with weight_block_size in config.json"
        )
    (out_dim, in_dim), (b0, b1) = info.shape, block
    want = (-(-out_dim // b0), -(-in_dim // b1))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"{scale.path}: {scale.name!r} has shape {list(scale.shape)}, blocks of {b0}x{b1} over "
            f"{list(info.shape)} need {list(want)}"
        )
    scales = np.empty(want, np.float32)
    read_into(scale, scales)
    return scales


def read_float(tensors: dict[str, TensorInfo], info: TensorInfo, out: np.ndarray, block) -> None:
    """Reads `info` into float array `out`; an FP8 tensor is dequantized with its block scales."""
    if info.code != "F8_E4M3":
        read_into(info, out)
        return
    raw = np.empty(info.shape, info.dtype)
    read_into(info, raw)
    scales = read_scales(tensors, info, block)
    (out_dim, in_dim), (b0, b1) = info.shape, block
    full = np.repeat(np.repeat(scales, b0, axis=0)[:out_dim], b1, axis=1)[:, :in_dim]
    out[...] = (raw.astype(np.float32) * full).astype(out.dtype)


def load_quantized(
    tensors: dict[str, TensorInfo], sources: list[str], target: QuantizedWeight, block
) -> QuantizedWeight:
    """The stacked quantized weight shaped like `target` (a QuantizedWeight of shapes), one expert per
    source tensor (all of target's experts, or a process's share of them): FP8 bytes and scales copied
    when `target` is FP8 with the checkpoint's blocks, else each expert read in f32 and quantized into
    its slot."""
    n = len(sources)
    data = aligned_empty((n, *target.data.shape[1:]), np.dtype(target.data.dtype))
    scales = aligned_empty((n, *target.scales.shape[1:]), np.dtype(target.scales.dtype))
    for e, source in enumerate(sources):
        info = tensors[source]
        if target.format == "fp8" and info.code == "F8_E4M3" and tuple(target.block) == tuple(block or ()):
            read_into(info, data[e])
            scales[e] = read_scales(tensors, info, block)
            continue
        w = np.empty(info.shape, np.float32)
        read_float(tensors, info, w, block)
        q = quantize(w[None], spec_of(target))
        data[e], scales[e] = q.data[0], q.scales[0]
    return QuantizedWeight(
        to_jax(data), to_jax(scales), target.format, (n, *target.shape[1:]), target.group, target.block
    )


def load_params(
    cfg: ModelConfig,
    path: str | pathlib.Path,
    *,
    seed: int = 0,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ModelDef, Params]:
    """Reads the checkpoint at `path` into ktjax's parameter layout for `cfg`. Raises ValueError naming
    the tensor when one is missing, has the wrong shape, or is not used by the model. With `mesh`
    (ktjax.sharding.expert_mesh), each process reads only its own routed experts' tensors into its part
    of global arrays split along E; the other parameters are read whole, as without."""
    defn, shapes = abstract_model(cfg, seed)
    tensors = index_checkpoint(path)
    block = fp8_block(read_hf_config(path))
    # Check names before reading anything, so a mismatched config fails at once, not after the load.
    sources = {name: hf_names(cfg, name) for name in sorted(shapes) if not is_lora(name)}
    for name, names in sources.items():
        missing = [s for s in names if s not in tensors]
        if missing:
            raise ValueError(
                f"{path}: tensor {missing[0]!r} is missing (needed for ktjax parameter {name!r})"
            )
        want = shapes[name].shape if len(names) == 1 else shapes[name].shape[1:]  # stacked: one expert
        for source in names:
            if tuple(tensors[source].shape) != tuple(want):
                raise ValueError(
                    f"{path}: tensor {source!r} has shape {list(tensors[source].shape)}, "
                    f"the config implies {list(want)}"
                )
    used = {s for names in sources.values() for s in names}
    used |= {scale_name(s) for s in used if tensors[s].code == "F8_E4M3"}
    unexpected = sorted(n for n in tensors if n not in used and not _ignorable(n, cfg))
    if unexpected:
        raise ValueError(
            f"{path}: {len(unexpected)} tensors are not used by the {cfg.style} model the config describes, "
            f"e.g. {unexpected[:3]} (a config field such as attention_bias or tie_word_embeddings may be off)"
        )
    params: Params = {n: _init_lora(n, shapes[n], seed) for n in shapes if is_lora(n)}
    layout = experts_sharding(mesh) if mesh is not None else None
    mine = range(cfg.num_experts) if layout is None else local_experts(layout, cfg.num_experts)
    for name in tqdm(sources, desc="loading weights", unit="tensor", disable=not progress, mininterval=1.0):
        target = shapes[name]
        stacked = len(sources[name]) > 1
        split = stacked and len(mine) < cfg.num_experts  # this process's experts only
        names = [sources[name][e] for e in mine] if split else sources[name]
        if is_quantized(target):
            q = load_quantized(tensors, names, target, block)
            if split:
                data, scales = (
                    global_from_local(layout, a, s.shape)
                    for a, s in ((q.data, target.data), (q.scales, target.scales))
                )
                q = QuantizedWeight(data, scales, q.format, target.shape, q.group, q.block)
            params[name] = q
            continue
        array = aligned_empty(
            (len(names), *target.shape[1:]) if split else target.shape, np.dtype(target.dtype)
        )
        slots = list(array) if stacked else [array]  # expert e -> array[e]
        for source, slot in zip(names, slots):
            read_float(tensors, tensors[source], slot, block)
        params[name] = global_from_local(layout, array, target.shape) if split else to_jax(array)
    return defn, params


def from_hf(
    path: str | pathlib.Path,
    *,
    dtype: str = "bfloat16",
    expert_backend: str = "cpu",
    expert_quant: str | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides,
):
    """A MoeForCausalLM with the weights of the Hugging Face model directory `path` (Qwen3-MoE, Mixtral
    or DeepSeek-V3). `dtype`: float32 | bfloat16 for every weight (routers stay f32). `expert_quant`:
    keep the routed experts quantized ("int8", "int4", "int4:G", "fp8", "fp8:B0xB1": ktjax.quant), each
    expert quantized as it is read; None keeps them as stored (FP8 in a block-FP8 checkpoint, else
    `dtype`), "none" loads them in `dtype`. `overrides` set other ModelConfig fields, e.g.
    ``lora_rank=8, lora_targets=("experts",)``.

    ``model(input_ids [B, S] int32) -> logits [B, S, V] f32``; ``model.config`` is the ModelConfig.
    """
    cfg = config_from_hf(
        read_hf_config(path),
        source=str(pathlib.Path(path) / "config.json"),
        param_dtype=dtype,
        expert_backend=expert_backend,
        path=str(path),
        **({} if expert_quant is None else {"expert_quant": expert_quant}),
        **overrides,
    )
    defn, params = load_params(cfg, path, seed=seed, progress=progress)
    return merge_model(defn, params)
