"""Rounding and error bounds that the suite's numerical assertions check, derived from the arithmetic.

Every tolerance in the kernel tests comes from here, computed from the actual operands (running error
analysis, Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3): a ``Tracked`` value holds
what the math gives (float64, exact for our purposes: its own error is ~2^-53 relative) and a bound on
how far any correct implementation of the kernels' arithmetic may be from it. The bounds rest only on
IEEE arithmetic with round to nearest:

- one f32 rounding moves a value by at most ``U_F32 * |value|`` (unit roundoff 2^-24);
- a sum of n terms, in any association order (blocked, pairwise, FMA chains, the two products inside
  one ``vdpbf16ps`` added with one or two roundings), is within ``gamma(n) * sum |terms|`` of the exact
  sum: each term passes through at most n roundings, and gamma(n) = n u / (1 - n u);
- errors already in the operands propagate through a product by ``|a| e_b + e_a |b| + e_a e_b``.

bf16 values are rounded here by ``round_to_bf16`` (ours, not a library's conversion path): to the
nearest bf16 with ties to even, from the float64 value directly (one rounding). A kernel that rounds
its f32 value instead lands on the same bf16 value unless a rounding boundary lies between the two, and
``bf16_may_round_either_way`` says where that can happen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

U_F32 = 2.0**-24  # unit roundoff of f32 (24 significant bits)
U_BF16 = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
BF16_BITS = 8


def gamma(n: int | np.ndarray, u: float = U_F32) -> float | np.ndarray:
    """gamma(n) = n u / (1 - n u): the relative bound of n roundings in sequence (n u < 1)."""
    nu = np.asarray(n, np.float64) * u
    assert np.all(nu < 0.5), "n u must stay far below 1 for the bound to mean anything"
    return nu / (1.0 - nu)


def round_to_bf16(a) -> np.ndarray:
    """a rounded to the nearest bf16 value, ties to even, from float64 in one rounding; float64 result.

    bf16 has f32's exponent range: 8 significant bits down to 2^-126, a fixed spacing of 2^-133 below
    (subnormals), and values from 2^128 on (after rounding) become infinities. NaN stays NaN."""
    a = np.asarray(a, np.float64)
    _, exponent = np.frexp(a)  # |a| in [2^(exponent-1), 2^exponent)
    exponent = np.maximum(exponent, -125)  # below 2^-126 the spacing stays 2^-133
    rounded = np.ldexp(np.rint(np.ldexp(a, BF16_BITS - exponent)), exponent - BF16_BITS)  # rint: ties to even
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(rounded) >= 2.0**128, np.copysign(np.inf, a), rounded)


def round_to_f32(a) -> np.ndarray:
    """a rounded to the nearest f32 value (IEEE, ties to even); float64 result."""
    return np.asarray(np.asarray(a, np.float64).astype(np.float32), np.float64)


def bf16_ulp(a) -> np.ndarray:
    """The spacing of bf16 values at |a|: 2^(floor(log2 |a|) + 1 - 8) (0 where a is 0)."""
    _, exponent = np.frexp(np.asarray(a, np.float64))
    return np.where(np.asarray(a) == 0, 0.0, np.ldexp(1.0, exponent - BF16_BITS))


def bf16_may_round_either_way(v, e) -> np.ndarray:
    """Whether a value known only to lie within [v - e, v + e] may round to a different bf16 value than v:
    the interval contains a rounding boundary (a midpoint between two neighbouring bf16 values, or
    where the spacing changes)."""
    v, e = np.asarray(v, np.float64), np.asarray(e, np.float64)
    return (round_to_bf16(v - e) != round_to_bf16(v)) | (round_to_bf16(v + e) != round_to_bf16(v))


@dataclass
class Tracked:
    """v: the exact value (float64); e: a bound on |computed - v| for the kernels' f32 arithmetic;
    terms: where the kernels compute with this value as a sum of parts (an int4 weight as code x scale +
    min), the sum of the parts' magnitudes, which then replaces |v| in the rounding bounds of products
    that read it (None: |v|)."""

    v: np.ndarray
    e: np.ndarray
    terms: np.ndarray | None = None

    @staticmethod
    def exact(v) -> Tracked:
        v = np.asarray(v, np.float64)
        return Tracked(v, np.zeros_like(v))

    @property
    def mag(self) -> np.ndarray:
        """A bound on the magnitude of what the kernels compute with."""
        return (np.abs(self.v) if self.terms is None else self.terms) + self.e

    def __getitem__(self, index) -> Tracked:
        return Tracked(self.v[index], self.e[index], None if self.terms is None else self.terms[index])

    @property
    def T(self) -> Tracked:  # noqa: N802 - as numpy's
        return Tracked(self.v.T, self.e.T, None if self.terms is None else self.terms.T)


def matmul(a: Tracked, b: Tracked, terms: int, scale: float = 1.0) -> Tracked:
    """scale * (a @ b) accumulated in f32 into an accumulator that sums `terms` products in all (this
    product's and others added into the same output: then their contributions' bounds add up)."""
    v = scale * (a.v @ b.v)
    propagated = np.abs(a.v) @ b.e + a.e @ np.abs(b.v) + a.e @ b.e
    rounding = gamma(terms + (scale != 1.0)) * (a.mag @ b.mag)
    return Tracked(v, abs(scale) * (propagated + rounding))


def mul(a: Tracked, b: Tracked) -> Tracked:
    """a * b elementwise, rounded once."""
    v = a.v * b.v
    e = np.abs(a.v) * b.e + a.e * np.abs(b.v) + a.e * b.e
    return Tracked(v, e + U_F32 * a.mag * b.mag)


def add(*parts: Tracked) -> Tracked:
    """The sum of parts whose bounds already count the roundings of their common accumulation."""
    return Tracked(sum(p.v for p in parts), sum(p.e for p in parts))


def rounded_to_bf16(a: Tracked) -> Tracked:
    """bf16(a): the reference rounds its exact value; the kernel's rounding of its own value agrees
    unless a boundary lies within a's bound, and then differs by one bf16 step at most."""
    v = round_to_bf16(a.v)
    flip = bf16_may_round_either_way(a.v, a.e)
    return Tracked(v, np.where(flip, bf16_ulp(a.mag), 0.0))


