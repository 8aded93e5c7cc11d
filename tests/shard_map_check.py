"""moe_experts inside jax.shard_map over 2 host devices (run as a script by tests/test_shard_map.py: the
device count is fixed when JAX starts, so it runs in its own process).

Two layouts, each checked against the same kernels run shard by shard outside shard_map, bit for bit:
- data parallel: tokens split over the mesh axis, experts and adapters replicated. Each shard's
  gradients of the replicated weights are its share: shard_map must sum them (the psum of 2 values is
  one f32 addition, done here by hand in the same order).
- expert parallel: the experts and their adapters split over the axis too, each shard's tokens routed
  to its own experts only. Every gradient stays with its shard.
- all_to_all: ktjax.ops.moe_sharded's expert parallelism, each shard's tokens routed to experts on any
  shard and exchanged with all_to_all, against moe_experts on one device with all the experts: the
  expert gradients equal, the tokens' results within two f32 evaluations' bound (the slots of a token
  are added in another order).
- model: a tiny Qwen3-MoE with ModelConfig.expert_axis, experts split and sequences split, against the
  same model on one device: logits' loss and every parameter's gradient within the network bound.
- training: ktjax.train's step with the experts split over the 2 devices against one device, full and
  hybrid rules; and a run stopped and resumed from its checkpoint on the mesh, bit for bit.
Prints "ok <layout> <dtype>" for each layout that matches; raises otherwise.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from error_bounds import network_tolerance, transformer_depth  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from ktjax.ops import moe_experts  # noqa: E402
from ktjax.ops.moe_sharded import moe_experts_sharded  # noqa: E402

T, H, I, E, K, R = 24, 32, 16, 4, 2, 4  # noqa: E741


def problem(seed: int, local_experts: bool, dtype) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, E, size=(T, K))
    if local_experts:  # tokens of shard s (rows s T/2 ..) routed to experts s E/2 ..
        half = np.arange(T) // (T // 2)
        ids = ids % (E // 2) + half[:, None] * (E // 2)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.3, dtype)  # noqa: E731
    return dict(
        x=normal(T, H),
        ids=jnp.asarray(ids, jnp.int32),
        w=jnp.asarray(rng.random((T, K)), jnp.float32),
        gate=normal(E, I, H),
        up=normal(E, I, H),
        down=normal(E, H, I),
        gate_a=normal(E, R, H),
        gate_b=normal(E, I, R),
        cot=jnp.asarray(rng.normal(size=(T, H)), jnp.float32),
    )


def loss_and_grads(p: dict, ids, cot, op=moe_experts):
    """The loss sum(y * cot) and its gradients w.r.t. x, w, gate, up (full) and gate's adapter."""

    def loss(x, w, gate, up, a, b):
        y = op(x, ids, w, gate, up, p["down"], lora={"gate": (a, b)}, lora_scale=0.5)
        return jnp.sum(y.astype(jnp.float32) * cot)

    args = (p["x"], p["w"], p["gate"], p["up"], p["gate_a"], p["gate_b"])
    return jax.value_and_grad(loss, argnums=tuple(range(6)))(*args)


