"""Test-wide settings: kernels fill every output with NaN first, so any element left unwritten fails.
Also the `use_isa` fixture, for tests that run the kernels of one ISA."""

import os

import pytest

os.environ["KTJAX_DEBUG_POISON"] = "1"


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
