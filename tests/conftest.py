"""Test-wide settings: kernels fill every output with NaN first, so any element left unwritten fails.
Also the `use_isa` fixture, for tests that run the kernels of one ISA, and a clear stop when
KTJAX_ISA names an ISA this CPU cannot run (the kernels would refuse every call)."""

import os
import pathlib

import pytest

os.environ["KTJAX_DEBUG_POISON"] = "1"
# XLA programs compiled by one test run are kept on disk for the next (and for the runs of
# experiments.run that tests start): .ci/run runs the kernel tests again on other ISAs and on the
# sanitizer build, which then compile nothing they compiled before.
JAX_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": str(
        pathlib.Path(__file__).resolve().parents[1] / "build" / "jax-test-cache"
    ),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
for _key, _value in JAX_CACHE.items():
    os.environ.setdefault(_key, _value)


def pytest_configure(config):
    import jax

    # In case a plugin imported jax before the variables were set.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )
    forced = os.environ.get("KTJAX_ISA", "")
    if forced:
        from ktjax import ffi

        if forced not in ffi.available_isas():
            raise pytest.UsageError(
                f"KTJAX_ISA={forced}: this CPU (or build) cannot run it; available: {ffi.available_isas()}"
            )


@pytest.fixture
def use_isa(monkeypatch):
    """use_isa(name) runs the kernels on that ISA (KTJAX_ISA) for the test, or skips the test where this
    CPU cannot; "native" leaves the CPU's best."""

    def use(isa: str) -> None:
        from ktjax import ffi

        if isa == "native":
            return
        if isa not in ffi.available_isas():
            pytest.skip(f"this CPU cannot run {isa}")
        monkeypatch.setenv("KTJAX_ISA", isa)

    return use


def pytest_collection_modifyitems(items):
    # A test that picks its ISA itself (use_isa) runs the same on any KTJAX_ISA: .ci/run leaves these out
    # (-m "not isa_forced") when it repeats the kernel tests on the CPU's other ISAs.
    for item in items:
        if "use_isa" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.isa_forced)
