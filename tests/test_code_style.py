"""The code base stays ruff-clean (lint rules in pyproject.toml) and its import graph acyclic by layer."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the [test] extra")
def test_ruff_check_passes():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def ktjax_imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(module, at top level) for every `import ktjax...` / `from ktjax... import` in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ktjax"):
            found.append((node.module, node.col_offset == 0))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.col_offset == 0) for a in node.names if a.name.startswith("ktjax")]
    return found


def test_config_depends_on_nothing_in_ktjax_and_nn_not_on_models():
    assert ktjax_imports(ROOT / "ktjax" / "config.py") == []
    for path in (ROOT / "ktjax" / "nn").glob("*.py"):
        assert not [m for m, _ in ktjax_imports(path) if m.startswith("ktjax.models")], path


def test_no_function_level_imports_of_ktjax_modules():
    # A function-level import is how a dependency cycle hides; the extension loader (ktjax/ffi.py) is
    # the one place that imports a ktjax module conditionally.
    for path in (ROOT / "ktjax").rglob("*.py"):
        if path.name == "ffi.py":
            continue
        inner = [m for m, top in ktjax_imports(path) if not top]
        assert not inner, f"{path.relative_to(ROOT)} imports {inner} inside a function"
