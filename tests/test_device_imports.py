"""The device side stays small: importing stagewise and its runtime loads no training framework."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "tensorflow", "onnx", "keras", "jax", "openvino.tools", "nncf", "sklearn", "matplotlib")


def test_runtime_imports_no_framework():
    code = ("import json, sys, stagewise, stagewise.runtimes, stagewise.cli, stagewise.testing\n"
            "from stagewise.runtimes import executor, base, latency, profiling, bench, calibrate\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    heavy = [m for m in loaded if m in HEAVY or m.split(".")[0] in ("torch", "tensorflow", "keras", "jax", "nncf", "sklearn")]
    assert heavy == []
    assert "onnx" not in loaded
