"""The training loss a chunk of tokens at a time (ktjax.train.loss_sum, MoeForCausalLM.cross_entropy_sum,
ktjax/nn/remat.py's chunked_sum): the loss and every gradient of the whole logits' cross-entropy, whatever
the chunk, and one chunk's logits held at a time instead of the whole [tokens, V]."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ktjax.config import ModelConfig
from ktjax.models import build_model
from ktjax.nn.remat import recomputed_chunks
from ktjax.params import merge_model, split_model
from ktjax.train import TrainConfig, loss_chunk_rows, loss_sum, masked_cross_entropy_sum

CFG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    lora_rank=4,
    lora_targets=("q_proj", "experts"),
)


def batch(vocab: int, B: int = 2, S: int = 23, seed: int = 0) -> dict:
    """Random tokens and targets, a random loss mask (some tokens not trained), one padding row tail."""
    rng = np.random.default_rng(seed)
    segment_ids = np.ones((B, S), np.int32)
    segment_ids[-1, S - 4 :] = 0
    return {
        "input_ids": jnp.asarray(rng.integers(0, vocab, (B, S)), jnp.int32),
        "segment_ids": jnp.asarray(segment_ids),
        "positions": jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
        "targets": jnp.asarray(rng.integers(0, vocab, (B, S)), jnp.int32),
        "loss_mask": jnp.asarray((rng.random((B, S)) > 0.3) * (segment_ids > 0), jnp.float32),
    }


def whole_logits_loss(defn, params, b):
    model = merge_model(defn, params)
    logits, _ = model.forward(b["input_ids"], b["segment_ids"], b["positions"])
    return masked_cross_entropy_sum(logits, b)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rows", [5, 16, 64])  # of 46 tokens: ragged chunks, 3 chunks, the whole logits
@pytest.mark.parametrize("trained", ["all", "lora"])  # every weight differentiated, or the adapters only
def test_the_chunked_loss_gives_the_whole_logits_loss_and_gradients(tied, rows, trained):
    defn, params = split_model(build_model(dataclasses.replace(CFG, tie_word_embeddings=tied), seed=1))
    b = batch(CFG.vocab_size)
    names = [n for n in params if trained == "all" or "lora" in n]
    frozen = {n: v for n, v in params.items() if n not in names}

    def loss(chunked: bool):
        def f(trainable):
            full = {**trainable, **frozen}
            if chunked:
                return loss_sum(merge_model(defn, full), b, rows)[0]
            return whole_logits_loss(defn, full, b)

        return jax.jit(jax.value_and_grad(f))({n: params[n] for n in names})

    (want, want_grads), (got, got_grads) = loss(False), loss(True)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert set(got_grads) == set(names)
    for name in names:
        scale = float(jnp.max(jnp.abs(want_grads[name]))) + 1e-30
        assert scale > 1e-30 or "lora_A" in name  # B starts at zero, so A's gradient is zero
        np.testing.assert_allclose(
            got_grads[name], want_grads[name], rtol=1e-5, atol=scale * 1e-5, err_msg=name
        )


U_F64 = 2.0**-53


def gamma(n: int) -> float:
    """The classic bound on the relative rounding error of n f64 operations in sequence: n u / (1 - n u)."""
    return n * U_F64 / (1 - n * U_F64)


@pytest.mark.parametrize("rows", [5, 16])  # of 46 tokens: ragged chunks, 3 chunks
def test_chunks_give_the_whole_sums_value_and_gradients_within_f64_rounding(rows):
    # recomputed_chunks alone, on a head and cross-entropy in f64: both ways compute the same terms and
    # differ only in how they round, so each is within the rounding bound below of the exact value and
    # they are within twice that of each other. Bounds, per token t (logits z = x W^T + b, p = softmax(z)):
    #   a logit: gamma(H + 1) max_v (|x_t| . |W_v| + |b_v|) = Ez_t; lse and ce_t: 2 Ez_t + gamma(V + 4)
    #   (|max z_t| + log V + 1); p_tv: relatively 4 Ez_t + gamma(V + 4); then each gradient's sum of its
    #   terms' errors plus gamma(terms) times the sum of their magnitudes.
    N, H, V = 46, 8, 13
    rng = np.random.default_rng(rows)
    W, b, x = rng.standard_normal((V, H)), rng.standard_normal(V), rng.standard_normal((N, H))
    targets = rng.integers(0, V, N)
    mask = (rng.random(N) > 0.3).astype(np.float64)

    def fn(params, x, consts):
        (w, bias), (t, m) = params, consts
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ w.T + bias, t)
        return jnp.sum(ce * m)

    with jax.enable_x64(True):
        consts = (jnp.asarray(targets, jnp.int32), jnp.asarray(mask))
        args = ([jnp.asarray(W), jnp.asarray(b)], jnp.asarray(x))
        whole = jax.value_and_grad(lambda p, x: fn(p, x, consts), argnums=(0, 1))(*args)
        chunked = jax.value_and_grad(lambda p, x: recomputed_chunks(fn, rows)(p, x, consts), argnums=(0, 1))(
            *args
        )
    (want, ((want_w, want_b), want_x)) = jax.tree.map(np.asarray, whole)
    (got, ((got_w, got_b), got_x)) = jax.tree.map(np.asarray, chunked)

    z = x @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(V)[targets]
    ez = gamma(H + 1) * (np.abs(x) @ np.abs(W).T + np.abs(b)).max(1)  # [N]
    e_ce = 2 * ez + gamma(V + 4) * (np.abs(z).max(1) + np.log(V) + 1)
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(N), targets]
    d = mask[:, None] * (p - onehot)  # the logits' gradient [N, V]
    d_mag = mask[:, None] * (p + onehot)
    e_d = mask[:, None] * p * (4 * ez + gamma(V + 4))[:, None]
    bounds = {  # one computation's bound; the two differ by at most twice it (1.01: p and ce are f64 too)
        "loss": (mask * e_ce).sum() + gamma(N) * (mask * np.abs(ce)).sum(),
        "b": e_d.sum(0) + gamma(N) * d_mag.sum(0),
        "W": e_d.T @ np.abs(x) + gamma(N + 1) * d_mag.T @ np.abs(x),
        "x": e_d @ np.abs(W) + gamma(V + 1) * d_mag @ np.abs(W),
    }
    for name, g, w in [("loss", got, want), ("b", got_b, want_b), ("W", got_w, want_w), ("x", got_x, want_x)]:
        err = np.abs(np.asarray(g) - np.asarray(w))
        assert (err <= 2 * 1.01 * bounds[name]).all(), (name, float(np.max(err - 2 * bounds[name])))
    assert np.abs(d).max() > 0.1 and abs(float(want)) > 1  # the gradients are not trivially zero


def test_the_chunked_loss_holds_one_chunk_of_logits_at_a_time():
    # The compiled gradient's temporaries (XLA's memory analysis) with a vocabulary large enough that the
    # logits dominate: the whole [512, 4096] f32 logits take 8.4 MB a copy.
    cfg = dataclasses.replace(CFG, vocab_size=4096, lora_rank=0, lora_targets=())
    defn, params = split_model(build_model(cfg, seed=0))
    b = batch(cfg.vocab_size, B=1, S=512)
    logits_bytes = 512 * cfg.vocab_size * 4

    def temporaries(f) -> int:
        return jax.jit(jax.grad(f)).lower(params).compile().memory_analysis().temp_size_in_bytes

    whole = temporaries(lambda p: whole_logits_loss(defn, p, b))
    chunked = temporaries(lambda p: loss_sum(merge_model(defn, p), b, 32)[0])
    # measured: 20.0 MB whole, 4.2 MB in chunks of 32 tokens (the model's own temporaries and one chunk)
    assert whole > 2 * logits_bytes, whole
    assert chunked < logits_bytes and chunked < whole / 4, (chunked, whole)


def test_the_automatic_chunk_takes_the_whole_logits_while_they_fit_256_mib():
    assert loss_chunk_rows(151936, 128) == 128  # 78 MB of logits: at once
    assert loss_chunk_rows(151936, 4096) == 256  # 2.5 GB: 256 tokens (156 MB) at a time
    assert loss_chunk_rows(1000, 10**5) == 65536
    for vocab in (2, 300, 32000, 151936, 10**7):
        rows = loss_chunk_rows(vocab, 10**8)
        assert rows == 256 or rows * vocab * 4 <= 256 * 2**20 < 2 * rows * vocab * 4
    assert loss_chunk_rows(151936, 128, 100) == 100


def test_a_negative_loss_chunk_is_refused():
    with pytest.raises(ValueError, match="loss_chunk must be >= 0"):
        TrainConfig(loss_chunk=-1)
