"""The layers of DESIGN.md hold: `lint-imports` checks the contract in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    r = _lint(ROOT / "src", ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, upward", [
    ("core.py", "from zeropoint.cli import main"),  # the bottom reaching the top
    ("nn/qlinear.py", "from zeropoint.gguf import blocks"),  # one layer up, lazily
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    shutil.copytree(ROOT / "src" / "zeropoint", tmp_path / "src" / "zeropoint",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "zeropoint" / module
    target.write_text(target.read_text() + f"\n\ndef _upward():\n    {upward}\n")
    r = _lint(tmp_path / "src", tmp_path)
    assert r.returncode != 0
    assert "0 kept, 1 broken" in r.stdout
    assert f"zeropoint.{module.removesuffix('.py').replace('/', '.')} ->" in r.stdout
