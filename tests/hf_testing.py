"""Tiny random Hugging Face MoE models (torch + transformers), saved to a directory, for parity tests."""

from __future__ import annotations

import pathlib

import numpy as np

# name -> (transformers config class, model class, config kwargs)
TINY = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            rope_theta=1000.0,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=5,
            tie_word_embeddings=True,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            n_shared_experts=2,
            routed_scaling_factor=2.5,
            q_lora_rank=16,
            kv_lora_rank=12,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=6,
            max_position_embeddings=64,
        ),
    ),
}
# DeepSeek without the query bottleneck and with YaRN rope scaling (as DeepSeek-V3 ships).
TINY["deepseek_v3_yarn"] = (
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    {
        **TINY["deepseek_v3"][2],
        "q_lora_rank": None,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
)


def make_hf_model(kind: str, seed: int = 0):
    """A randomly initialised transformers model with O(1) activations: every weight N(0, 1/fan_in),
    norms 1 + N(0, 0.1), the DeepSeek correction bias N(0, 0.1)."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = TINY[kind]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "e_score_correction_bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, path: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(path)
    return path


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