def run(layout: str, dtype) -> None:
    experts = layout == "expert_parallel"
    p = problem(7, experts, dtype)
    mesh = jax.make_mesh((2,), ("d",))
    tok, exp = P("d"), P("d") if experts else P()
    names = ("x", "ids", "w", "gate", "up", "down", "gate_a", "gate_b", "cot")
    specs = (tok, tok, tok, exp, exp, exp, exp, exp, tok)

    def shard_step(x, ids, w, gate, up, down, a, b, cot):
        local = dict(x=x, w=w, gate=gate, up=up, down=down, gate_a=a, gate_b=b)
        if experts:
            ids = ids - jax.lax.axis_index("d") * (E // 2)  # global expert ids -> this shard's
        value, grads = loss_and_grads(local, ids, cot)
        return jax.lax.psum(value, "d"), grads

    grad_specs = (tok, tok, exp, exp, exp, exp)  # x, w, gate, up, gate_a, gate_b
    step = jax.jit(jax.shard_map(shard_step, mesh=mesh, in_specs=specs, out_specs=(P(), grad_specs)))
    placed = [jax.device_put(p[n], NamedSharding(mesh, s)) for n, s in zip(names, specs)]
    value, grads = step(*placed)

    # the same kernels, shard by shard, outside shard_map
    halves = []
    for s in range(2):
        rows = slice(s * T // 2, (s + 1) * T // 2)
        local = {n: p[n][rows] for n in ("x", "w", "cot")}
        ids = p["ids"][rows]
        if experts:
            cols = slice(s * E // 2, (s + 1) * E // 2)
            local |= {n: p[n][cols] for n in ("gate", "up", "down", "gate_a", "gate_b")}
            ids = ids - s * E // 2
        else:
            local |= {n: p[n] for n in ("gate", "up", "down", "gate_a", "gate_b")}
        halves.append(jax.jit(loss_and_grads)(local, ids, local["cot"]))
    want_value = halves[0][0] + halves[1][0]
    want = []
    for i in range(6):
        a, b = halves[0][1][i], halves[1][1][i]
        if i < 2 or experts:  # a token's (or a shard's own expert's) gradient: one shard's, in place
            want.append(jnp.concatenate([a, b]))
        else:  # a replicated weight's: the sum of the shards' shares
            want.append(a + b)
    assert np.array_equal(np.asarray(value), np.asarray(want_value)), (float(value), float(want_value))
    for name, got, exp_ in zip(("x", "w", "gate", "up", "gate_a", "gate_b"), grads, want):
        assert got.shape == exp_.shape, (layout, name, got.shape, exp_.shape)
        assert np.array_equal(np.asarray(got), np.asarray(exp_)), (layout, name, np.abs(got - exp_).max())
        assert np.abs(np.asarray(got, np.float32)).max() > 0, (layout, name, "all zeros")
    print("ok", layout, jnp.dtype(dtype).name)


def run_all_to_all() -> None:
    p = problem(8, False, jnp.float32)
    ids = np.asarray(p["ids"]).copy()
    ids[::5, 1] = -1  # dropped slots
    p["ids"] = jnp.asarray(ids)
    mesh = jax.make_mesh((2,), ("d",))
    names = ("x", "ids", "w", "gate", "up", "down", "gate_a", "gate_b", "cot")
    d = P("d")

    def shard_step(x, ids, w, gate, up, down, a, b, cot):
        local = dict(x=x, w=w, gate=gate, up=up, down=down, gate_a=a, gate_b=b)
        op = lambda *args, **kw: moe_experts_sharded(*args, axis_name="d", **kw)  # noqa: E731
        value, grads = loss_and_grads(local, ids, cot, op)
        return jax.lax.psum(value, "d"), grads

    step = jax.jit(jax.shard_map(shard_step, mesh=mesh, in_specs=(d,) * 9, out_specs=(P(), (d,) * 6)))
    value, grads = step(*[jax.device_put(p[n], NamedSharding(mesh, d)) for n in names])
    want_value, want = jax.jit(loss_and_grads)(p, p["ids"], p["cot"])
    # two f32 evaluations of the same sums in other orders: the longest chain of roundings is a gate
    # sum (H + R), the down sum (I), the SiLU (8), a token's slots (K) and the loss's sum (T H)
    depth = H + R + I + 8 + K + T * H
    tol = network_tolerance(depth)
    value, want_value = float(value), float(want_value)
    assert abs(value - want_value) <= tol * abs(want_value), (value, want_value)
    for name, got, exp_ in zip(("x", "w", "gate", "up", "gate_a", "gate_b"), grads, want):
        got, exp_ = np.asarray(got, np.float64), np.asarray(exp_, np.float64)
        assert got.shape == exp_.shape, (name, got.shape, exp_.shape)
        err = np.abs(got - exp_).max() / np.abs(exp_).max()
        assert err <= network_tolerance(depth - T * H + T * K), ("all_to_all", name, err)
    # an expert id past the last shard's experts is refused by the kernels, not dropped
    bad = p["ids"].at[3, 0].set(E)
    args = [jax.device_put(bad if n == "ids" else p[n], NamedSharding(mesh, d)) for n in names]
    try:
        jax.block_until_ready(step(*args))
    except Exception as e:  # noqa: BLE001 - the FFI's error, as XLA raises it
        assert "topk_ids" in str(e), e
    else:
        raise AssertionError("an out-of-range expert id was accepted")
    print("ok all_to_all float32")


def run_model() -> None:
    """A tiny Qwen3-MoE (f32, LoRA on the experts and attention) with ModelConfig.expert_axis: each
    shard holds half the experts and one of the batch's two sequences; logits and every parameter's
    gradient against the same model on one device."""
    from ktjax.models import build_model
    from ktjax.models.presets import qwen3_moe
    from ktjax.params import merge_model, split_model
    from ktjax.sharding import expert_specs

    tiny = dict(vocab_size=29, hidden_size=32, num_hidden_layers=2, head_dim=8, num_experts=8)
    cfg = qwen3_moe(**tiny, moe_intermediate_size=16, lora_rank=4, lora_targets=("experts", "q_proj"))
    defn, params = split_model(build_model(cfg, seed=3))
    sharded_defn, _ = split_model(build_model(dataclasses.replace(cfg, expert_axis="d"), seed=3))
    rng = np.random.default_rng(9)
    # LoRA's B starts at zero, which would make every A's gradient zero: random Bs instead
    params = {
        n: jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype) if n.endswith("lora_B") else a
        for n, a in params.items()
    }
    ids = jnp.asarray(rng.integers(0, 29, size=(2, 10)), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(2, 10, 29)), jnp.float32)

    def loss(params, defn, ids, cot):
        return jnp.sum(merge_model(defn, params)(ids) * cot)

    want_value, want = jax.jit(jax.value_and_grad(lambda p, i, c: loss(p, defn, i, c)))(params, ids, cot)
    mesh = jax.make_mesh((2,), ("d",))
    specs = expert_specs(params, "d")

    def shard_step(params, ids, cot):
        value, grads = jax.value_and_grad(loss)(params, sharded_defn, ids, cot)
        return jax.lax.psum(value, "d"), grads

    step = jax.jit(
        jax.shard_map(shard_step, mesh=mesh, in_specs=(specs, P("d"), P("d")), out_specs=(P(), specs))
    )
    place = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    value, grads = step(
        {n: place(a, specs[n]) for n, a in params.items()}, place(ids, P("d")), place(cot, P("d"))
    )
    # two f32 evaluations of the same network in other orders (a token's expert slots, the shards' sums)
    tol = network_tolerance(2 * transformer_depth(layers=2, hidden=32, ffn=16, seq=10, experts=8, vocab=29))
    assert abs(float(value) - float(want_value)) <= tol * abs(float(want_value)), (
        float(value),
        float(want_value),
    )
    assert sum(".experts." in n for n in params) > 0
    for name in params:
        got, exp_ = np.asarray(grads[name], np.float64), np.asarray(want[name], np.float64)
        assert got.shape == exp_.shape, (name, got.shape, exp_.shape)
        scale = np.abs(exp_).max()
        assert scale > 0, (name, "all zeros")
        assert np.abs(got - exp_).max() <= tol * max(scale, 1e-30), (name, np.abs(got - exp_).max(), scale)
    print("ok model float32")


def run_quantized_model() -> None:
    """The tiny model with int8 routed experts (a QuantizedWeight: its arrays split along E, its static
    shape the whole E) and ModelConfig.expert_axis: logits on the mesh against one device."""
    from ktjax.models import build_model
    from ktjax.models.presets import qwen3_moe
    from ktjax.params import merge_model, split_model
    from ktjax.sharding import expert_specs, place_params

    tiny = dict(vocab_size=29, hidden_size=32, num_hidden_layers=1, head_dim=8, num_experts=8)
    cfg = qwen3_moe(**tiny, moe_intermediate_size=16, expert_quant="int8")
    defn, params = split_model(build_model(cfg, seed=3))
    sharded_defn, _ = split_model(build_model(dataclasses.replace(cfg, expert_axis="d"), seed=3))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 29, size=(2, 10)), jnp.int32)
    want = np.asarray(jax.jit(lambda p, i: merge_model(defn, p)(i))(params, ids), np.float64)
    mesh = jax.make_mesh((2,), ("d",))
    specs = expert_specs(params, "d")
    step = jax.jit(
        jax.shard_map(
            lambda p, i: merge_model(sharded_defn, p)(i),
            mesh=mesh,
            in_specs=(specs, P("d")),
            out_specs=P("d"),
        )
    )
    got = np.asarray(step(place_params(params, mesh), jax.device_put(ids, NamedSharding(mesh, P("d")))))
    tol = network_tolerance(2 * transformer_depth(layers=1, hidden=32, ffn=16, seq=10, experts=8, vocab=29))
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max()
    print("ok quantized model")


