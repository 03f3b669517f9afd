"""The model package imports nothing of the checkpoint conversion, consumers or producers.

`megatron_qwenimage.convert` builds and reads models (it imports `megatron_qwenimage.model`); the
model, and the tensor-name rules next to it (`model/state_dict_names.py`), must not import it
back, not even lazily inside a function, or the two modules form a cycle again.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_qwenimage.model

MODEL_DIR = Path(megatron_qwenimage.model.__file__).parent
PACKAGE = "megatron_qwenimage.model"
FORBIDDEN = ("megatron_qwenimage.convert", "consumers", "producers")
MODULES = sorted(MODEL_DIR.glob("*.py"))


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in `path`, relative imports resolved; for
    ``from A import b`` both ``A`` and ``A.b`` (``b`` may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = PACKAGE.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_the_model_package_has_modules():
    names = {p.name for p in MODULES}
    assert {"mmdit.py", "state_dict_names.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_model_module_imports_nothing_of_convert_consumers_or_producers(path):
    bad = [f"{path.name}:{line}: {module}" for line, module in _imported_modules(path) if _forbidden(module)]
    assert not bad, f"megatron_qwenimage/model/ must not import {FORBIDDEN}: {bad}"


def test_importing_the_model_loads_no_conversion_code():
    code = (
        "import sys; import megatron_qwenimage.model.mmdit, megatron_qwenimage.model.state_dict_names; "
        f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r})]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
