"""Training end to end on tiny models: hybrid invariants, overfitting in every mode, exact resume,
checkpoint errors, gradient accumulation, adapter export."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from error_bounds import network_tolerance, transformer_depth
from moe_testing import rel_err

from ktjax import ffi
from ktjax.checkpoint import Checkpoints
from ktjax.data import SortTask
from ktjax.models import build_model, qwen3_moe
from ktjax.optim import FULL_RULES, HYBRID_RULES, LORA_RULES, GroupConfig
from ktjax.params import merge_lora, merge_model, split_model
from ktjax.train import TrainConfig, train

TASK = SortTask(length=5, num_values=6)
# Roundings on the longest path through tiny()'s forward (sequences of 2 * 5 + 1 tokens).
TINY_DEPTH = transformer_depth(layers=2, hidden=32, ffn=16, seq=11, experts=4, vocab=TASK.vocab_size)


def tiny(**kw):
    base = dict(
        vocab_size=TASK.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        head_dim=8,
        num_experts=4,
        moe_intermediate_size=16,
        lora_rank=4,
        lora_alpha=8.0,
        lora_targets=("experts",),
    )
    return qwen3_moe(**{**base, **kw})


class OneBatch:
    """The same small batch every step: a model that learns must overfit it."""

    def __init__(self, size=8):
        self.fixed = TASK.batch(0, size)

    def batch(self, step, batch_size):
        return self.fixed

    def eval_batch(self, batch_size):
        return self.fixed


def config(**kw):
    groups = {
        "full": GroupConfig(lr_peak=1e-2, schedule="constant"),
        "lora": GroupConfig(lr_peak=3e-2, schedule="constant"),
    }
    base = dict(
        steps=40, batch_size=8, log_every=1, eval_every=0, checkpoint_every=0, progress=False, groups=groups
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("rules", [FULL_RULES, LORA_RULES, HYBRID_RULES], ids=["full", "lora", "hybrid"])
def test_tiny_model_overfits_a_small_batch_in_every_mode(rules, tmp_path):
    result = train(build_model(tiny()), OneBatch(), config(steps=60, rules=rules), tmp_path)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    # Not a rounding bound but a behaviour: a model that learns memorises one batch of 8 sequences in 60
    # steps, far below a quarter of the loss it starts at (chance, about ln(vocab)); one whose updates
    # were lost or wrong stays near its start.
    assert last < first / 4, f"loss {first:.3f} -> {last:.3f}"


def test_hybrid_training_keeps_frozen_and_lora_base_weights_bit_identical(tmp_path):
    model = build_model(tiny(lora_targets=("experts", "q_proj")))
    _, before = split_model(model)
    ffi.reset_kernel_counters()
    result = train(model, OneBatch(), config(steps=5, rules=HYBRID_RULES), tmp_path)
    counts = ffi.kernel_counters()
    after = result.params
    for name, label in result.labels.items():
        same = np.array_equal(np.asarray(before[name]), np.asarray(after[name]))
        if label == "frozen":
            assert same, f"frozen {name} changed"
        elif not name.endswith("lora_A") or "experts" not in name:
            assert not same, f"{label} {name} did not change"
    assert result.labels["model.layers.0.mlp.experts.gate_proj.weight"] == "frozen"
    assert result.labels["model.layers.0.self_attn.q_proj.lora_A"] == "lora"
    assert counts["backward_calls"] > 0 and counts["lora_grad"] > 0
    assert counts["base_grad"] == 0  # the expert kernels never computed a base-weight gradient


@pytest.mark.slow
def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path):
    cfg = config(steps=12, checkpoint_every=4, rules=HYBRID_RULES)
    whole = train(build_model(tiny()), TASK, cfg, tmp_path / "whole", keep_model=False)  # model donated
    train(build_model(tiny()), TASK, cfg, tmp_path / "split", stop_after=6)  # "crashes" after step 6
    resumed = train(
        build_model(tiny(), seed=99), TASK, cfg, tmp_path / "split", resume=True
    )  # restores step 4
    keys = ("loss", "grad_norm", "load_balance_loss")
    want = [[r[k] for k in keys] for r in whole.history if r["step"] > 4]
    got = [[r[k] for k in keys] for r in resumed.history if r["step"] > 4]
    assert got == want  # bit-identical metrics from step 5 on
    for name in whole.params:
        np.testing.assert_array_equal(whole.params[name], resumed.params[name], err_msg=name)
    logged = [
        json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == sorted(logged)  # steps 5-6 of the interrupted run were dropped, not duplicated


def test_restoring_into_a_different_model_names_the_parameter(tmp_path):
    train(build_model(tiny()), OneBatch(), config(steps=2, rules=HYBRID_RULES), tmp_path)
    ckpt = Checkpoints(tmp_path / "checkpoints")
    _, params = split_model(build_model(tiny(lora_rank=8)))
    trainable = {
        n: v for n, v in params.items() if "lora" in n or "self_attn" in n or n.endswith("gate.weight")
    }
    with pytest.raises(
        ValueError,
        match=r"parameter '.*lora_A' has shape \(4, 4, \d+\) in the checkpoint but \(4, 8, \d+\)",
    ):
        ckpt.restore_latest(trainable, None, {})
    smaller = {n: v for n, v in trainable.items() if "layers.1" not in n}
    with pytest.raises(ValueError, match=r"the checkpoint has parameter 'model\.layers\.1\."):
        ckpt.restore_latest(smaller, None, {})
    _, params = split_model(build_model(tiny(qk_norm=False, lora_targets=("experts", "v_proj"))))
    with pytest.raises(ValueError, match="is not in the checkpoint"):
        train(
            build_model(tiny(lora_targets=("experts", "v_proj"))),
            OneBatch(),
            config(steps=3, rules=HYBRID_RULES),
            tmp_path,
            resume=True,
        )


@pytest.mark.slow
def test_micro_batches_give_the_same_step_as_one_batch(tmp_path):
    sgd = {g: GroupConfig("sgd", lr_peak=0.5, schedule="constant") for g in ("full", "lora")}
    before = split_model(build_model(tiny()))[1]
    # No load-balancing loss here: it is a product of batch statistics, so it is not additive over
    # micro-batches (in any framework). The cross-entropy gradient is, up to f32 rounding.
    opts = dict(steps=1, groups=sgd, clip_norm=0, aux_loss_coef=0.0)
    one = train(build_model(tiny()), TASK, config(**opts), tmp_path / "a")
    four = train(build_model(tiny()), TASK, config(**opts, micro_batches=4), tmp_path / "b")
    # The same per-token losses (up to each forward's f32 arithmetic) averaged in another order.
    np.testing.assert_allclose(
        one.history[0]["loss"], four.history[0]["loss"], rtol=network_tolerance(TINY_DEPTH)
    )
    for name, label in one.labels.items():
        if label != "frozen":  # SGD: the update is -lr * gradient, so equal updates = equal gradients
            step_one = np.asarray(one.params[name]) - np.asarray(before[name])
            step_four = np.asarray(four.params[name]) - np.asarray(before[name])
            if not np.any(step_one):  # LoRA A while B = 0 has a zero gradient: both must be exactly 0
                assert not np.any(step_four), name
            else:
                # Per-token gradients summed over micro-batches and then across them: a backward's
                # f32 arithmetic on either side, plus one rounding of the lr product.
                assert rel_err(step_four, step_one) < network_tolerance(2 * TINY_DEPTH + 1), name


@pytest.mark.slow
def test_trained_adapters_merged_into_the_base_give_the_adapted_models_logits(tmp_path):
    cfg = tiny(lora_targets=("experts", "o_proj"))
    result = train(build_model(cfg), OneBatch(), config(steps=5, rules=LORA_RULES), tmp_path)
    merged = merge_lora(result.params, cfg.lora_scale)
    adapted_def, _ = split_model(build_model(cfg))
    plain_def, plain = split_model(build_model(cfg.replace(lora_rank=0, lora_targets=())))
    assert set(merged) == set(plain)
    ids = OneBatch().fixed["input_ids"]
    want = merge_model(adapted_def, result.params)(ids)
    got = merge_model(plain_def, {n: jax.numpy.asarray(v) for n, v in merged.items()})(ids)
    # The merged weights W + s B A (rounded once, an f32 sum of r products) instead of the adapter's
    # separate products: two f32 forwards of the same model, a few roundings apart.
    tolerance = network_tolerance(TINY_DEPTH + cfg.lora_rank + 2)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * float(np.abs(want).max()))


def test_a_run_told_never_to_checkpoint_writes_no_checkpoint_files(tmp_path):
    result = train(build_model(tiny()), OneBatch(), config(steps=3, checkpoint_every=-1), tmp_path)
    assert len(result.history) == 3
    assert not any(p.is_file() for p in (tmp_path / "checkpoints").rglob("*"))
    with pytest.raises(ValueError, match="checkpoint_every must be -1"):
        config(checkpoint_every=-2)