def run_training(tmp: str) -> None:
    """One SGD step of ktjax.train with ModelConfig.expert_axis on 2 devices (experts, adapters and the
    batch's sequences split; the load-balancing loss over every shard's tokens) against the same step on
    one device, for full and hybrid rules: the loss, the load-balancing loss and every parameter
    after the step (SGD: the update is -lr times the gradient) within the network bound."""
    from ktjax.data import SortTask
    from ktjax.models import build_model, qwen3_moe
    from ktjax.optim import FULL_RULES, HYBRID_RULES, GroupConfig
    from ktjax.params import split_model
    from ktjax.train import TrainConfig, train

    task = SortTask(length=5, num_values=6)
    tiny = dict(vocab_size=task.vocab_size, hidden_size=32, num_hidden_layers=2, head_dim=8, num_experts=4)
    cfg = qwen3_moe(**tiny, moe_intermediate_size=16, lora_rank=4, lora_targets=("experts", "q_proj"))
    sgd = {g: GroupConfig("sgd", lr_peak=0.5, schedule="constant") for g in ("full", "lora")}
    depth = transformer_depth(layers=2, hidden=32, ffn=16, seq=11, experts=4, vocab=task.vocab_size)
    # full: every expert weight's gradient; hybrid: adapters (lora), attention and router (full), the
    # rest frozen (LoRA rules alone are a subset of these)
    for name, rules in (("full", FULL_RULES), ("hybrid", HYBRID_RULES)):
        opts = dict(steps=1, batch_size=8, micro_batches=2, log_every=1, eval_every=0, checkpoint_every=0)
        tcfg = TrainConfig(**opts, progress=False, groups=sgd, clip_norm=0, rules=rules)
        before = split_model(build_model(cfg, seed=1))[1]
        one = train(build_model(cfg, seed=1), task, tcfg, f"{tmp}/{name}_one")
        two = train(
            build_model(dataclasses.replace(cfg, expert_axis="d"), seed=1), task, tcfg, f"{tmp}/{name}_two"
        )
        tol = network_tolerance(2 * depth + 1)
        for key in ("loss", "load_balance_loss"):
            a, b = one.history[0][key], two.history[0][key]
            assert abs(a - b) <= tol * abs(a), (name, key, a, b)
        moved = 0
        for pname, label in one.labels.items():
            want = np.asarray(one.params[pname], np.float64) - np.asarray(before[pname], np.float64)
            got = np.asarray(two.params[pname], np.float64) - np.asarray(before[pname], np.float64)
            if label == "frozen" or not np.any(want):
                assert not np.any(got), (name, pname, "moved")
                continue
            moved += ".experts." in pname
            assert np.abs(got - want).max() <= tol * np.abs(want).max(), (
                name,
                pname,
                np.abs(got - want).max(),
            )
        assert moved > 0, (name, "no expert parameter was trained")
        print("ok training", name)
    # bf16 weights (bf16 linear layers with their own backward, a custom VJP) and rematerialised layers
    # (another, whose backward differentiates with jax.vjp) also train on the mesh; the per-slot bf16
    # results make it differ from one device by more than f32 rounding, so only that it runs
    bf16 = dataclasses.replace(cfg, expert_axis="d", param_dtype="bfloat16", remat="full")
    tcfg = TrainConfig(**opts, progress=False, groups=sgd, clip_norm=0, rules=HYBRID_RULES)
    result = train(build_model(bf16, seed=1), task, tcfg, f"{tmp}/bf16")
    assert np.isfinite(result.history[0]["loss"]) and np.isfinite(result.history[0]["grad_norm"]), (
        result.history
    )
    print("ok training bf16")
    # resume: 3 steps in one go against 1 step, a checkpoint restored onto the mesh, and 2 more
    tcfg = TrainConfig(**{**opts, "steps": 3, "checkpoint_every": 1}, progress=False, rules=HYBRID_RULES)
    split = dataclasses.replace(cfg, expert_axis="d")
    whole = train(build_model(split, seed=1), task, tcfg, f"{tmp}/whole")
    train(build_model(split, seed=1), task, tcfg, f"{tmp}/resumed", stop_after=1)
    resumed = train(build_model(split, seed=1), task, tcfg, f"{tmp}/resumed", resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history], (
        resumed.history,
        whole.history,
    )
    print("ok resume")


if __name__ == "__main__":
    assert jax.device_count() == 2, jax.devices()
    for dtype in (jnp.float32, jnp.bfloat16):
        run("data_parallel", dtype)
        run("expert_parallel", dtype)
    run_all_to_all()
    run_model()
    run_quantized_model()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_training(tmp)
