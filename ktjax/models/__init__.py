"""Model configs and constructors."""

from ktjax.models.config import ModelConfig, deepseek_v3, mixtral, qwen3_moe

__all__ = ["ModelConfig", "deepseek_v3", "mixtral", "qwen3_moe", "build_model"]


def build_model(cfg: ModelConfig, seed: int = 0):
    """A randomly initialised MoeForCausalLM for `cfg`."""
    from flax import nnx

    from ktjax.nn.decoder import MoeForCausalLM

    return MoeForCausalLM(cfg, rngs=nnx.Rngs(seed))
