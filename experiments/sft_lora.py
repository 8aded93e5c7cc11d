"""LoRA SFT on a jsonl file: a Hugging Face MoE checkpoint (model.path) or a small random model.

    python -m experiments.run sft_lora                       # random Qwen3-MoE-style model, bytes, ~1 min
    python -m experiments.run sft_lora --set model.path=/models/Qwen3-30B-A3B \\
        --set data.path=my_chats.jsonl --set data.seq_len=2048 --set train.steps=500

Data: experiments/data/arithmetic_sft.jsonl (400 arithmetic questions, half as chats, half as
prompt/completion; the loss is on the answers only), packed into rows of data.seq_len tokens. With
model.path set, the model's config.json, weights and tokenizer (tokenizer.json + chat template) are
used; the routed experts get LoRA adapters (the CPU kernels compute only their gradients) and
everything else stays frozen. The adapters are written in PEFT format to <run dir>/peft_adapter;
``--set export_merged=true`` also writes a merged Hugging Face model directory.
"""

import pathlib

from ktjax.experiment import DataConfig, ExperimentConfig
from ktjax.models import qwen3_moe
from ktjax.optim import GroupConfig
from ktjax.train import TrainConfig

DATA = pathlib.Path(__file__).parent / "data" / "arithmetic_sft.jsonl"


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="sft_lora",
        mode="lora",
        # Used as given without model.path; with it, only dtype, backend and the LoRA fields apply.
        model=qwen3_moe(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            lora_rank=16,
            lora_alpha=32.0,
            lora_targets=("experts", "q_proj", "v_proj", "o_proj"),
        ),
        data=DataConfig(path=str(DATA), seq_len=128, eval_fraction=0.1),
        train=TrainConfig(
            steps=200,
            batch_size=16,
            eval_every=100,
            eval_batch_size=32,
            checkpoint_every=100,
            groups={"lora": GroupConfig(lr_peak=1e-2, warmup_steps=20)},
        ),
    )
