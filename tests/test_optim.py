"""Hybrid labels: ordered glob/regex rules, per-group optimizers, frozen -> zero updates, summary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from error_bounds import U_BF16, U_F32, Tracked, assert_within, gamma

from ktjax.optim import (
    HYBRID_RULES,
    GroupConfig,
    init_optimizer_state,
    label_params,
    learning_rate,
    make_optimizer,
    parameter_summary,
)

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.gate.weight",
    "model.layers.0.mlp.experts.gate_proj.weight",
    "model.layers.0.mlp.experts.gate_proj.lora_A",
    "model.layers.0.mlp.experts.gate_proj.lora_B",
    "model.layers.3.mlp.experts.up_proj.weight",
]


def test_hybrid_rules_label_attention_router_full_experts_lora_rest_frozen():
    labels = label_params(NAMES, HYBRID_RULES)
    assert labels["model.layers.0.self_attn.q_proj.weight"] == "full"
    assert labels["model.layers.0.mlp.gate.weight"] == "full"
    assert labels["model.layers.0.mlp.experts.gate_proj.lora_A"] == "lora"
    assert labels["model.layers.0.mlp.experts.gate_proj.weight"] == "frozen"
    assert labels["model.embed_tokens.weight"] == "frozen"


def test_first_matching_rule_wins_and_regex_rules_work():
    rules = [(r"re:model\.layers\.[0-2]\..*experts.*\.weight", "full"), ("*.lora_*", "lora"), ("*", "frozen")]
    labels = label_params(NAMES, rules)
    assert labels["model.layers.0.mlp.experts.gate_proj.weight"] == "full"  # first N layers' experts full
    assert labels["model.layers.3.mlp.experts.up_proj.weight"] == "frozen"
    assert labels["model.layers.0.mlp.experts.gate_proj.lora_B"] == "lora"


def test_unmatched_names_and_unknown_labels_are_errors():
    with pytest.raises(ValueError, match="no rule matches parameter 'model.embed_tokens.weight'"):
        label_params(NAMES, [("*.weight_not", "full")])
    with pytest.raises(ValueError, match="label must be one of"):
        label_params(NAMES, [("*", "trainable")])


def test_each_group_gets_its_own_optimizer_and_frozen_gets_no_update():
    params = {"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(3)}
    labels = {"a": "full", "b": "lora", "c": "frozen"}
    groups = {
        "full": GroupConfig("sgd", lr_peak=0.1, schedule="constant"),
        "lora": GroupConfig("sgd", lr_peak=1.0, schedule="constant"),
    }
    tx = make_optimizer(labels, groups, total_steps=10, clip_norm=None)
    grads = {k: jnp.full(3, 2.0) for k in params}
    updates, _ = tx.update(grads, tx.init(params), params)
    # -lr * g with g = 2: exact in f32 (f32(0.1) * 2 is f32(0.2)).
    np.testing.assert_array_equal(updates["a"], np.float32(-0.2))
    np.testing.assert_array_equal(updates["b"], np.float32(-2.0))
    np.testing.assert_array_equal(updates["c"], np.float32(0.0))


def test_missing_group_config_is_an_error():
    with pytest.raises(ValueError, match=r"no optimizer group configured for label\(s\) \['lora'\]"):
        make_optimizer({"a": "lora"}, {"full": GroupConfig()}, total_steps=10)


def test_schedule_warms_up_then_decays():
    lr = learning_rate(GroupConfig(lr_peak=1.0, warmup_steps=10, schedule="cosine"), total_steps=110)
    # optax's warm-up and cosine in f32: a handful of roundings (a ratio, a cosine, a product and a sum
    # or two), within gamma(8) of the exact values relative to the peak.
    tol = gamma(8)
    assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < tol and abs(float(lr(110)) - 0.1) < tol


def test_summary_counts_groups_and_routed_expert_lora_separately():
    params = {n: jnp.zeros((2, 4), jnp.bfloat16) for n in NAMES}
    text = parameter_summary(params, label_params(NAMES, HYBRID_RULES))
    assert "lora (routed experts)" in text and "frozen" in text and "full" in text
    assert "trainable" in text.splitlines()[-1] and "32" in text.splitlines()[-1]  # 4 tensors * 8


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_optimizer_state_of_bf16_params_keeps_its_types_so_the_step_compiles_once(optimizer, moments):
    bf16 = jnp.bfloat16
    params = {"a": jnp.ones((4, 3), bf16), "b": jnp.ones(3, jnp.float32), "c": jnp.ones(2, bf16)}
    labels = {"a": "full", "b": "lora", "c": "frozen"}
    group = GroupConfig(optimizer, lr_peak=0.1, moment_dtype=moments)
    tx = make_optimizer(labels, {"full": group, "lora": group}, total_steps=10)
    grads = {k: jnp.full(v.shape, 0.5, jnp.float32) for k, v in params.items()}  # f32, as in the trainer
    step = jax.jit(lambda state: tx.update(grads, state, params)[1])
    state0 = init_optimizer_state(tx, params)
    state1 = step(state0)
    state2 = step(state1)
    types = [jax.tree.map(lambda a: (a.shape, a.dtype), s) for s in (state0, state1, state2)]
    assert types[0] == types[1] == types[2]
    assert step._cache_size() == 1
    if optimizer != "sgd":  # adam moments of bf16 and f32 parameters are both in moment_dtype
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(state0) if jnp.issubdtype(leaf.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(moments)}


def _rounded(v, e, u: float) -> Tracked:
    """An operation's exact value v, its propagated error e, plus one rounding of unit roundoff u."""
    return Tracked(v, e + u * (np.abs(v) + e))


