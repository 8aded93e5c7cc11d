"""Generation (ktjax.generate): cached decoding is the model recomputed, one compiled decode step serves
every token, sampling is seeded, and bad prompts are refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from error_bounds import U_BF16, config_depth, network_tolerance
from model_testing import jit_logits

from ktjax.decoding import Generator, Sampling, generate, sample
from ktjax.models import build_model, deepseek_v3, mixtral, qwen3_moe
from ktjax.params import merge_lora, merge_model, split_model

# One layer: what a decode step does per layer is the same in every layer, and each program compiles
# in half the time of two layers' (CI time).
TINY = dict(
    vocab_size=40, hidden_size=32, num_hidden_layers=1, head_dim=8, num_experts=8, moe_intermediate_size=16
)
STYLES = {
    "qwen3_moe": lambda **kw: qwen3_moe(**TINY, lora_targets=("experts", "q_proj", "v_proj"), **kw),
    # a window shorter than prompt + generation: the decode steps must drop the oldest keys
    "mixtral": lambda **kw: mixtral(**TINY, sliding_window=5, lora_targets=("experts", "k_proj"), **kw),
    # latent attention decodes in the latent space, kv_b_proj's adapter folded in
    "deepseek_v3": lambda **kw: deepseek_v3(
        **TINY, intermediate_size=48, q_lora_rank=12, lora_targets=("experts", "kv_b_proj", "q_b_proj"), **kw
    ),
}
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]


def adapted_model(cfg, seed: int = 1):
    """A model whose adapters are not zero (B is initialised to 0), so that they count."""
    defn, params = split_model(build_model(cfg, seed=seed))
    key = jax.random.key(seed)
    for i, name in enumerate(n for n in sorted(params) if n.endswith("lora_B")):
        params[name] = 0.2 * jax.random.normal(
            jax.random.fold_in(key, i), params[name].shape, params[name].dtype
        )
    return merge_model(defn, params)


def recomputed_logits(model, prompts: list[list[int]], new: list[list[int]]) -> list[np.ndarray]:
    """The logits each new token was drawn from, by running each whole sequence (one call, rows padded
    at the end, which causal attention keeps out of the positions before): [len(new[b]), V] per row."""
    seqs = [p + n for p, n in zip(prompts, new)]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
    logits = np.asarray(jit_logits(model, jnp.asarray(ids)))
    return [logits[b, len(p) - 1 : len(p) + len(n) - 1] for b, (p, n) in enumerate(zip(prompts, new))]


@pytest.mark.parametrize("style", list(STYLES))
def test_cached_decoding_gives_the_logits_of_recomputing_the_whole_sequence(style):
    cfg = STYLES[style](lora_rank=4)
    model = adapted_model(cfg)
    new, logits = generate(model, PROMPTS, max_new_tokens=6, return_logits=True)
    assert [len(n) for n in new] == [6, 6, 6]
    seq = max(len(p) for p in PROMPTS) + 6
    # Two f32 evaluations of the same network in different association orders (error_bounds.py); the
    # decode path adds the adapter's rank and, for latent attention, the latent sums of the absorbed
    # key and value expansions to the longest path.
    depth = config_depth(cfg, seq) + cfg.lora_rank + 2 * cfg.kv_lora_rank + cfg.qk_nope_head_dim
    for row, want in enumerate(recomputed_logits(model, PROMPTS, new)):
        err = np.abs(logits[row] - want).max() / np.abs(want).max()
        assert err <= network_tolerance(depth), (row, err)
        assert new[row] == list(np.argmax(logits[row], -1))  # greedy: each token is its logits' argmax


def test_bf16_models_decode_within_bf16_rounding_of_the_recomputed_logits():
    cfg = STYLES["qwen3_moe"](lora_rank=4, param_dtype="bfloat16")
    model = adapted_model(cfg)
    # The paths round to bf16 in different places (widened, the decoding multiplies f32 activations by
    # the bf16 dense weights; the recomputation rounds each dense layer's input to bf16): each logit is
    # within the effect of the ~6 bf16 roundings per layer (and 2 at the head) of either path, plus the
    # f32 bound.
    roundings = 6 * cfg.num_hidden_layers + 2
    bound = network_tolerance(roundings, U_BF16) + network_tolerance(config_depth(cfg, 11) + cfg.lora_rank)
    new, logits = Generator(model)(PROMPTS, max_new_tokens=4, return_logits=True)  # widened (the default)
    for row, want in enumerate(recomputed_logits(model, PROMPTS, new)):
        assert np.abs(logits[row] - want).max() / np.abs(want).max() <= bound, row


def test_one_compiled_decode_step_serves_every_token_and_every_call():
    gen = Generator(adapted_model(STYLES["qwen3_moe"](lora_rank=4)))
    first = gen(PROMPTS, max_new_tokens=12)
    assert gen.compiled_steps() == 2  # the prefill and the decode step, not one program per token
    # Other prompts of the same batch and longest length, fewer new tokens: the cache length rounds to
    # the same size, and the same two programs serve.
    again = gen([[5] * 7, [6, 7, 8], [9]], max_new_tokens=5)
    assert gen.compiled_steps() == 2
    assert [len(n) for n in first] == [12] * 3 and [len(n) for n in again] == [5] * 3


def test_seeded_sampling_is_reproducible():
    gen = Generator(adapted_model(STYLES["mixtral"](lora_rank=2)))
    warm = Sampling(temperature=1.5, top_k=8, top_p=0.95, seed=7)
    a = gen(PROMPTS, max_new_tokens=10, sampling=warm)
    assert gen(PROMPTS, max_new_tokens=10, sampling=warm) == a
    assert gen(PROMPTS, max_new_tokens=10, sampling=dataclasses.replace(warm, seed=8)) != a
    assert gen.compiled_steps() == 2  # the seed is an input, not part of the program


def test_sampling_draws_only_within_top_k_and_top_p():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 50)) * 2, jnp.float32)
    order = np.argsort(-np.asarray(logits[0]))
    probs = np.asarray(jax.nn.softmax(logits[0]))[order]
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs), 0.6)) + 1])  # smallest set reaching 0.6
    keys = jax.random.split(jax.random.key(0), 400)

    def draws(sampling: Sampling) -> set[int]:
        return set(np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, sampling)[0]))(keys)).tolist())

    assert draws(Sampling(temperature=1.0, top_k=3)) == set(order[:3])
    assert draws(Sampling(temperature=1.0, top_p=0.6)) == nucleus
    assert len(draws(Sampling(temperature=1.0))) > 10
    # a single candidate is the greedy choice, whatever the temperature
    assert (
        draws(Sampling(temperature=2.0, top_k=1))
        == draws(Sampling(temperature=2.0, top_p=1e-6))
        == {order[0]}
    )


def test_rows_end_at_eos_and_generation_ends_at_the_context():
    model = adapted_model(STYLES["qwen3_moe"](lora_rank=2, max_position_embeddings=16))
    greedy = generate(model, PROMPTS, max_new_tokens=4)
    eos = greedy[0][1]
    ended = generate(model, PROMPTS, max_new_tokens=4, eos_token_id=eos)
    assert ended[0] == greedy[0][:2]  # row 0 stops at its EOS (kept) ...
    for row in (1, 2):  # ... the others run on, unchanged, up to their own EOS if any
        stop = greedy[row].index(eos) + 1 if eos in greedy[row] else 4
        assert ended[row] == greedy[row][:stop]
    # prompts of up to 7 tokens in a 16-position context: at most 9 new tokens
    assert [len(n) for n in generate(model, PROMPTS, max_new_tokens=50)] == [9, 9, 9]


def test_merged_and_unmerged_adapters_generate_alike():
    cfg = STYLES["deepseek_v3"](lora_rank=4)
    model = adapted_model(cfg)
    _, params = split_model(model)
    plain_defn, _ = split_model(build_model(cfg.replace(lora_rank=0, lora_targets=())))
    merged = merge_model(plain_defn, merge_lora(params, cfg.lora_scale, jnp.float32))
    _, logits = generate(model, PROMPTS, max_new_tokens=5, return_logits=True)
    _, logits_m = generate(merged, PROMPTS, max_new_tokens=5, return_logits=True)
    depth = config_depth(cfg, 12) + cfg.lora_rank + 2 * cfg.kv_lora_rank + cfg.qk_nope_head_dim
    assert np.abs(logits - logits_m).max() / np.abs(logits).max() <= network_tolerance(depth)


def test_bad_prompts_and_sampling_are_refused():
    model = build_model(STYLES["qwen3_moe"](max_position_embeddings=8))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[3, 4], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 0 has 8 tokens; the model's context is 8"):
        generate(model, [list(range(3, 11))], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
        generate(model, [[3, 40]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        generate(model, [[3]], max_new_tokens=0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        Sampling(temperature=1.0, top_p=0.0)
