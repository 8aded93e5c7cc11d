"""Hybrid optimizer: path rules label every parameter ``full``, ``lora`` or ``frozen``.

The labels decide three things at once: which optax transformation updates a parameter
(``optax.multi_transform``; frozen -> ``optax.set_to_zero()``), which parameters ``jax.grad``
differentiates at all (only ``full`` and ``lora`` ones; the routed-expert kernels then skip the
gradient work of frozen expert weights), and what a checkpoint saves every step.

Rules are ordered ``(pattern, label)`` pairs matched against dotted parameter names; the first match
wins. A pattern is a glob (``*.self_attn.*``) or, prefixed with ``re:``, a regular expression.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ktjax.params import Params
from ktjax.quant.formats import is_quantized

LABELS = ("full", "lora", "frozen")
Rules = Sequence[tuple[str, str]]

# Common recipes. Each ends in a catch-all so every parameter gets a label.
FULL_RULES: Rules = (("*", "full"),)
LORA_RULES: Rules = (("*.lora_A", "lora"), ("*.lora_B", "lora"), ("*", "frozen"))
# Attention and routers trained in full, routed experts through LoRA, embeddings and the rest frozen.
HYBRID_RULES: Rules = (
    ("*.lora_A", "lora"),
    ("*.lora_B", "lora"),
    ("*.self_attn.*", "full"),
    ("*.gate.weight", "full"),
    ("*", "frozen"),
)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def label_params(names: Iterable[str], rules: Rules) -> dict[str, str]:
    """Label of each name under `rules` (first match wins). Raises ValueError for a bad label or a
    name no rule matches."""
    for pattern, label in rules:
        if label not in LABELS:
            raise ValueError(f"rule {pattern!r} -> {label!r}: label must be one of {LABELS}")
    labels = {}
    for name in names:
        label = next((lab for pat, lab in rules if _matches(pat, name)), None)
        if label is None:
            raise ValueError(f"no rule matches parameter {name!r}; end the rules with ('*', 'frozen')")
        labels[name] = label
    return labels


MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class GroupConfig:
    """Optimizer of one label group."""

    optimizer: str = "adamw"  # adamw | adam | sgd
    lr_peak: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    # adam/adamw moments: float32, or bfloat16 (half their memory; each update rounds them to bf16)
    moment_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.moment_dtype not in MOMENT_DTYPES:
            raise ValueError(
                f"moment_dtype must be one of {sorted(MOMENT_DTYPES)}, got {self.moment_dtype!r}"
            )


def learning_rate(group: GroupConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to lr_peak, then constant or cosine decay to lr_peak / 10 at total_steps."""
    warmup = optax.linear_schedule(0.0, group.lr_peak, max(group.warmup_steps, 1))
    if group.schedule == "constant":
        after = optax.constant_schedule(group.lr_peak)
    elif group.schedule == "cosine":
        decay_steps = max(total_steps - group.warmup_steps, 1)
        after = optax.cosine_decay_schedule(group.lr_peak, decay_steps, alpha=0.1)
    else:
        raise ValueError(f"schedule must be cosine or constant, got {group.schedule!r}")
    if group.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [group.warmup_steps])


def group_transform(group: GroupConfig, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate(group, total_steps)
    dtype = MOMENT_DTYPES[group.moment_dtype]
    if group.optimizer == "adamw":
        tx = optax.adamw(lr, b1=group.b1, b2=group.b2, weight_decay=group.weight_decay, mu_dtype=dtype)
    elif group.optimizer == "adam":
        tx = optax.adam(lr, b1=group.b1, b2=group.b2, mu_dtype=dtype)
    elif group.optimizer == "sgd":
        return optax.sgd(lr)
    else:
        raise ValueError(f"optimizer must be adamw, adam or sgd, got {group.optimizer!r}")
    return _moments_in(tx, dtype)


def _moments_in(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`tx` (adam or adamw) with both moments created in `dtype`. optax creates the second moment in
    each parameter's dtype and keeps it in its state's dtype, and keeps the first in `mu_dtype`; the
    update computes in float32 (the trainer's gradients) and stores them back in `dtype`. Fixed types
    across steps also keep the jitted step from compiling again at step 2."""

    def init(params):
        def cast(leaf):
            floating = isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating)
            return leaf.astype(dtype) if floating else leaf

        return jax.tree.map(cast, tx.init(params))

    return optax.GradientTransformation(init, tx.update)


def make_optimizer(
    labels: dict[str, str], groups: dict[str, GroupConfig], total_steps: int, clip_norm: float | None = 1.0
) -> optax.GradientTransformation:
    """optax.multi_transform over the labelled parameters (frozen -> set_to_zero), after global-norm
    clipping. Apply it to any subset of the labelled parameters (the trainer passes only trainable
    ones, so frozen tensors hold no optimizer state)."""
    used = set(labels.values()) - {"frozen"}
    missing = used - set(groups)
    if missing:
        raise ValueError(f"no optimizer group configured for label(s) {sorted(missing)}")
    transforms = {label: group_transform(groups[label], total_steps) for label in used}
    transforms["frozen"] = optax.set_to_zero()

    def param_labels(params: Params) -> dict[str, str]:
        return {name: labels[name] for name in params}

    tx = optax.multi_transform(transforms, param_labels)
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def init_optimizer_state(tx: optax.GradientTransformation, trainable: Params) -> optax.OptState:
    """``tx.init(trainable)``: each group's moments in its GroupConfig.moment_dtype (see _moments_in)."""
    return tx.init(trainable)


def split_trainable(params: Params, labels: dict[str, str]) -> tuple[Params, Params]:
    """(trainable, frozen) halves of a flat parameter dict. Raises ValueError naming a quantized
    parameter (ktjax.quant) that a rule labels anything but frozen: quantized bases are never trained."""
    for name, value in params.items():
        if is_quantized(value) and labels[name] != "frozen":
            raise ValueError(
                f"parameter {name!r} is a quantized ({value.format}) base weight and cannot be trained, but "
                f"a rule labels it {labels[name]!r}; label it 'frozen' (train it through LoRA adapters)"
            )
    trainable = {n: v for n, v in params.items() if labels[n] != "frozen"}
    frozen = {n: v for n, v in params.items() if labels[n] == "frozen"}
    return trainable, frozen


def parameter_summary(params: Params, labels: dict[str, str]) -> str:
    """A table of tensors, parameters and bytes per group; routed-expert LoRA and quantized frozen bases
    get their own rows."""
    rows: dict[str, list[int]] = {}
    for name, value in params.items():
        group = labels[name]
        if group == "lora" and ".experts." in name:
            group = "lora (routed experts)"
        if is_quantized(value):
            group = f"frozen ({value.format})"
        row = rows.setdefault(group, [0, 0, 0])
        row[0] += 1
        row[1] += int(np.prod(value.shape))
        row[2] += sum(
            int(np.prod(a.shape)) * jax.numpy.dtype(a.dtype).itemsize for a in jax.tree.leaves(value)
        )
    total = sum(r[1] for r in rows.values())
    lines = [f"{'group':<24}{'tensors':>8}{'params':>16}{'share':>8}{'MiB':>10}"]
    for group in sorted(rows):
        t, n, b = rows[group]
        lines.append(f"{group:<24}{t:>8}{n:>16,}{n / total:>8.1%}{b / 2**20:>10.2f}")
    trainable = sum(r[1] for g, r in rows.items() if not g.startswith("frozen"))
    lines.append(f"{'trainable':<24}{'':>8}{trainable:>16,}{trainable / total:>8.1%}")
    return "\n".join(lines)
