"""The build descriptions and the README's layout agree with the sources, and the FFI version check
refuses old runtimes."""

from __future__ import annotations

import pathlib
import re

import pytest

from ktjax import ffi

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cmake_sources() -> set[str]:
    text = (ROOT / "xla_ffi" / "CMakeLists.txt").read_text()
    block = re.search(r"set\(KTJAX_FFI_SOURCES(.*?)\)", text, re.S)
    assert block, "KTJAX_FFI_SOURCES not found in xla_ffi/CMakeLists.txt"
    return set(block.group(1).split())


def bazel_sources() -> set[str]:
    return set(re.findall(r'"xla_ffi/(\w+\.cc)"', (ROOT / "BUILD").read_text()))


def test_bazel_and_cmake_build_the_same_sources():
    assert bazel_sources() == cmake_sources()


def test_every_cc_file_is_built():
    on_disk = {p.name for p in (ROOT / "xla_ffi").glob("*.cc")}
    assert cmake_sources() == on_disk


def test_x86_intrinsics_only_in_the_files_a_portable_build_leaves_out():
    """CMakeLists.txt drops the sources named *_avx* where it builds no x86 kernels (e.g. aarch64), so
    every source that includes the x86 intrinsics, directly or through a header, must be named so."""
    src = ROOT / "xla_ffi"
    x86_headers = {p.name for p in src.glob("*.h") if "<immintrin.h>" in p.read_text()}
    assert x86_headers == {"avx512_masks.h"}
    for cc in src.glob("*.cc"):
        text = cc.read_text()
        uses_x86 = "<immintrin.h>" in text or any(f'"{h}"' in text for h in x86_headers)
        assert uses_x86 == ("_avx" in cc.name), cc.name
    assert 'EXCLUDE REGEX "_avx"' in (src / "CMakeLists.txt").read_text()


@pytest.mark.parametrize("built, runtime", [((0, 4), (0, 3)), ((1, 0), (0, 9)), ((0, 3), (1, 0))])
def test_older_or_incompatible_runtime_ffi_api_is_refused_with_a_clear_message(built, runtime):
    with pytest.raises(ImportError, match="kernels were built for XLA FFI API"):
        ffi.check_ffi_api(built, runtime)


@pytest.mark.parametrize("built, runtime", [((0, 3), (0, 3)), ((0, 3), (0, 4))])
def test_same_or_newer_runtime_ffi_api_is_accepted(built, runtime):
    ffi.check_ffi_api(built, runtime)


def readme_layout() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S)
    assert block, "README.md has no Layout block"
    return block.group(1)


def test_readme_layout_names_every_source_file_and_nothing_that_is_gone():
    layout = readme_layout()
    words = set(re.findall(r"[\w.-]+", layout))
    tracked = (
        [pathlib.Path(p) for p in (ROOT / "xla_ffi").iterdir() if p.is_file()]
        + [p for p in (ROOT / "ktjax").rglob("*.py")]
        + list((ROOT / "experiments").glob("*.py"))
    )
    tracked += list((ROOT / "docs").iterdir()) + [p for p in ROOT.iterdir() if not p.name.startswith(".")]
    missing = []
    for path in tracked:
        if path.name in ("__init__.py", "build", "runs", "__pycache__") or path.suffix == ".so":
            continue
        if path.name not in words and path.stem not in words and f"{path.name}/" not in layout:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"README's layout does not name {missing}"
    # Each file name the layout gives (a word with an extension) exists somewhere in the tree.
    named = {w for w in words if re.fullmatch(r"[\w-]+\.(py|h|cc|md|txt|toml|png|jsonl)", w)}
    on_disk = {p.name for p in ROOT.rglob("*") if "build" not in p.parts and ".git" not in p.parts}
    assert named <= on_disk, f"README's layout names files that do not exist: {sorted(named - on_disk)}"
