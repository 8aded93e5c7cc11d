"""Top-k routers: softmax (Qwen3-MoE, Mixtral) and sigmoid with correction bias and group-limited
selection (DeepSeek-V3). Weights and logits in f32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.expert_axis import axis_bound


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, H = cfg.num_experts, cfg.hidden_size
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (E, H), jnp.float32) * H**-0.5)
        # DeepSeek-V3 adjusts this bias outside of gradient descent (auxiliary-loss-free balancing).
        self.e_score_correction_bias = (
            nnx.Param(jnp.zeros((E,), jnp.float32)) if cfg.scoring_func == "sigmoid" else None
        )
        self.cfg = cfg

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
        """x: [T, H]; token_mask: [T] bool (False = padding, routed nowhere).

        Returns topk_ids [T, K] int32 (-1 for padding), topk_weights [T, K] f32, and stats:
        load_balance_loss (E * sum_e load_e * mean_prob_e, 1.0 when balanced) and max_load
        (largest expert's share of slots times E, 1.0 when balanced).
        """
        cfg = self.cfg
        E, K = cfg.num_experts, cfg.num_experts_per_tok
        logits = x.astype(jnp.float32) @ self.weight[...].T  # [T, E]
        if cfg.scoring_func == "softmax":
            scores = jax.nn.softmax(logits, axis=-1)
            choice = scores
        else:
            scores = jax.nn.sigmoid(logits)
            choice = scores + jax.lax.stop_gradient(self.e_score_correction_bias[...])
        if cfg.n_group > 1:
            grouped = choice.reshape(-1, cfg.n_group, E // cfg.n_group)
            group_score = jnp.sum(jax.lax.top_k(grouped, min(2, E // cfg.n_group))[0], -1)  # [T, G]
            _, best_groups = jax.lax.top_k(group_score, cfg.topk_group)
            keep = (
                jnp.zeros(group_score.shape, bool).at[jnp.arange(x.shape[0])[:, None], best_groups].set(True)
            )
            choice = jnp.where(jnp.repeat(keep, E // cfg.n_group, axis=-1), choice, -jnp.inf)
        _, ids = jax.lax.top_k(choice, K)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (jnp.sum(weights, -1, keepdims=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        ids = jnp.where(token_mask[:, None], ids, -1).astype(jnp.int32)
        weights = jnp.where(token_mask[:, None], weights, 0.0)

        m = token_mask.astype(jnp.float32)
        # over every shard's tokens when the experts are split over a shard_map axis (tokens split too)
        total = (lambda a: jax.lax.psum(a, cfg.expert_axis)) if axis_bound(cfg.expert_axis) else (lambda a: a)
        n_tokens = jnp.maximum(total(jnp.sum(m)), 1.0)
        load = total(jnp.sum(jax.nn.one_hot(ids, E) * m[:, None, None], axis=(0, 1))) / (n_tokens * K)  # [E]
        probs = scores / jnp.sum(scores, -1, keepdims=True)
        mean_prob = total(jnp.sum(probs * m[:, None], 0)) / n_tokens
        stats = {
            "load_balance_loss": E * jnp.sum(jax.lax.stop_gradient(load) * mean_prob),
            "max_load": E * jnp.max(load),
        }
        return ids, weights, stats
