"""Bad input to moe_experts raises a clear exception naming the argument; never a crash."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moe_testing import make_problem

from ktjax.ops import moe_experts

pytestmark = [pytest.mark.kernels, pytest.mark.sanitized]

P = make_problem(0, T=6, K=2, E=3, H=16, I=8, ranks={"gate": 2})


def call(**overrides):
    args = dict(x=P.x, topk_ids=P.ids, topk_weights=P.weights, gate=P.gate, up=P.up, down=P.down)
    kwargs = dict(lora=P.lora, lora_scale=P.scale)
    for k, v in overrides.items():
        (args if k in args else kwargs)[k] = v
    return jax.block_until_ready(moe_experts(*args.values(), **kwargs))


@pytest.mark.parametrize("bad_id", [3, 1000, -2, -7])
def test_out_of_range_expert_id_is_reported_by_the_kernel(bad_id):
    ids = np.array(P.ids)
    ids[4, 1] = bad_id
    with pytest.raises(Exception, match=rf"topk_ids\[4, 1\] = {bad_id} is out of range"):
        call(topk_ids=jnp.asarray(ids))


@pytest.mark.parametrize("bad_id", [3, 1000, -2])
def test_the_xla_backend_refuses_out_of_range_ids_and_gives_nan_rows_under_jit(bad_id):
    ids = np.array(P.ids)
    ids[4, 1] = bad_id
    with pytest.raises(ValueError, match=rf"topk_ids\[4, 1\] = {bad_id} is out of range"):
        call(topk_ids=jnp.asarray(ids), backend="xla")

    @jax.jit
    def f(ids):
        return moe_experts(P.x, ids, P.weights, P.gate, P.up, P.down, backend="xla")

    y = np.asarray(f(jnp.asarray(ids)))
    assert np.isnan(y[4]).all()  # the token with the bad id: NaN, not a finite wrong row
    others = np.delete(np.arange(len(ids)), 4)
    assert np.isfinite(y[others]).all()


def test_out_of_range_id_is_reported_in_the_backward_too():
    ids = np.array(P.ids)
    ids[0, 0] = 3
    with pytest.raises(Exception, match="topk_ids"):
        jax.block_until_ready(
            jax.grad(lambda x: jnp.sum(moe_experts(x, jnp.asarray(ids), P.weights, P.gate, P.up, P.down)))(
                P.x
            )
        )


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(x=P.x[:, :15]), r"gate must have shape \[E, I, H\]"),
        (dict(down=P.down[:, :, :7]), r"down must have shape \[E, H, I\]"),
        (dict(up=P.up[:2]), r"up must have shape \[E, I, H\]"),
        (dict(topk_weights=P.weights[:, :1]), r"topk_weights must have shape \[T, K\]"),
        (dict(topk_ids=P.ids[:5]), r"topk_ids must have shape \[T, K\]"),
        (dict(x=P.x[0]), r"x must have shape \[T, H\]"),
        (dict(lora={"gate": (P.lora["gate"][0], P.lora["gate"][1][:, :, :1])}), r"lora\['gate'\] B"),
        (dict(lora={"gate": (P.lora["gate"][0][:, :, :5], P.lora["gate"][1])}), r"lora\['gate'\] A"),
        (dict(lora={"down": P.lora["gate"]}), r"lora\['down'\] A must have shape"),
        (dict(lora={"mlp": P.lora["gate"]}), "unknown key 'mlp'"),
        (dict(lora={"gate": P.lora["gate"][0]}), r"lora\['gate'\] must be a pair"),
        (dict(lora_scale=float("nan")), "lora_scale must be a finite"),
        (dict(lora_scale=float("inf")), "lora_scale must be a finite"),
        (dict(backend="gpu"), "backend must be one of"),
        (dict(policy="save_all"), "policy must be one of"),
        (dict(intermediates="fp8"), "intermediates must be one of"),
        (dict(x=P.x.astype(jnp.bfloat16), intermediates="bf16", backend="xla"), "a mode of the CPU kernels"),
    ],
)
def test_bad_shapes_and_options_name_the_argument(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**overrides)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(topk_ids=P.ids.astype(jnp.int16)), "topk_ids must be int32"),
        (dict(topk_ids=P.ids.astype(jnp.float32)), "topk_ids must be int32"),
        (dict(topk_weights=P.weights.astype(jnp.bfloat16)), "topk_weights must be float32"),
        (dict(x=P.x.astype(jnp.float16)), "x must be bfloat16 or float32"),
        (dict(down=P.down.astype(jnp.bfloat16)), "gate, up and down must share one dtype"),
        (dict(gate=P.gate.astype(jnp.int32)), "gate must be bfloat16 or float32"),
        (dict(intermediates="bf16"), "intermediates='bf16' needs bfloat16 x, got float32"),
        (
            dict(lora={"gate": (P.lora["gate"][0], P.lora["gate"][1].astype(jnp.bfloat16))}),
            r"lora\['gate'\] A and B must share one dtype",
        ),
    ],
)
def test_bad_dtypes_name_the_argument(overrides, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(**overrides)


def test_unknown_isa_request_is_an_error_not_a_crash(monkeypatch):
    monkeypatch.setenv("KTJAX_ISA", "sve2")
    with pytest.raises(Exception, match="KTJAX_ISA names an ISA"):
        call()


def kernel_forward(intermediates="f32", save_preact=False, named_lora=None):
    """The forward kernel called directly, past the Python checks (which stop these inputs first)."""
    from ktjax.ops.moe_experts import _forward_call, _named_inputs

    lora = dict(P.lora) if named_lora is None else named_lora
    named, quant = _named_inputs(*P.args(), lora)
    return jax.block_until_ready(_forward_call(named, lora, quant, 1.0, intermediates, save_preact))


@pytest.mark.parametrize("save_preact", [False, True])
def test_kernels_refuse_bf16_intermediates_with_f32_tokens(save_preact):
    with pytest.raises(Exception, match="intermediates='bf16' needs bf16 tokens x"):
        kernel_forward(intermediates="bf16", save_preact=save_preact)


def test_kernels_refuse_an_unknown_intermediates_mode():
    with pytest.raises(Exception, match="intermediates must be f32 or bf16, got 'f16'"):
        kernel_forward(intermediates="f16")


def raw_forward(args: list, **attrs):
    """The forward kernel on raw arguments (x first) and attributes (what ktjax.ops would never pass)."""
    op = importlib.import_module("ktjax.ops.moe_experts")  # the module (ktjax.ops.moe_experts is the op)
    empty = jax.ShapeDtypeStruct((0,), jnp.float32)
    call = jax.ffi.ffi_call(op.ffi.FORWARD_TARGET, (jax.ShapeDtypeStruct(P.x.shape, P.x.dtype), empty, empty))
    attrs = (
        dict(adapters="", quant="", lora_scale=np.float32(1), intermediates="f32", save_preact=False) | attrs
    )
    return jax.block_until_ready(call(*args, **attrs))


@pytest.mark.parametrize(
    "adapters, pattern",
    [
        # Out of order, or not a projection: the attribute that names the adapter arrays is refused.
        ("up,gate", "adapters must list gate, up, down in that order"),
        ("gate,mlp", "got 'mlp'"),
    ],
)
def test_kernels_refuse_a_bad_adapters_attribute(adapters, pattern):
    a, b = P.lora["gate"]
    with pytest.raises(Exception, match=pattern):
        raw_forward([*P.args(), a, b, a, b], adapters=adapters)


def test_kernels_refuse_adapter_arrays_the_attribute_does_not_name():
    a, b = P.lora["gate"]
    pattern = r"adapters 'gate' and quant '' need 2 more arrays \(A, B of each adapter, then scales\), got 4"
    with pytest.raises(Exception, match=pattern):
        raw_forward([*P.args(), a, b, a, b], adapters="gate")


def test_good_call_still_works_after_errors():
    assert np.isfinite(np.asarray(call())).all()
