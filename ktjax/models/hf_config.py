"""Hugging Face ``config.json`` <-> ModelConfig, for Qwen3-MoE, Mixtral and DeepSeek-V3.

Reads both the transformers 4.x (``rope_theta`` / ``rope_scaling``) and 5.x (``rope_parameters``)
spellings. Anything the ktjax model cannot reproduce exactly is refused with the field named, rather
than loaded into a model that would compute something else.
"""

from __future__ import annotations

import json
import pathlib

from ktjax.config import ModelConfig

ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
MODEL_TYPES = {style: style for style in ARCHITECTURES.values()}


def read_hf_config(path: str | pathlib.Path) -> dict:
    """The parsed config.json of a model directory."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        hf = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def style_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if hf.get("model_type") in MODEL_TYPES:
        return hf["model_type"]
    raise ValueError(
        f"unsupported architecture {archs or hf.get('model_type')!r}; ktjax loads {sorted(ARCHITECTURES)}"
    )


def _rope(hf: dict) -> tuple[float, dict | None]:
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return theta, (None if kind == "default" else {**scaling, "rope_type": kind})


def config_from_hf(hf: dict, *, source: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig for a parsed config.json; `overrides` set non-architecture fields (param_dtype,
    expert_backend, lora_rank, ...). A missing or mistyped field is a ValueError naming `source` and
    the field."""
    _check_types(hf, source)
    try:
        return _config_from_hf(hf, overrides)
    except KeyError as e:
        raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# config.json fields read as numbers (when present and not null).
INT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "num_experts_per_tok", "num_experts", "num_local_experts", "n_routed_experts",
    "moe_intermediate_size", "intermediate_size", "decoder_sparse_step", "sliding_window", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace",
    "n_shared_experts", "n_group", "topk_group",
)  # fmt: skip
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")


def _check_types(hf: dict, source: str) -> None:
    """Every number config_from_hf reads has a number's type (bools are not numbers here)."""
    for key in INT_FIELDS + FLOAT_FIELDS:
        value = hf.get(key)
        kinds = (int,) if key in INT_FIELDS else (int, float)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            want = "an integer" if key in INT_FIELDS else "a number"
            raise ValueError(f"{source}: {key} must be {want}, got {value!r}")
    layers = hf.get("mlp_only_layers") or []
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"{source}: mlp_only_layers must list layer numbers, got {layers!r}")


def fp8_block(hf: dict) -> tuple[int, int] | None:
    """(B0, B1) of a block-FP8 checkpoint's ``quantization_config`` (quant_method fp8,
    weight_block_size), None for an unquantized one. Raises ValueError for another quantization."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ValueError(
            f"quantization_config: quant_method {method!r} is not supported (fp8 with block scales)"
        )
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(
            f"quantization_config: weight_block_size must be two positive integers, got {block!r}"
        )
    return block[0], block[1]


def _config_from_hf(hf: dict, overrides: dict) -> ModelConfig:
    style = style_of(hf)
    block = fp8_block(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    common = dict(
        style=style,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings") or 4096,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        num_experts_per_tok=hf["num_experts_per_tok"],
        # an FP8 checkpoint's experts stay FP8 (as stored) unless the caller asks for another format
        expert_quant=f"fp8:{block[0]}x{block[1]}" if block else "none",
    )
    if style == "qwen3_moe":
        arch = dict(
            qk_norm=True,
            num_experts=hf.get("num_experts") or hf["num_local_experts"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            intermediate_size=hf["intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            decoder_sparse_step=hf.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            sliding_window=(hf.get("sliding_window") or 0) if hf.get("use_sliding_window") else 0,
        )
    elif style == "mixtral":
        arch = dict(
            qk_norm=False,
            num_experts=hf["num_local_experts"],
            moe_intermediate_size=hf["intermediate_size"],
            intermediate_size=hf["intermediate_size"],
            norm_topk_prob=True,
            sliding_window=hf.get("sliding_window") or 0,
        )
    else:
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"scoring_func {hf['scoring_func']!r} is not supported (sigmoid)")
        arch = dict(
            attention="mla",
            qk_norm=False,
            num_key_value_heads=heads,  # latent attention expands keys/values to every head
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_interleave=bool(hf.get("rope_interleave", True)),
            num_experts=hf.get("n_routed_experts") or hf["num_local_experts"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            intermediate_size=hf["intermediate_size"],
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            n_shared_experts=hf.get("n_shared_experts") or 0,
            scoring_func="sigmoid",
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        )
    return ModelConfig(**{**common, **arch, **overrides})


def hf_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """A config.json for `cfg` that transformers (and ``config_from_hf``) read back to the same model.
    `base`: the config.json the model was loaded from; its other fields are kept."""
    if cfg.style == "deepseek_v3" and cfg.attention != "mla":
        raise ValueError("a deepseek_v3 model with attention='gqa' has no Hugging Face equivalent")
    if cfg.style == "qwen3_moe" and not cfg.qk_norm:
        raise ValueError("a qwen3_moe model without qk_norm has no Hugging Face equivalent")
    if cfg.style == "mixtral" and (cfg.qk_norm or not cfg.norm_topk_prob):
        raise ValueError("a mixtral model needs qk_norm=False and norm_topk_prob=True")
    arch = {v: k for k, v in ARCHITECTURES.items()}[cfg.style]
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    out = dict(base or {})
    out.update(
        architectures=[arch],
        model_type=cfg.style,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        num_experts_per_tok=cfg.num_experts_per_tok,
        hidden_act="silu",
        dtype=cfg.param_dtype,
        torch_dtype=cfg.param_dtype,
    )
    out.pop("rope_scaling", None)
    out.pop("quantization_config", None)  # exports are dequantized (ktjax.models.hf_export)
    if cfg.style == "qwen3_moe":
        out.update(
            head_dim=cfg.head_dim,
            num_experts=cfg.num_experts,
            moe_intermediate_size=cfg.moe_intermediate_size,
            intermediate_size=cfg.intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers) + list(range(cfg.first_k_dense_replace)),
            use_sliding_window=bool(cfg.sliding_window),
            sliding_window=cfg.sliding_window or None,
        )
    elif cfg.style == "mixtral":
        if cfg.first_k_dense_replace or cfg.mlp_only_layers or cfg.decoder_sparse_step != 1:
            raise ValueError("a mixtral model has routed experts in every layer")
        out.update(
            head_dim=cfg.head_dim,
            num_local_experts=cfg.num_experts,
            intermediate_size=cfg.moe_intermediate_size,
            sliding_window=cfg.sliding_window or None,
        )
    else:
        out.update(
            q_lora_rank=cfg.q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            head_dim=cfg.qk_rope_head_dim,
            rope_interleave=cfg.rope_interleave,
            n_routed_experts=cfg.num_experts,
            moe_intermediate_size=cfg.moe_intermediate_size,
            intermediate_size=cfg.intermediate_size,
            first_k_dense_replace=cfg.first_k_dense_replace,
            n_shared_experts=cfg.n_shared_experts,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
            norm_topk_prob=cfg.norm_topk_prob,
        )
    return out
