"""Presets of the supported architectures: a ModelConfig with each family's defaults, fields overridable."""

from __future__ import annotations

from ktjax.config import ModelConfig


def qwen3_moe(**overrides) -> ModelConfig:
    """Qwen3-MoE: softmax top-k with norm_topk_prob, no shared experts, GQA with q/k RMSNorm, RoPE."""
    return ModelConfig(style="qwen3_moe", **overrides)


def deepseek_v3(**overrides) -> ModelConfig:
    """DeepSeek-V3 layout: multi-head latent attention, sigmoid scoring with correction bias,
    group-limited top-k, a shared expert, first layer dense."""
    defaults = dict(
        style="deepseek_v3",
        attention="mla",
        scoring_func="sigmoid",
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        qk_norm=False,
    )
    return ModelConfig(**{**defaults, **overrides})


def mixtral(**overrides) -> ModelConfig:
    """Mixtral: softmax top-2 over 8 experts, GQA, no q/k norm."""
    defaults = dict(style="mixtral", num_experts=8, num_experts_per_tok=2, qk_norm=False)
    return ModelConfig(**{**defaults, **overrides})
