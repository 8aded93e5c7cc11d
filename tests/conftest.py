"""Test-wide settings: kernels fill every output with NaN first, so any element left unwritten fails.
Also the `use_isa` fixture, for tests that run the kernels of one ISA, and a clear stop when
KTJAX_ISA names an ISA this CPU cannot run (the kernels would refuse every call)."""

import os

import pytest

os.environ["KTJAX_DEBUG_POISON"] = "1"


def pytest_configure(config):
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
