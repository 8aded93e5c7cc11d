"""Decoder layer and the full causal LM. Attribute names mirror Hugging Face parameter names, e.g.
``model.layers.0.self_attn.q_proj.weight`` or ``model.layers.1.mlp.experts.gate_proj.weight``
(routed experts stacked over a leading E axis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.nn.attention import Attention
from ktjax.nn.init import normal
from ktjax.nn.linear import Linear
from ktjax.nn.mla import LatentAttention
from ktjax.nn.mlp import MLP
from ktjax.nn.moe import MoEBlock
from ktjax.nn.norm import RMSNorm
from ktjax.nn.remat import chunked_sum, recomputed_call


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        attention = LatentAttention if cfg.attention == "mla" else Attention
        self.self_attn = attention(cfg, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        dense = not cfg.is_moe_layer(layer)
        ffn = (
            MLP(cfg, cfg.intermediate_size, rngs=rngs, dtype=dtype)
            if dense
            else MoEBlock(cfg, rngs=rngs, dtype=dtype)
        )
        # Mixtral calls its MoE block "block_sparse_moe"; the others call it "mlp".
        self.ffn_name = "block_sparse_moe" if cfg.style == "mixtral" and not dense else "mlp"
        setattr(self, self.ffn_name, ffn)

    def __call__(self, x, positions, segment_ids, remat: str = "off") -> tuple[jax.Array, dict | None]:
        """x [B, S, H] f32, positions and segment_ids [B, S] int (0 = padding) -> (x after the layer,
        router statistics or None). remat: ModelConfig.remat ("full" is applied by the caller, around the
        whole layer)."""
        if remat == "experts":  # the attention recomputed; the MoE block keeps its saved intermediates
            x = recomputed_call(
                (self.input_layernorm, self.self_attn), _attention_block, x, positions, segment_ids
            )
        else:
            x = _attention_block((self.input_layernorm, self.self_attn), x, positions, segment_ids)
        return self._feed_forward(x, segment_ids)

    def cached(self, x, positions, segment_ids, cache: dict, prefill: bool) -> tuple[jax.Array, dict]:
        """The layer for decoding (see Attention.cached): x [B, S, H] f32 -> (x after the layer, cache)."""
        h, cache = self.self_attn.cached(self.input_layernorm(x), positions, segment_ids, cache, prefill)
        return self._feed_forward(x + h, segment_ids)[0], cache

    def _feed_forward(self, x, segment_ids) -> tuple[jax.Array, dict | None]:
        ffn = getattr(self, self.ffn_name)
        h = self.post_attention_layernorm(x)
        if isinstance(ffn, MoEBlock):
            y, stats = ffn(h, segment_ids > 0)
        else:
            y, stats = ffn(h), None
        return x + y, stats


def _attention_block(modules: tuple[RMSNorm, nnx.Module], x, positions, segment_ids) -> jax.Array:
    norm, attention = modules
    return x + attention(norm(x), positions, segment_ids)


def _call_layer(layer: DecoderLayer, x, positions, segment_ids) -> tuple[jax.Array, dict | None]:
    return layer(x, positions, segment_ids)


class Embedding(nnx.Module):
    """Token embedding table weight [V, H]."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype):
        self.weight = nnx.Param(normal(rngs.params(), (vocab, dim), 1.0, dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.weight[...][ids].astype(jnp.float32)


class Backbone(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, rngs=rngs, dtype=dtype) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class MoeForCausalLM(nnx.Module):
    """input_ids [B, S] int32 -> logits [B, S, V] f32 (``forward`` also returns router statistics)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.param_dtype)
        self.config = cfg
        self.model = Backbone(cfg, rngs=rngs, dtype=dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, rngs=rngs, dtype=dtype)
        )

    def __call__(
        self, input_ids: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """input_ids [B, S] int32 -> logits [B, S, V] f32. segment_ids [B, S]: packed-sequence ids,
        0 = padding (default: one segment, no padding); positions [B, S]: RoPE positions (default 0..S-1)."""
        return self.forward(input_ids, segment_ids, positions)[0]

    def forward(
        self, input_ids: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """As ``__call__``, plus router statistics averaged over the MoE layers: load_balance_loss and
        max_load (both 1.0 when perfectly balanced)."""
        x, aux = self.hidden(input_ids, segment_ids, positions)
        return self.logits(x), aux

    def hidden(
        self, input_ids: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """As ``forward``, but the last layer's output x [B, S, H] f32 (before the final norm) in place
        of the logits: for ``cross_entropy_sum``."""
        B, S = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((B, S), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        x = self.model.embed_tokens(input_ids)
        stats = []
        remat = self.config.remat
        for layer in self.model.layers:
            if remat == "full":
                x, s = recomputed_call(layer, _call_layer, x, positions, segment_ids)
            else:
                x, s = layer(x, positions, segment_ids, remat)
            if s is not None:
                stats.append(s)
        aux = (
            {k: jnp.mean(jnp.stack([s[k] for s in stats])) for k in ("load_balance_loss", "max_load")}
            if stats
            else {"load_balance_loss": jnp.zeros(()), "max_load": jnp.ones(())}
        )
        return x, aux

    def cross_entropy_sum(
        self, x: jax.Array, targets: jax.Array, loss_mask: jax.Array, rows: int
    ) -> jax.Array:
        """Sum over the tokens of loss_mask x -log p(target): x [B, S, H] f32 from ``hidden``, targets
        [B, S] int32, loss_mask [B, S] f32. The logits exist `rows` tokens at a time ([rows, V] f32),
        in the forward and in the backward, which recomputes them (ktjax.nn.remat.chunked_sum)."""
        H = x.shape[-1]
        return chunked_sum(
            self._head(), _token_losses, rows, x.reshape(-1, H), targets.reshape(-1), loss_mask.reshape(-1)
        )

    def _head(self) -> tuple[RMSNorm, nnx.Module]:
        """The final norm and the output projection (the token embedding when the model ties them)."""
        return self.model.norm, self.lm_head if self.lm_head is not None else self.model.embed_tokens

    def init_cache(self, batch: int, length: int) -> list[dict[str, jax.Array]]:
        """An empty key/value cache for `batch` rows of up to `length` positions: one dict per layer."""
        return [layer.self_attn.init_cache(batch, length) for layer in self.model.layers]

    def extend(
        self, input_ids: jax.Array, start: jax.Array, lengths: jax.Array, cache: list, prefill: bool
    ) -> tuple[jax.Array, list]:
        """Decoding (ktjax.generate): input_ids [B, S] int32, row b's first lengths[b] tokens at positions
        start[b], start[b] + 1, ... (the rest padding); their keys and values go into `cache`.
        prefill: the tokens start every row (start = 0) -> (logits [B, V] f32 of each row's last token,
        the cache)."""
        B, S = input_ids.shape
        steps = jnp.arange(S, dtype=jnp.int32)
        positions = start[:, None].astype(jnp.int32) + steps
        segment_ids = (steps < lengths[:, None]).astype(jnp.int32)
        x = self.model.embed_tokens(input_ids)
        new_cache = []
        for layer, layer_cache in zip(self.model.layers, cache, strict=True):
            x, layer_cache = layer.cached(x, positions, segment_ids, layer_cache, prefill)
            new_cache.append(layer_cache)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)  # [B, 1, H]
        return self.logits(last)[:, 0], new_cache

    def logits(self, x: jax.Array) -> jax.Array:
        """x [..., H] f32 from ``hidden`` (before the final norm) -> logits [..., V] f32."""
        return _head_logits(*self._head(), x)


def _head_logits(norm: RMSNorm, head: nnx.Module, x: jax.Array) -> jax.Array:
    """The final norm and the output projection: x [..., H] f32 -> logits [..., V] f32. head: the lm_head
    Linear, or the token embedding when the model ties them."""
    x = norm(x)
    if isinstance(head, Linear):
        return head(x)
    return jnp.einsum("...h,vh->...v", x, head.weight[...].astype(jnp.float32))


def _token_losses(head: tuple, x: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """sum(loss_mask x -log p(target)) of tokens x [N, H] f32, targets [N] int32, loss_mask [N] f32."""
    logits = _head_logits(*head, x)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * loss_mask)
