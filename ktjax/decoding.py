"""Autoregressive decoding with a key/value cache (the command line is ktjax.generate).

``generate(model, prompts, ...)`` decodes a batch of token-id prompts of different lengths: one prefill of
the right-padded prompts fills each layer's cache (GQA: rotated keys and values; DeepSeek's latent
attention: the normalised latent and the rotated shared key), then one compiled decode step per token
extends every row at its own position. The routed experts of a decode step are a few token rows: the
CPU kernels' small-batch path. Sampling is greedy (temperature 0) or temperature / top-k / top-p with an
explicit seed; a row ends at its EOS token or after max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.nn.decoder import MoeForCausalLM

# Cache lengths are rounded up to a multiple of this, so that prompts of nearby lengths share programs.
CACHE_ROUNDING = 64


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax). Otherwise logits / temperature, then only the top_k most likely
    tokens (0: all) and the smallest set whose probability reaches top_p (1.0: all) are drawn from."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self.temperature}, "
                f"{self.top_k} and {self.top_p}"
            )


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits: [B, V] f32 -> next tokens [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # the probability of the tokens ranked above
        keep = before < sampling.top_p  # the most likely token is always kept
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Generation for one model: its compiled prefill and decode steps are kept across calls (one program
    per batch size, cache length and sampling; ``compiled_steps()`` counts them)."""

    def __init__(self, model: MoeForCausalLM, widen_bf16: bool = True):
        """widen_bf16: keep f32 copies of the bf16 weights outside the routed experts (attention,
        norms, dense MLPs, the head; not the embedding table unless it is the head) for decoding.
        XLA:CPU multiplies one token by a bf16 matrix by first converting the whole matrix to f32, on
        every call: at H=2048 that made the attention of a decode step 7x slower than with f32 weights
        (docs/performance.md). Costs 2 more bytes per such parameter; the routed experts stay as they
        are (the CPU kernels read bf16 and quantized weights directly)."""
        self.widen_bf16 = widen_bf16
        graphdef = self.use(model)

        def extend(state, input_ids, start, lengths, cache, key, *, prefill: bool, sampling: Sampling):
            logits, cache = nnx.merge(graphdef, state).extend(input_ids, start, lengths, cache, prefill)
            return sample(logits, key, sampling), logits, cache

        self._step = jax.jit(extend, static_argnames=("prefill", "sampling"), donate_argnames=("cache",))

    def use(self, model: MoeForCausalLM):
        """Generate from `model` from now on: the same architecture with other parameters (e.g. after
        training), so the compiled steps serve it. Returns its graph definition."""
        self.model = model
        graphdef, self.state = nnx.split(model)
        if self.widen_bf16:
            self.state = jax.tree_util.tree_map_with_path(
                lambda path, v: _widened(model.config, jax.tree_util.keystr(path), v), self.state
            )
        return graphdef

    def release(self) -> None:
        """Drops the references to the model's parameters (and their widened copies) until ``use``."""
        self.model = self.state = None

    def compiled_steps(self) -> int:
        """How many step programs have been compiled so far."""
        return self._step._cache_size()

    def __call__(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        sampling: Sampling = Sampling(),
        on_token: Callable[[int, np.ndarray], None] | None = None,
        return_logits: bool = False,
    ) -> list[list[int]] | tuple[list[list[int]], np.ndarray]:
        """See ``generate``."""
        cfg = self.model.config
        lengths = np.array([len(p) for p in prompts], np.int32)
        if not len(prompts) or max_new_tokens < 1:
            raise ValueError(f"generate needs a prompt and max_new_tokens >= 1, got {max_new_tokens}")
        if lengths.min() == 0:
            raise ValueError(f"prompt {int(np.argmin(lengths))} is empty: generation needs a token to start")
        context = cfg.max_position_embeddings
        if lengths.max() >= context:
            raise ValueError(
                f"prompt {int(np.argmax(lengths))} has {lengths.max()} tokens; the model's context is "
                f"{context} (max_position_embeddings), and generation needs room for one more"
            )
        ids = np.zeros((len(prompts), int(lengths.max())), np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(
                f"prompt token ids must be in [0, {cfg.vocab_size}), got {ids.min()} to {ids.max()}"
            )
        steps = min(max_new_tokens, context - int(lengths.max()))
        cache_length = min(-(-(int(lengths.max()) + steps) // CACHE_ROUNDING) * CACHE_ROUNDING, context)
        cache = self.model.init_cache(len(prompts), cache_length)
        key = jax.random.key(sampling.seed)
        # the seed travels in the key: one program serves every seed
        step = functools.partial(self._step, self.state, sampling=dataclasses.replace(sampling, seed=0))
        start = jnp.zeros_like(lengths)
        tokens, logits, cache = step(
            jnp.asarray(ids), start, jnp.asarray(lengths), cache, jax.random.fold_in(key, 0), prefill=True
        )
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        all_logits = []
        ones = jnp.ones_like(lengths)
        for i in range(steps):
            drawn = np.asarray(tokens)
            if return_logits:
                all_logits.append(np.asarray(logits))
            for row in np.flatnonzero(~done):
                out[row].append(int(drawn[row]))
            if eos_token_id is not None:
                done |= drawn == eos_token_id
            if on_token is not None:
                on_token(i, drawn)
            if done.all() or i + 1 == steps:
                break
            tokens, logits, cache = step(  # row b's token i is at position lengths[b] + i
                jnp.asarray(drawn)[:, None],
                jnp.asarray(lengths + i),
                ones,
                cache,
                jax.random.fold_in(key, i + 1),
                prefill=False,
            )
        if return_logits:
            return out, np.stack(all_logits, axis=1)
        return out


def _widened(cfg, path: str, value):
    """value as f32 where Generator(widen_bf16=True) widens it (path: the state's key path)."""
    if getattr(value, "dtype", None) != jnp.bfloat16 or "experts" in path.replace("shared_experts", ""):
        return value
    if "embed_tokens" in path and not cfg.tie_word_embeddings:
        return value  # rows are gathered, not multiplied
    return value.astype(jnp.float32)


def generate(
    model: MoeForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    sampling: Sampling = Sampling(),
    on_token: Callable[[int, np.ndarray], None] | None = None,
    return_logits: bool = False,
) -> list[list[int]] | tuple[list[list[int]], np.ndarray]:
    """Continues every prompt (a list of token ids) by up to max_new_tokens tokens -> the new tokens of
    each row, ending with EOS where one was drawn. `on_token(step, tokens [B])` sees each step's tokens as
    they come (rows that have ended included). With return_logits, also the logits each new token was
    drawn from: [B, steps, V] f32. Generation stops early at the model's context (max_position_embeddings).
    Compiles anew on every call: keep a ``Generator`` to reuse the programs.

    Raises ValueError for an empty prompt, a token id outside the vocabulary, or a prompt that leaves no
    room in the model's context."""
    return Generator(model)(
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        sampling=sampling,
        on_token=on_token,
        return_logits=return_logits,
    )


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A plain prompt tokenized as SFT prompt/completion records are (ktjax.sft): <bos>, where the
    tokenizer has one, then the text."""
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
