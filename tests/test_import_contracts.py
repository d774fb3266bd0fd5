"""The import arrows of pyproject.toml's [tool.importlinter] contracts hold for the installed package.

pyproject.toml maps sdk/, runtimes/ and converters/ into one package tree (``package-dir``), and
the editable install serves that tree through an import hook that import-linter does not see.
So the test copies the sources into the installed layout and runs import-linter on that copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def installed_layout(target: Path) -> Path:
    """Copy every package of pyproject.toml's [tool.setuptools] to where installing puts it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    for package in setuptools["packages"]:
        # a package without its own entry lies under its parent's folder (stagewise.calibration -> sdk/calibration)
        parent = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        source = ROOT / mapping[parent] / Path(*package[len(parent):].lstrip(".").split(".") if package != parent else ())
        destination = target.joinpath(*package.split("."))
        destination.mkdir(parents=True)
        for module in source.glob("*.py"):
            shutil.copy2(module, destination / module.name)
    return target


def lint(layout: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300"}  # one report line per contract
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")], cwd=layout,
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return installed_layout(tmp_path_factory.mktemp("installed"))


def test_import_contracts_are_kept(layout: Path):
    result = lint(layout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("runtimes/stream.py", "import onnx", "no training framework"),
    ("sdk/images.py", "import torch", "no training framework"),
    ("sdk/exits.py", "from .converters import costs", "only lazily"),
    ("sdk/reports.py", "from stagewise.converters import costs", "only lazily"),
    ("runtimes/openvino_adapter.py", "from openvino.tools import ovc", "OpenVINO's converter"),
    ("runtimes/openvino_adapter.py", "from openvino import frontend", "OpenVINO's converter"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str):
    layout = installed_layout(tmp_path)
    package_dir = {"sdk": "stagewise", "runtimes": "stagewise/runtimes"}[module.split("/")[0]]
    copy = layout / package_dir / Path(module).name
    copy.write_text(copy.read_text() + f"\n{line}\n")
    result = lint(layout)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [row for row in result.stdout.splitlines() if " BROKEN" in row]
    assert len(broken) == 1 and contract in broken[0], result.stdout
