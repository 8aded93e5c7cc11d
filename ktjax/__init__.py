"""ktjax: fine-tune Mixture-of-Experts models in JAX with the routed experts computed on the CPU."""

from ktjax import ffi
from ktjax.ops import moe_experts

__all__ = ["ffi", "moe_experts"]
__version__ = "0.1.0"