def bf16_rounding_as_error(a: Tracked) -> Tracked:
    """bf16(a) described by a's exact value and a bound that includes the rounding (half a bf16 step)."""
    return Tracked(a.v, a.e + 0.5 * bf16_ulp(a.mag))


def assert_within(got, want: Tracked, what: str) -> None:
    """got (an f32 result) is within want's bound, plus its own final rounding to f32."""
    got = np.asarray(got, np.float64)
    assert got.shape == want.v.shape, f"{what}: shape {got.shape}, want {want.v.shape}"
    allowed = want.e + U_F32 * want.mag
    err = np.abs(got - want.v)
    _report(err > allowed, err, allowed, got, want, what)


def assert_bf16_within(got, want: Tracked, what: str) -> None:
    """got (a bf16 result: the kernel's f32 value rounded once) equals round_to_bf16(want) wherever no
    rounding boundary lies within want's bound, and is at most half a bf16 step past the bound elsewhere."""
    got = np.asarray(np.asarray(got, np.float32), np.float64)
    assert got.shape == want.v.shape, f"{what}: shape {got.shape}, want {want.v.shape}"
    either = bf16_may_round_either_way(want.v, want.e)
    allowed = np.where(either, want.e + 0.5 * bf16_ulp(want.mag), 0.0)
    err = np.where(either, np.abs(got - want.v), np.abs(got - round_to_bf16(want.v)))
    _report(err > allowed, err, allowed, got, want, what)


def assert_output_within(got, want: Tracked, what: str) -> None:
    """assert_bf16_within for a bf16 result, assert_within otherwise."""
    if np.asarray(got).dtype.name == "bfloat16":
        assert_bf16_within(got, want, what)
    else:
        assert_within(got, want, what)


def _report(bad, err, allowed, got, want, what):
    assert np.isfinite(want.v).all(), f"{what}: the reference is not finite"
    assert np.abs(want.v).max() > 0, f"{what}: the reference is all zeros: the test would prove nothing"
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - allowed, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements outside their bound; worst at {i}: "
            f"got {got[i]!r}, want {want.v[i]!r} +- {allowed[i]:.3e}"
        )


# Whole networks (models, training steps) are compared as a whole, not element by element: each output
# of an f32 evaluation is within gamma(depth) of the exact one relative to the magnitude of its terms,
# where depth counts the roundings on the longest path from the inputs (a sum of n terms: n). Relative to
# the largest output that magnitude is larger by however much the network's sums cancel; the random
# networks of the tests (weights of scale fan_in^-1/2, inputs O(1)) are taken to cancel by at most
# CANCELLATION, an assumption of these bounds (the element-wise kernel bounds above need none).
CANCELLATION = 4.0


def transformer_depth(layers: int, hidden: int, ffn: int, seq: int, experts: int, vocab: int) -> int:
    """Roundings on the longest path through a decoder's forward: per layer two norms (H each), the
    attention projections, scores and weighted sum (2 H + 2 S with the output projection), the router
    (H, softmax over E) and the MLP (H, its hidden width, a SiLU of 8), then the final norm, the head (H)
    and a log-softmax over the vocabulary."""
    per_layer = 2 * hidden + (2 * hidden + 2 * seq) + (hidden + experts) + (hidden + ffn + 8) + 16
    return layers * per_layer + 2 * hidden + vocab + 8


def network_tolerance(depth: int, u: float = U_F32, evaluations: int = 2) -> float:
    """max |a - b| / max |b| allowed between `evaluations` evaluations of the same network (e.g. two
    implementations): each within gamma(depth) * CANCELLATION of the exact result."""
    return evaluations * float(gamma(depth, u)) * CANCELLATION


def config_depth(cfg, seq: int) -> int:
    """transformer_depth of a ktjax ModelConfig run on sequences of `seq` tokens."""
    ffn = max(cfg.moe_intermediate_size, cfg.intermediate_size or 0)
    return transformer_depth(
        cfg.num_hidden_layers, cfg.hidden_size, ffn, seq, cfg.num_experts, cfg.vocab_size
    )
