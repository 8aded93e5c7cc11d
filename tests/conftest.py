"""Test-wide settings: kernels fill every output with NaN first, so any element left unwritten fails."""

import os

os.environ["KTJAX_DEBUG_POISON"] = "1"
