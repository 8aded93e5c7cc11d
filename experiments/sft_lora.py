"""SFT with LoRA experts on a jsonl file: a small random model learns to uppercase words, or a HF MoE.

    python -m experiments.run sft_lora                       # random Qwen3-MoE-style model, bytes, ~2 min
    python -m ktjax.generate --run runs/sft_lora/<stamp> --prompt $'Uppercase: hello\nAnswer: '
    python -m experiments.run sft_lora --set model.path=/models/Qwen3-30B-A3B --set mode=lora \\
        --set data.path=my_chats.jsonl --set data.seq_len=2048 --set train.steps=500

Data: experiments/data/uppercase_sft.jsonl (2000 requests to uppercase a random 3-6 letter word, half
as chats, half as prompt/completion; experiments/data/make_uppercase_sft.py writes it; the loss is on
the answers only), packed into rows of data.seq_len tokens. Held-out requests are answered by greedy
generation before and after training (generated_exact_match): about 0 before, most of them after.

The random model trains in hybrid mode: attention and routers in full, the routed experts through
LoRA adapters (the CPU kernels compute only the adapters' gradients). A random base has nothing for
adapters alone to steer: trained through LoRA only, the same model does not learn the task in this
time. With model.path set, the model's config.json, weights and tokenizer (tokenizer.json + chat
template) are used; ``--set mode=lora`` trains the adapters alone (add attention adapters with
``--set model.lora_targets=experts,q_proj,v_proj,o_proj``). The adapters are written in PEFT format to
<run dir>/peft_adapter; ``--set export_merged=true`` also writes a merged Hugging Face model directory.
"""

import pathlib

from ktjax.experiment import DataConfig, ExperimentConfig
from ktjax.models import qwen3_moe
from ktjax.optim import GroupConfig
from ktjax.train import TrainConfig

DATA = pathlib.Path(__file__).parent / "data" / "uppercase_sft.jsonl"


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="sft_lora",
        mode="hybrid",
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
            lora_targets=("experts",),
        ),
        data=DataConfig(path=str(DATA), seq_len=128, eval_fraction=0.05),
        train=TrainConfig(
            steps=400,
            batch_size=16,
            eval_every=100,
            eval_batch_size=32,
            checkpoint_every=100,
            groups={
                "full": GroupConfig(lr_peak=3e-3, warmup_steps=20),
                "lora": GroupConfig(lr_peak=1e-2, warmup_steps=20),
            },
        ),
    )
