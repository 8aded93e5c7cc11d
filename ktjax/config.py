"""Model configuration: one dataclass covering the Qwen3-MoE, DeepSeek-V3 and Mixtral layouts.

Depends on nothing else in ktjax: ``ktjax.nn`` builds modules from it, ``ktjax.models`` holds the
presets (``qwen3_moe``, ``deepseek_v3``, ``mixtral``), Hugging Face I/O and ``build_model``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

STYLES = ("qwen3_moe", "deepseek_v3", "mixtral")
# Module names a LoRA target list may contain; "experts" adapts the routed experts' gate/up/down.
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",  # multi-head latent attention (DeepSeek-V3) ...
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "gate_proj",  # dense MLPs and shared experts
    "up_proj",
    "down_proj",
    "experts",
)
ATTENTIONS = ("gqa", "mla")
REMAT_POLICIES = ("off", "full", "experts")  # ModelConfig.remat
ATTENTION_BACKENDS = ("cpu", "blockwise", "xla")  # ModelConfig.attention_backend (ktjax.ops.attention)
ROPE_TYPES = ("default", "yarn")  # rope_scaling types the models compute (ktjax.nn.rope)
# expert_quant values (ktjax.quant.formats.parse_spec reads them)
EXPERT_QUANT = re.compile(r"none|int8|int4(:(32|64|128))?|fp8(:[1-9]\d*x[1-9]\d*)?")


def rope_type(rope_scaling: dict | None) -> str:
    """The scaling type of Hugging Face's ``rope_scaling`` dict (None: "default"); NotImplementedError for
    a type ktjax cannot compute."""
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if kind not in ROPE_TYPES:
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (supported: {ROPE_TYPES})")
    return kind


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer. Field names follow the Hugging Face configs where they exist."""

    style: str = "qwen3_moe"  # parameter naming and defaults: qwen3_moe | deepseek_v3 | mixtral
    vocab_size: int = 32
    hidden_size: int = 64  # H
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA: heads share K/V in groups
    head_dim: int = 16
    qk_norm: bool = True  # RMSNorm on q and k per head (Qwen3)
    attention_bias: bool = False  # biases on the attention projections
    sliding_window: int = 0  # >0: a query sees only the last `sliding_window` keys (Mixtral, Qwen3)
    attention: str = "gqa"  # gqa | mla (DeepSeek's multi-head latent attention, fields below)
    # cpu (the flash attention kernels, memory linear in the sequence) | blockwise (the same tiles in JAX)
    # | xla (dense [S, S] reference)
    attention_backend: str = "cpu"
    # auto | f32 | bf16: q, k and v as the attention reads them (attention_dtype). auto: bf16 for bf16
    # weights on the cpu backend (its kernels then multiply bf16 pairs, as a bf16 model's attention does
    # in torch), f32 otherwise
    attention_inputs: str = "auto"
    q_lora_rank: int = 0  # mla: 0 = a plain q_proj, else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 16  # mla: width of the compressed key/value latent
    qk_nope_head_dim: int = 16  # mla: per-head query/key width without position encoding
    qk_rope_head_dim: int = 8  # mla: per-head query/key width with RoPE (the rope key is shared)
    v_head_dim: int = 16  # mla: per-head value width
    rope_interleave: bool = True  # mla: RoPE pairs are interleaved (x0, x1), (x2, x3), ...
    rope_theta: float = 10000.0
    # None, or Hugging Face's rope_scaling dict; supported: {"rope_type": "yarn", "factor", ...}
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096  # the context: generation refuses prompts that leave no room
    num_experts: int = 8  # E, routed experts per MoE layer
    num_experts_per_tok: int = 2  # K
    moe_intermediate_size: int = 32  # I, per routed expert
    intermediate_size: int = 128  # dense MLP layers (first_k_dense_replace)
    first_k_dense_replace: int = 0  # the first N layers use a dense MLP (DeepSeek-V3)
    decoder_sparse_step: int = 1  # Qwen3-MoE: layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    n_shared_experts: int = 0  # shared experts beside the routed ones (DeepSeek-V3)
    scoring_func: str = "softmax"  # softmax | sigmoid (DeepSeek-V3, with e_score_correction_bias)
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1
    n_group: int = 1  # group-limited routing: experts in n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups are eligible
    routed_scaling_factor: float = 1.0
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"  # float32 | bfloat16: dtype of every weight
    expert_backend: str = "cpu"  # cpu (FFI kernels) | xla (pure JAX)
    expert_policy: str = "retain"  # retain | recompute (activations saved for the expert backward)
    # auto | f32 | bf16: the expert chain's intermediates (moe_experts(intermediates=...)). auto: bf16
    # for bf16 weights on the cpu backend, f32 otherwise; bf16 needs bf16 weights and the cpu backend.
    expert_intermediates: str = "auto"
    # none | int8 | int4[:G] | fp8[:B0xB1]: routed experts' frozen base weights kept quantized
    # (ktjax.quant; G in 32, 64, 128, default 128; fp8 blocks default 128x128). Never trained.
    expert_quant: str = "none"
    # off | full | experts: each decoder layer's activations recomputed in the backward (ktjax.nn.remat)
    # instead of kept from the forward, so a step holds one layer's at a time; experts recomputes only the
    # attention (the MoE block keeps its saved intermediates), full the whole layer
    remat: str = "off"
    # Expert parallelism: the jax.shard_map mesh axis the routed experts are split over (each shard holds
    # num_experts / P of them; ktjax.ops.moe_experts_sharded sends each routing slot to its expert's
    # shard). "": every expert on this device.
    expert_axis: str = ""
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # subset of LORA_TARGETS
    # A Hugging Face model directory: build_model loads it (ktjax.models.from_hf), and its config.json
    # replaces the architecture fields above; dtype, backend, policy and LoRA fields still apply.
    path: str = ""

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be softmax or sigmoid, got {self.scoring_func!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError("num_experts must divide into n_group groups and topk_group <= n_group")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError("num_experts_per_tok must be in [1, num_experts]")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown lora_targets {sorted(unknown)}; allowed: {LORA_TARGETS}")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"param_dtype must be float32 or bfloat16, got {self.param_dtype!r}")
        if self.expert_intermediates not in ("auto", "f32", "bf16"):
            raise ValueError(
                f"expert_intermediates must be auto, f32 or bf16, got {self.expert_intermediates!r}"
            )
        bf16_mid_ok = (self.param_dtype, self.expert_backend) == ("bfloat16", "cpu")
        if self.expert_intermediates == "bf16" and not bf16_mid_ok:
            raise ValueError(
                "expert_intermediates='bf16' needs param_dtype='bfloat16' and expert_backend='cpu', got "
                f"{self.param_dtype!r} and {self.expert_backend!r}"
            )
        if not EXPERT_QUANT.fullmatch(self.expert_quant):
            raise ValueError(
                "expert_quant must be none, int8, int4, int4:G (G in 32, 64, 128), fp8 or fp8:B0xB1, "
                f"got {self.expert_quant!r}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.attention_inputs not in ("auto", "f32", "bf16"):
            raise ValueError(f"attention_inputs must be auto, f32 or bf16, got {self.attention_inputs!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.max_position_embeddings < 2:
            raise ValueError(f"max_position_embeddings must be >= 2, got {self.max_position_embeddings}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        rope_type(self.rope_scaling)  # refuses scaling types the model cannot compute
        self.lora_targets = tuple(self.lora_targets)
        self.mlp_only_layers = tuple(self.mlp_only_layers)

    @property
    def attention_dtype(self) -> str:
        """The dtype q, k and v are rounded to before the attention: "bfloat16" or "float32"."""
        if self.attention_inputs == "auto":
            bf16 = (self.param_dtype, self.attention_backend) == ("bfloat16", "cpu")
        else:
            bf16 = self.attention_inputs == "bf16"
        return "bfloat16" if bf16 else "float32"

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def lora_rank_for(self, target: str) -> int:
        return self.lora_rank if target in self.lora_targets else 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has routed experts (else a dense MLP of intermediate_size)."""
        return (
            layer >= self.first_k_dense_replace
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
