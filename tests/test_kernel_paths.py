"""Every path of the kernels' GEMM driver, forced on every ISA this CPU has, against the reference.

Which path a product takes depends on the ISA (KTJAX_ISA forces one) and on the shapes: the cases below
pick shapes that reach each path whatever CPU runs them, so no path is tested only where a machine
happens to choose it. ktjax.ffi.path_flops() names every path the driver has: a path added there
without a case here fails test_every_path_of_the_gemm_driver_has_a_case.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from moe_testing import check_against_reference, make_problem
from test_quant_kernels import check as check_quantized
from test_quant_kernels import quantized_problem

from ktjax import ffi

pytestmark = pytest.mark.kernels

ISAS = ("avx512_bf16", "avx512", "avx2", "generic")
# ISA avx512_bf16 only
PAIR_PATHS = ("pairs", "pair_dot", "pair_direct", "packed_once_pairs", "quant_pair_dot", "quant_pairs")

# Problems (make_problem arguments, and the dtype of x and of the weights).
CASES = {
    # f32: every product packed; the base-weight gradients against token rows packed once per expert.
    "f32_tokens": dict(T=60, K=2, E=3, H=72, I=40, dtype=(jnp.float32, jnp.float32)),
    # ~7 f32 tokens per expert against bf16 weights: the forward's projections read the weights in place
    # (dot: stored [N, K]), and so does the chain to dx (direct: stored [K, N]).
    "few_tokens": dict(T=10, K=2, E=3, H=72, I=40, dtype=(jnp.float32, jnp.bfloat16)),
    # LoRA's rank-r products over 600 tokens per expert: narrower than the tile, computed transposed.
    "narrow_products": dict(T=1200, K=1, E=2, H=24, I=8, ranks={"gate": 4, "down": 8}),
    # bf16 tokens and weights (bf16 intermediates): pairs of bf16 operands, packed past 96 tokens per
    # expert and read in place below, the weight gradients against pairs packed once.
    "bf16_many_tokens": dict(T=130, K=1, E=1, H=72, I=40, dtype=(jnp.bfloat16, jnp.bfloat16)),
    "bf16_few_tokens": dict(T=10, K=2, E=3, H=72, I=40, dtype=(jnp.bfloat16, jnp.bfloat16)),
}
# The case that reaches each path of the driver, in the driver's order (ffi.path_flops()).
PATH_CASES = {
    "packed": "f32_tokens",
    "dot": "few_tokens",
    "direct": "few_tokens",
    "pairs": "bf16_many_tokens",
    "pair_dot": "bf16_few_tokens",
    "pair_direct": "bf16_few_tokens",
    "transposed": "narrow_products",
    "packed_once": "f32_tokens",
    "packed_once_pairs": "bf16_many_tokens",
    "quant_dot": "quantized_few_tokens",
    "quant_pair_dot": "quantized_bf16_few_tokens",
    "quant_pairs": "quantized_bf16_few_tokens",
}
# A quantized base (int4, every projection; tests/test_quant_kernels.py builds it), ~15 tokens per expert:
# the forward's products dequantize the weights into L1 (the quantized dot path).
QUANTIZED_CASE = "quantized_few_tokens"
# The same with bf16 tokens: the gate and up products multiply them by the codes as bf16 pairs, and the
# chain to dx its bf16 rows by bf16 copies of the weights (quant_pairs).
QUANTIZED_BF16_CASE = "quantized_bf16_few_tokens"
QUANTIZED_CASES = {QUANTIZED_CASE: jnp.float32, QUANTIZED_BF16_CASE: jnp.bfloat16}


def run_case(name: str) -> dict[str, int]:
    """Runs the case's forward and every gradient against the reference; returns its path_flops."""
    if name in QUANTIZED_CASES:
        p, exact = quantized_problem("int4", ("gate", "up", "down"), QUANTIZED_CASES[name], ranks={"up": 4})
        ffi.reset_kernel_counters()
        check_quantized(p, exact)
        return ffi.path_flops()
    args = dict(CASES[name])
    x_dtype, w_dtype = args.pop("dtype", (jnp.float32, jnp.float32))
    p = make_problem(50, **args, dtype=x_dtype)
    p.gate, p.up, p.down = (w.astype(w_dtype) for w in (p.gate, p.up, p.down))
    ffi.reset_kernel_counters()
    check_against_reference(p)
    return ffi.path_flops()


def test_every_path_of_the_gemm_driver_has_a_case():
    assert list(ffi.path_flops()) == list(PATH_CASES)
    assert set(PATH_CASES.values()) == set(CASES) | set(QUANTIZED_CASES)


@pytest.mark.parametrize("isa", ISAS)
def test_every_path_runs_on_every_isa_within_the_reference_bounds(isa, use_isa):
    use_isa(isa)
    assert ffi.selected_isa() == isa
    flops = {name: run_case(name) for name in [*CASES, *QUANTIZED_CASES]}
    for path, case in PATH_CASES.items():
        if isa != "avx512_bf16" and path in PAIR_PATHS:
            assert all(f[path] == 0 for f in flops.values()), f"{isa} has no {path} path"
        else:
            assert flops[case][path] > 0, f"{case} on {isa} did not take the {path} path"
