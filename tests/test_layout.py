"""House rules that a reviewer would otherwise have to remember.

The rooms import downward only (runners -> mpc/privacy -> actors -> protocol), the wire room has
no asyncio, nothing outside the tests can unpickle or evaluate, and the tree is ruff clean.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ["protocol", "actors", "mpc", "privacy", "runners"]
#: What each room may import from this project.
ALLOWED = {
    "protocol": {"protocol"},
    "actors": {"protocol", "actors"},
    "mpc": {"protocol", "actors", "mpc"},
    "privacy": {"protocol", "actors", "privacy"},
    "runners": set(ROOMS),
}
FORBIDDEN_CALLS = {("pickle", "loads"), ("pickle", "load"), ("torch", "load"), ("marshal", "loads")}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("room", ROOMS)
def test_imports_flow_downward(room: str) -> None:
    for path in (ROOT / room).rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ROOMS:
                assert top in ALLOWED[room], f"{path.relative_to(ROOT)} imports {name}: an arrow back up"
            if room == "protocol":
                assert top != "asyncio", f"{path.relative_to(ROOT)} imports asyncio: the wire stays sync"


def test_nothing_unpickles_or_evaluates() -> None:
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    func = node.func
                    if isinstance(func, ast.Name):
                        assert func.id not in {"eval", "exec"}, f"{path}: {func.id}()"
                    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                        pair = (func.value.id, func.attr)
                        assert pair not in FORBIDDEN_CALLS, f"{path}: {'.'.join(pair)}()"
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    assert "pickle" not in names and "dill" not in names, f"{path} imports pickle"


@pytest.mark.skipif(
    shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed"
)
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    check = subprocess.run(
        [ruff, "check", "--output-format", "concise", str(ROOT)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([ruff, "format", "--check", str(ROOT)], capture_output=True, text=True, check=False)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
