"""Model configs and constructors: random (build_model) or from a Hugging Face directory (from_hf)."""

from ktjax.models.config import ModelConfig, deepseek_v3, mixtral, qwen3_moe
from ktjax.models.hf_load import from_hf

__all__ = ["ModelConfig", "deepseek_v3", "mixtral", "qwen3_moe", "build_model", "from_hf"]


def build_model(cfg: ModelConfig, seed: int = 0):
    """A MoeForCausalLM for `cfg`: randomly initialised, or with the weights of the Hugging Face
    checkpoint at cfg.path (then cfg's architecture fields must match that checkpoint's config.json;
    ``ktjax.models.hf_config.config_from_hf`` gives them)."""
    from flax import nnx

    from ktjax.nn.decoder import MoeForCausalLM

    if cfg.path:
        from ktjax.models.hf_load import load_params
        from ktjax.params import merge_model

        defn, params = load_params(cfg, cfg.path, seed=seed)
        return merge_model(defn, params)
    return MoeForCausalLM(cfg, rngs=nnx.Rngs(seed))
