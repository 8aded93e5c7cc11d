"""Model presets and constructors: random (build_model) or from a Hugging Face directory (from_hf)."""

import jax
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.models.hf_load import from_hf, load_params
from ktjax.models.presets import deepseek_v3, mixtral, qwen3_moe
from ktjax.nn.decoder import MoeForCausalLM
from ktjax.nn.init import experts_sharded
from ktjax.params import merge_model, split_model
from ktjax.sharding import place_params

__all__ = ["ModelConfig", "deepseek_v3", "mixtral", "qwen3_moe", "build_model", "from_hf"]


def build_model(cfg: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> MoeForCausalLM:
    """A MoeForCausalLM for `cfg`: randomly initialised, or with the weights of the Hugging Face
    checkpoint at cfg.path (then cfg's architecture fields must match that checkpoint's config.json;
    ``ktjax.models.hf_config.config_from_hf`` gives them). With `mesh` (ktjax.sharding.expert_mesh) its
    routed experts are split over the mesh, each process making only its own: random ones drawn with
    the values they have on one device, loaded ones read from their own tensors; the other parameters
    are whole on every process."""
    if cfg.path:
        defn, params = load_params(cfg, cfg.path, seed=seed, mesh=mesh)
        return merge_model(defn, params if mesh is None else place_params(params, mesh))
    if mesh is None:
        return MoeForCausalLM(cfg, rngs=nnx.Rngs(seed))
    with experts_sharded(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(cfg.expert_axis))):
        defn, params = split_model(MoeForCausalLM(cfg, rngs=nnx.Rngs(seed)))
    return merge_model(defn, place_params(params, mesh))
