"""Model presets and constructors: random (build_model) or from a Hugging Face directory (from_hf)."""

from flax import nnx

from ktjax.config import ModelConfig
from ktjax.models.hf_load import from_hf, load_params
from ktjax.models.presets import deepseek_v3, mixtral, qwen3_moe
from ktjax.nn.decoder import MoeForCausalLM
from ktjax.params import merge_model

__all__ = ["ModelConfig", "deepseek_v3", "mixtral", "qwen3_moe", "build_model", "from_hf"]


def build_model(cfg: ModelConfig, seed: int = 0) -> MoeForCausalLM:
    """A MoeForCausalLM for `cfg`: randomly initialised, or with the weights of the Hugging Face
    checkpoint at cfg.path (then cfg's architecture fields must match that checkpoint's config.json;
    ``ktjax.models.hf_config.config_from_hf`` gives them)."""
    if cfg.path:
        defn, params = load_params(cfg, cfg.path, seed=seed)
        return merge_model(defn, params)
    return MoeForCausalLM(cfg, rngs=nnx.Rngs(seed))