def _divided(a: Tracked, b: Tracked, u: float) -> Tracked:
    """a / b: |a/b - a'/b'| <= (e_a + |a/b| e_b) / (|b| - e_b), then one rounding."""
    q = a.v / b.v
    return _rounded(q, (a.e + np.abs(q) * b.e) / (np.abs(b.v) - b.e), u)


def adam_last_update(
    grads: list[np.ndarray], lr: float, b1: float, b2: float, eps: float, u: float
) -> Tracked:
    """Adam's update at the last of these gradient steps (optax.adam's formulas, its f32 constants,
    float64 arithmetic) and a bound on any implementation in which every operation, the moments'
    storage, the constants and the bias corrections round with unit roundoff at most `u` (f32: U_F32;
    bf16 moments: U_BF16, since XLA may compute an op on bf16 operands in bf16 or in f32). The decays'
    powers are held to 4 f32 ulps."""
    c1, c2 = float(np.float32(b1)), float(np.float32(b2))
    d1, d2 = float(np.float32(1 - b1)), float(np.float32(1 - b2))
    m = v = Tracked.exact(np.zeros_like(grads[0], np.float64))

    def decayed(t: Tracked, c: float, d: float, x: Tracked) -> Tracked:
        first = _rounded(d * x.v, d * x.e, u)
        second = _rounded(c * t.v, c * t.e + u * c * t.mag, u)  # the constant rounded too
        total = _rounded(first.v + second.v, first.e + second.e, u)
        return _rounded(total.v, total.e, u)  # stored in the moments' dtype

    for g in grads:
        g = Tracked.exact(np.asarray(g, np.float64))
        m = decayed(m, c1, d1, g)
        v = decayed(v, c2, d2, _rounded(g.v**2, 0.0, U_F32))
    k = len(grads)

    def correction(c: float) -> Tracked:
        power = c**k
        return _rounded(1 - power, 4 * U_F32 * power, u)

    m_hat, v_hat = _divided(m, correction(c1), u), _divided(v, correction(c2), u)
    root = _rounded(np.sqrt(v_hat.v), v_hat.e / np.sqrt(v_hat.v - v_hat.e), u)
    den = _rounded(root.v + eps, root.e + u * eps, u)
    step = _divided(m_hat, den, u)
    return _rounded(-lr * step.v, lr * step.e + u * lr * step.mag, u)


def test_bf16_moments_keep_the_adam_update_within_the_bound_of_bf16_storage():
    params = {"w": jax.random.normal(jax.random.key(0), (64,), jnp.float32)}
    labels = {"w": "full"}
    grads = [jax.random.normal(jax.random.key(k + 1), (64,), jnp.float32) for k in range(5)]
    updates = {}
    for moments in ("float32", "bfloat16"):
        group = GroupConfig("adam", lr_peak=0.1, schedule="constant", moment_dtype=moments)
        tx = make_optimizer(labels, {"full": group}, total_steps=10, clip_norm=None)
        state, p = init_optimizer_state(tx, params), params
        for g in grads:  # Adam's update depends on the gradients alone, not on the parameters
            u, state = tx.update({"w": g}, state, p)
            p = optax.apply_updates(p, u)
        updates[moments] = np.asarray(u["w"], np.float32)
    lr = float(np.float32(0.1))
    for moments, unit in (("float32", U_F32), ("bfloat16", U_BF16)):
        want = adam_last_update([np.asarray(g) for g in grads], lr, 0.9, 0.999, 1e-8, unit)
        assert_within(updates[moments], want, f"Adam's update with {moments} moments")
    assert not np.array_equal(updates["bfloat16"], updates["float32"])  # the option does round


def test_an_unknown_moment_dtype_is_refused():
    with pytest.raises(ValueError, match="moment_dtype must be one of"):
        GroupConfig(moment_dtype="float16")
