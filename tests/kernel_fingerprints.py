"""SHA-256 of every output of the expert kernels on a fixed set of random inputs, for checking that a
refactor leaves them bit-identical: run it before and after, on the same machine, and diff.

    python tests/kernel_fingerprints.py > before.txt   # ... change the kernels ...
    python tests/kernel_fingerprints.py > after.txt && diff before.txt after.txt

Every ISA this CPU can run (a subprocess each, KTJAX_ISA), f32 and bf16, both intermediates modes, both
policies, LoRA on all / some / no projections, dropped slots, small batches (the small-batch paths) and
larger ones (packed), and the gradients of each training mode (full, lora, frozen). The fingerprints
depend on the ISA, not on the worker count; they are not comparable across CPUs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

CASES = [
    # name, T, K, E, H, I, lora ranks, dropped slots
    ("small", 5, 2, 4, 96, 64, {"gate": 4, "up": 4, "down": 4}, False),
    ("dropped", 37, 3, 11, 200, 45, {"up": 3}, True),
    ("packed", 260, 4, 6, 384, 160, {"gate": 8, "down": 8}, False),
    ("no_lora", 130, 2, 3, 256, 96, {}, True),
]
MODES = {  # which arguments are differentiated
    "full": ("x", "topk_weights", "gate", "up", "down"),
    "lora": ("x", "topk_weights", "lora"),
    "frozen": ("x", "topk_weights"),
}


def digest(a) -> str:
    import numpy as np

    a = np.asarray(a)
    return hashlib.sha256(a.tobytes()).hexdigest()[:16] + f" {a.dtype}{list(a.shape)}"


def run_one_isa() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ktjax.ops import moe_experts

    for name, T, K, E, H, I, ranks, dropped in CASES:
        for dtype in (jnp.float32, jnp.bfloat16):
            rng = np.random.default_rng(len(name) * 7 + T)

            def randn(*shape, std=1.0, rng=rng, dtype=dtype):
                return jnp.asarray(rng.standard_normal(shape) * std, dtype)

            x = randn(T, H)
            ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
            if dropped:
                ids[rng.random(ids.shape) < 0.2] = -1
            ids = jnp.asarray(ids)
            w = jnp.asarray(rng.random((T, K)), jnp.float32)
            gate, up = randn(E, I, H, std=H**-0.5), randn(E, I, H, std=H**-0.5)
            down = randn(E, H, I, std=I**-0.5)
            dims = {"gate": (I, H), "up": (I, H), "down": (H, I)}
            lora = {
                p: (randn(E, r, dims[p][1], std=dims[p][1] ** -0.5), randn(E, dims[p][0], r, std=r**-0.5))
                for p, r in ranks.items()
            }
            dy = randn(T, H)
            modes = ["f32", "bf16"] if dtype == jnp.bfloat16 else ["f32"]
            for intermediates in modes:
                for policy in ("retain", "recompute"):
                    for mode, diff in MODES.items():
                        if mode == "lora" and not lora:
                            continue
                        args = {"x": x, "topk_weights": w, "gate": gate, "up": up, "down": down, "lora": lora}
                        primal = {k: args[k] for k in diff}

                        def f(primal, args=args, ids=ids, policy=policy, intermediates=intermediates):
                            a = {**args, **primal}
                            return moe_experts(
                                a["x"],
                                ids,
                                a["topk_weights"],
                                a["gate"],
                                a["up"],
                                a["down"],
                                lora=a["lora"] or None,
                                lora_scale=0.5,
                                policy=policy,
                                intermediates=intermediates,
                            )

                        y, vjp = jax.vjp(f, primal)
                        (grads,) = vjp(dy)
                        key = f"{name} {jnp.dtype(dtype).name} {intermediates} {policy} {mode}"
                        print(f"{key} y {digest(y)}")
                        for path, g in jax.tree_util.tree_leaves_with_path(grads):
                            print(f"{key} d{jax.tree_util.keystr(path)} {digest(g)}")


if __name__ == "__main__":
    if os.environ.get("KTJAX_ISA"):
        run_one_isa()
    else:
        from ktjax import ffi

        for isa in ffi.available_isas():
            out = subprocess.run(
                [sys.executable, __file__],
                env={**os.environ, "KTJAX_ISA": isa},
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for line in out.splitlines():
                print(f"{isa} {line}")
