"""Default: a 3.75M-parameter MoE learns to sort digits; attention full, experts LoRA; ~15-25 s on 2 cores.

    python -m experiments.run sort_hybrid            (or just: python -m experiments.run)
    python -m experiments.run sort_hybrid --set train.steps=100 --set model.num_hidden_layers=2

A Qwen3-MoE-style model (4 layers, 16 routed experts, top-2) trains in hybrid mode: attention and
routers in full, the routed experts through per-expert LoRA adapters (the CPU kernels compute the
adapters' gradients and skip the frozen expert weights'), embeddings and head frozen. The eval at the
start and the end shows what was learned: accuracy on the sorted half of held-out sequences.
"""

from ktjax.experiment import DataConfig, ExperimentConfig
from ktjax.models import qwen3_moe
from ktjax.optim import GroupConfig
from ktjax.train import TrainConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="sort_hybrid",
        mode="hybrid",
        model=qwen3_moe(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=16,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            lora_rank=8,
            lora_alpha=16.0,
            lora_targets=("experts",),
        ),
        data=DataConfig(length=8, num_values=10),
        train=TrainConfig(
            steps=300,
            batch_size=32,
            eval_every=100,
            checkpoint_every=150,
            groups={
                "full": GroupConfig(lr_peak=3e-3, warmup_steps=20),
                "lora": GroupConfig(lr_peak=3e-3, warmup_steps=20),
            },
        ),
    )
