"""The three model layouts: CPU-kernel and pure-XLA experts agree through the whole model; routers
behave as their papers say; names follow Hugging Face."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from error_bounds import U_BF16, gamma, network_tolerance, transformer_depth
from moe_testing import rel_err

from ktjax.models import build_model, deepseek_v3, mixtral, qwen3_moe
from ktjax.nn.router import Router
from ktjax.params import merge_model, split_model

TINY = dict(
    vocab_size=29, hidden_size=32, num_hidden_layers=2, head_dim=8, num_experts=8, moe_intermediate_size=16
)
# Roundings on the longest path through TINY's forward (10 tokens; deepseek_v3's dense layer is the
# widest MLP, 48): the backward doubles it.
TINY_DEPTH = transformer_depth(layers=2, hidden=32, ffn=48, seq=12, experts=8, vocab=29)
STYLES = {
    "qwen3_moe": lambda **kw: qwen3_moe(**TINY, **kw),
    "deepseek_v3": lambda **kw: deepseek_v3(**TINY, intermediate_size=48, **kw),
    "mixtral": lambda **kw: mixtral(**TINY, **kw),
}


def loss_and_grads(cfg, input_ids, targets):
    defn, params = split_model(build_model(cfg, seed=3))

    def loss(params):
        logits, aux = merge_model(defn, params).forward(input_ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + 0.01 * aux["load_balance_loss"]

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
@pytest.mark.parametrize("style", list(STYLES))
def test_cpu_and_xla_expert_backends_agree_through_the_whole_model(style):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 29, (2, 10)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 29, (2, 10)), jnp.int32)
    lora = dict(lora_rank=2, lora_targets=("experts", "q_proj"))
    loss_cpu, g_cpu = loss_and_grads(STYLES[style](expert_backend="cpu", **lora), ids, targets)
    loss_xla, g_xla = loss_and_grads(STYLES[style](expert_backend="xla", **lora), ids, targets)
    # Two f32 evaluations of the same model (the experts by the kernels or by XLA): error_bounds.py.
    np.testing.assert_allclose(loss_cpu, loss_xla, rtol=network_tolerance(TINY_DEPTH))
    assert set(g_cpu) == set(g_xla)
    for name in g_cpu:
        if float(jnp.abs(g_xla[name]).max()) == 0:  # e.g. LoRA A while B = 0: both must be exactly 0
            assert float(jnp.abs(g_cpu[name]).max()) == 0, name
            continue
        assert rel_err(g_cpu[name], g_xla[name]) < network_tolerance(2 * TINY_DEPTH), name


@pytest.mark.slow
def test_bf16_expert_intermediates_reach_the_kernels_and_stay_close_to_f32():
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 29, (2, 12)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 29, (2, 12)), jnp.int32)
    runs = {}
    for mode in ("f32", "bf16"):
        cfg = STYLES["qwen3_moe"](param_dtype="bfloat16", expert_intermediates=mode)
        runs[mode] = loss_and_grads(cfg, ids, targets)
    (loss_f32, g_f32), (loss_bf16, g_bf16) = runs["f32"], runs["bf16"]
    # The modes differ by the bf16 roundings of w h (forward), dg and du (backward): one bf16 rounding
    # on the loss's path through each MoE layer's experts, two on an expert gradient's (a rounded
    # operand and the gradient's own rounding to bf16, which both modes share); each mode's f32
    # arithmetic besides.
    bf16_depth = TINY["num_hidden_layers"]
    tolerance = network_tolerance(bf16_depth, U_BF16) + network_tolerance(TINY_DEPTH)
    np.testing.assert_allclose(loss_bf16, loss_f32, rtol=tolerance)
    experts = [n for n in g_f32 if ".experts." in n]
    assert experts and any(not np.array_equal(g_f32[n], g_bf16[n]) for n in experts)  # the mode acted
    for name in experts:
        assert rel_err(g_bf16[name], g_f32[name]) < network_tolerance(2, U_BF16), name


@pytest.mark.parametrize(
    "overrides", [dict(expert_intermediates="bf16"), dict(param_dtype="bfloat16", expert_intermediates="fp8")]
)
def test_bad_expert_intermediates_are_refused_by_the_config(overrides):
    with pytest.raises(ValueError, match="expert_intermediates"):
        STYLES["qwen3_moe"](**overrides)


def test_parameter_names_follow_hugging_face():
    _, q = split_model(build_model(STYLES["qwen3_moe"]()))
    assert "model.embed_tokens.weight" in q and "lm_head.weight" in q
    assert q["model.layers.0.mlp.experts.gate_proj.weight"].shape == (8, 16, 32)  # [E, I, H]
    assert q["model.layers.0.mlp.experts.down_proj.weight"].shape == (8, 32, 16)  # [E, H, I]
    assert q["model.layers.0.mlp.gate.weight"].shape == (8, 32)
    assert "model.layers.1.self_attn.q_norm.weight" in q
    _, d = split_model(build_model(STYLES["deepseek_v3"]()))
    assert "model.layers.0.mlp.gate_proj.weight" in d  # first layer dense
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in d
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in d
    _, m = split_model(build_model(STYLES["mixtral"]()))
    assert "model.layers.0.block_sparse_moe.experts.up_proj.weight" in m


def test_softmax_router_renormalises_top_k_and_skips_padding():
    cfg = qwen3_moe(**TINY)
    router = Router(cfg, rngs=__import__("flax").nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 32)), jnp.float32)
    mask = jnp.array([True, True, True, True, False, False])
    ids, w, stats = router(x, mask)
    # K weights p_k / sum(p) each rounded once after a sum of K rounded terms, then summed (K - 1): within
    # gamma(3 K) of 1 (the p_k's own errors cancel in the ratio).
    np.testing.assert_allclose(w[:4].sum(-1), 1.0, rtol=gamma(3 * cfg.num_experts_per_tok))
    assert (ids[4:] == -1).all() and (w[4:] == 0).all()
    assert (ids[:4] >= 0).all() and float(stats["load_balance_loss"]) > 0


def test_deepseek_router_picks_experts_only_from_the_best_groups():
    cfg = deepseek_v3(**TINY)  # 8 experts in 4 groups of 2, top-2 groups
    router = Router(cfg, rngs=__import__("flax").nnx.Rngs(0))
    bias = np.zeros(8, np.float32)
    bias[[0, 1, 6, 7]] = 10.0  # groups 0 and 3 win for every token
    router.e_score_correction_bias.set_value(jnp.asarray(bias))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 32)), jnp.float32)
    ids, w, _ = router(x, jnp.ones(16, bool))
    assert set(np.unique(np.asarray(ids))) <= {0, 1, 6, 7}
    # weights are the un-biased sigmoid scores, renormalised and scaled
    # As in the softmax router, times the scaling factor (one more rounding).
    np.testing.assert_allclose(
        w.sum(-1), cfg.routed_scaling_factor, rtol=gamma(3 * cfg.num_experts_per_tok + 1)
    )
