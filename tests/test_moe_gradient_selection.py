"""Only the gradients being differentiated are computed: frozen tensors cost no FLOPs and no memory."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from moe_testing import make_problem

from ktjax import ffi
from ktjax.ops import moe_experts

pytestmark = pytest.mark.kernels


def counted(fn, *args):
    """Runs fn(*args), waits for it, and returns (result, kernel counters it added)."""
    ffi.reset_kernel_counters()
    out = jax.block_until_ready(fn(*args))
    return out, ffi.kernel_counters()


def backward_output_shapes(fn, *args) -> list[tuple[int, ...]]:
    """Shapes of the backward kernel's outputs in the jaxpr of fn (searched through sub-jaxprs)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.params.get("target_name") == ffi.BACKWARD_TARGET:
                found.append([tuple(v.aval.shape) for v in eqn.outvars])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    assert len(found) == 1, f"expected one backward call, found {len(found)}"
    return found[0]


P = make_problem(0, T=16, K=2, E=4, H=48, I=32, ranks={"gate": 2, "up": 2, "down": 2})
KEPT_SLOTS = 16 * 2


def lora_loss(ag, bg, au, bu, ad, bd):
    lora = {"gate": (ag, bg), "up": (au, bu), "down": (ad, bd)}
    return jnp.sum(moe_experts(*P.args(), lora=lora, lora_scale=P.scale) ** 2)


def test_frozen_base_weights_with_lora_trained_cost_no_base_gradient_work():
    adapters = [t for key in ("gate", "up", "down") for t in P.lora[key]]
    grad_fn = jax.jit(jax.grad(lora_loss, argnums=tuple(range(6))))
    grads, counts = counted(grad_fn, *adapters)
    assert counts["base_grad"] == 0
    assert counts["lora_grad"] > 0 and counts["input_grad"] > 0
    assert all(float(jnp.abs(g).max()) > 0 for g in grads)
    # No gradient memory either: the kernel's outputs for gate, up, down (and dx, d weights) are empty.
    shapes = backward_output_shapes(grad_fn, *adapters)
    assert shapes[:5] == [(0,)] * 5
    assert [s for s in shapes[5:]] == [tuple(t.shape) for t in adapters]


def test_full_training_of_down_only_computes_only_downs_base_gradient():
    def loss(down):
        return jnp.sum(moe_experts(P.x, P.ids, P.weights, P.gate, P.up, down) ** 2)

    grad_fn = jax.jit(jax.grad(loss))
    _, counts = counted(grad_fn, P.down)
    H, I = P.x.shape[1], P.gate.shape[1]
    assert counts["base_grad"] == 2 * KEPT_SLOTS * H * I  # exactly one [H, I] GEMM over every slot
    assert counts["lora_grad"] == 0
    assert counts["input_grad"] == 0  # nothing upstream of h is differentiated
    shapes = backward_output_shapes(grad_fn, P.down)
    assert shapes == [(0,), (0,), (0,), (0,), tuple(P.down.shape)] + [(0,)] * 6


def test_input_and_router_gradients_alone_do_no_weight_gradient_work():
    def loss(x, w):
        return jnp.sum(moe_experts(x, P.ids, w, P.gate, P.up, P.down) ** 2)

    _, counts = counted(jax.jit(jax.grad(loss, argnums=(0, 1))), P.x, P.weights)
    assert counts["base_grad"] == 0 and counts["lora_grad"] == 0
    assert counts["input_grad"] > 0


def test_forward_flops_are_counted_exactly():
    _, counts = counted(jax.jit(moe_experts), *P.args())
    H, I = P.x.shape[1], P.gate.shape[1]
    assert counts["forward"] == 2 * KEPT_SLOTS * 3 * H * I
    assert counts["forward_calls"] == 1 and counts["backward_calls"] == 0


def test_recompute_policy_redoes_the_gate_up_projections_in_backward():
    def loss(x, policy):
        return jnp.sum(moe_experts(x, P.ids, P.weights, P.gate, P.up, P.down, policy=policy) ** 2)

    H, I = P.x.shape[1], P.gate.shape[1]
    _, retain = counted(jax.jit(jax.grad(lambda x: loss(x, "retain"))), P.x)
    _, recompute = counted(jax.jit(jax.grad(lambda x: loss(x, "recompute"))), P.x)
    assert retain["recompute"] == 0
    assert recompute["recompute"] == 2 * KEPT_SLOTS * 2 * H * I
    np.testing.assert_array_equal(
        jax.grad(lambda x: loss(x, "retain"))(P.x), jax.grad(lambda x: loss(x, "recompute"))(P.x)
    )
