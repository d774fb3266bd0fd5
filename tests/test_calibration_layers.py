"""The calibration package has no import cycle: each module imports only modules below it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import stagewise.calibration

# bottom first: a module may import only modules to its left
LAYERS = ("temperature", "bh", "table", "goals", "risk", "suite")
PACKAGE = Path(stagewise.calibration.__file__).parent


def _sibling_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stagewise.calibration."):
            found.add(node.module.split(".")[2])
    return found


def test_layers_cover_the_package():
    assert sorted(LAYERS) == sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", LAYERS)
def test_each_module_imports_only_downward(module):
    below = set(LAYERS[:LAYERS.index(module)])
    assert _sibling_imports(module) <= below


@pytest.mark.parametrize("first", LAYERS)
def test_fresh_interpreter_imports_in_any_order(first):
    rest = [m for m in reversed(LAYERS) if m != first]
    code = "\n".join(f"import stagewise.calibration.{m}" for m in [first, *rest])
    code += "\nfrom stagewise.calibration import ExitTable, Goal, Settings, Calibration, calibrate_stages, bh_thresholds"
    code += ", thresholds_of, DEFAULT_DROPS"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
