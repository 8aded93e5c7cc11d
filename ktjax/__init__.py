"""ktjax: fine-tune Mixture-of-Experts models in JAX with the routed experts computed on the CPU."""

import pkgutil

# Run from a source checkout after a plain `pip install .`, this package is the checkout's ktjax/,
# which has no compiled extension; extending the path lets `ktjax._ktjax_ffi` come from the
# installed copy (the checkout's Python modules still come first).
__path__ = pkgutil.extend_path(__path__, __name__)

from ktjax import ffi
from ktjax.ops import moe_experts

__all__ = ["ffi", "moe_experts"]
__version__ = "0.1.0"
