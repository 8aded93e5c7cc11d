"""Loads the compiled kernels once and registers every FFI target with JAX for platform ``cpu``; the
ISAs the kernels can run here and their work counters.

The extension ``ktjax._ktjax_ffi`` is built by ``pip install`` against the XLA FFI headers of the
jaxlib in the build environment. A runtime jaxlib with an older FFI API cannot run those handlers and
fails with a confusing "No FFI handler registered", so this module checks the versions at import.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys

import jax
import jaxlib


def _load_module(path: str):
    """The extension built at `path` (KTJAX_FFI_MODULE: another build of the same sources, such as the
    sanitizer build of .ci/sanitize) in place of the installed one."""
    spec = importlib.util.spec_from_file_location("ktjax._ktjax_ffi", path)
    if spec is None or not pathlib.Path(path).is_file():
        raise ImportError(f"KTJAX_FFI_MODULE={path} is not a built ktjax extension module")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ktjax._ktjax_ffi"] = module
    spec.loader.exec_module(module)
    return module


if os.environ.get("KTJAX_FFI_MODULE"):
    _ktjax_ffi = _load_module(os.environ["KTJAX_FFI_MODULE"])
else:
    try:
        from ktjax import _ktjax_ffi
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "ktjax's compiled kernels (ktjax._ktjax_ffi) are missing: install the package with "
            "`pip install -e .` (or `pip install .`) from the repository root."
        ) from err

extension = _ktjax_ffi  # the loaded extension module (its elementwise code and probes: tests, ktjax.machine)

FORWARD_TARGET = "ktjax_moe_forward"
BACKWARD_TARGET = "ktjax_moe_backward"
# The expert op's contract (xla_ffi/moe_contract.h): argument, result and gradient names in the
# handlers' order, and the intermediates modes. ktjax/ops/moe_experts.py builds its calls from it.
MOE_CONTRACT: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in _ktjax_ffi.moe_contract().items()}


def runtime_ffi_api_version() -> tuple[int, int]:
    """(major, minor) FFI API of the installed jaxlib, read from the headers it ships."""
    header = pathlib.Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
    text = header.read_text()
    major = re.search(r"#define XLA_FFI_API_MAJOR (\d+)", text)
    minor = re.search(r"#define XLA_FFI_API_MINOR (\d+)", text)
    if major is None or minor is None:
        raise ImportError(f"cannot read the XLA FFI API version from {header}")
    return int(major.group(1)), int(minor.group(1))


def built_ffi_api_version() -> tuple[int, int]:
    """(major, minor) FFI API the kernels were compiled against."""
    return tuple(_ktjax_ffi.ffi_api_version())


def check_ffi_api(built: tuple[int, int], runtime: tuple[int, int]) -> None:
    """Raises ImportError unless a runtime with FFI API `runtime` can run handlers built for `built`."""
    if runtime[0] != built[0] or runtime < built:
        raise ImportError(
            f"ktjax's kernels were built for XLA FFI API {built[0]}.{built[1]}, but the installed jaxlib "
            f"{jaxlib.__version__} provides {runtime[0]}.{runtime[1]}. "
            "Install a jaxlib at least as new as the one ktjax was built with, or rebuild ktjax "
            "(`pip install -e .`) against the installed jaxlib."
        )


check_ffi_api(built_ffi_api_version(), runtime_ffi_api_version())
for _name, _capsule in _ktjax_ffi.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def kernel_counters() -> dict[str, int]:
    """GEMM FLOPs done by the kernels per kind of work, plus call counts, since start or last reset.

    Keys: ``forward``, ``recompute`` (forward work redone in backward), ``input_grad`` (dx and the
    chain to it), ``lora_grad``, ``base_grad``, ``forward_calls``, ``backward_calls``;
    ``small_batch_flops``, the part of those FLOPs done on the small-batch path (a few tokens against
    bf16 weights read in place, without packing; AVX-512 and AVX2; the pair path's dot and direct
    kernels too); ``packed_once_flops``, the part done
    against an operand packed once for several products (the base-weight gradients of an expert
    whose token rows fit the per-worker reuse buffer of 12 MiB); ``bf16_pair_flops``, the part done
    on the bf16 pair path (both operands bf16, ``vdpbf16ps``: ISA ``avx512_bf16`` only); and the
    scratch pool the calls borrow their intermediates from (reused across calls, not reset):
    ``scratch_bytes`` held now, ``scratch_peak_bytes``, ``scratch_allocations`` (buffers ever
    allocated; flat once calls reuse them). Kernels run asynchronously: block on the results
    (``jax.block_until_ready``) before reading.
    """
    return dict(_ktjax_ffi.counters())


def path_flops() -> dict[str, int]:
    """GEMM FLOPs per path of the kernels' GEMM driver since start or last reset, keyed by path name in
    the driver's order: ``packed`` (operands packed per product, f32 micro-kernel), ``dot`` and
    ``direct`` (a few token rows against bf16 weights read in place), ``pairs``, ``pair_dot`` and
    ``pair_direct`` (the same three with two bf16 operands, ``vdpbf16ps``: ISA ``avx512_bf16``),
    ``transposed`` (a product narrower than the micro-kernel's tile computed as C^T, then on one of the
    others), ``packed_once`` and ``packed_once_pairs`` (B packed once for several products). Which path
    a product takes depends on the ISA and the shapes; tests/test_kernel_paths.py forces each one."""
    return dict(_ktjax_ffi.path_flops())


def release_scratch() -> int:
    """Frees the kernels' idle scratch buffers (the next call allocates again); returns bytes freed."""
    return _ktjax_ffi.release_scratch()


def reset_kernel_counters() -> None:
    """Sets every kernel counter (``kernel_counters`` but the scratch pool's, ``path_flops``) back to zero."""
    _ktjax_ffi.reset_counters()


def available_isas() -> list[str]:
    """Micro-kernel ISAs this CPU can run, best first (``KTJAX_ISA`` may force any of them)."""
    return _ktjax_ffi.available_isas().split(",")


def selected_isa() -> str:
    """The ISA the next kernel call uses ('' when ``KTJAX_ISA`` names one this CPU lacks)."""
    return _ktjax_ffi.selected_isa()
