"""The layering contract (pyproject's [tool.importlinter]) holds, fails when an import runs back
up, and the light entry points stay light: the client and the server import no torch or numba.

The source folders are mapped onto one package (``service/`` is ``memory3.service``, ...), which
import-linter cannot walk through an editable install, so each check copies them into one real
``memory3/`` tree first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "core", "service": "service", "sdk": "sdk", "trainer": "trainer", "cli": "cli",
            "migrations": "migrations", "v1": "proto/memory3/v1"}
LINT = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def _tree(tmp_path: Path) -> Path:
    package = tmp_path / "memory3"
    package.mkdir()
    shutil.copy(ROOT / "proto/memory3/__init__.py", package / "__init__.py")
    for name, source in PACKAGES.items():
        shutil.copytree(ROOT / source, package / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layering_contract_holds(tmp_path):
    result = _lint(_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    "where, code, contract",
    [
        ("core/upward.py", "import memory3.sdk.memory.codec\n", "Every import points down"),
        ("service/upward.py", "from memory3.sdk.client import Client\n", "Every import points down"),
        ("sdk/client/upward.py", "from memory3.sdk.memory import codec\n", "Inside the SDK"),
        ("trainer/sideways.py", "from memory3.service import config\n", "The trainer builds on the SDK"),
        ("sdk/client/heavy.py", "import torch\n", "The core and the client load no torch"),
        ("service/heavy.py", "def f():\n    import torch\n", "The service loads no torch"),
    ],
)
def test_an_import_that_runs_back_up_breaks_the_contract(tmp_path, where, code, contract):
    tree = _tree(tmp_path)
    (tree / "memory3" / where).write_text(code)
    result = _lint(tree)
    assert result.returncode != 0
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout


@pytest.mark.parametrize("module", ["memory3.sdk.client", "memory3.service.server", "memory3.cli.main"])
def test_light_entry_points_import_no_torch_or_numba(module):
    code = f"import sys, {module}; print(sorted({{'torch', 'numba', 'transformers'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
