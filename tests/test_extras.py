"""A missing optional extra is a MissingExtraError naming the pip command, never a bare ImportError."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

import stagewise
from stagewise import MissingExtraError
from stagewise.extras import require
from stagewise.runtimes import RUNTIMES


def block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import <module>`` fail as if it were not installed (a ``None`` entry in sys.modules)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("json", "none", "reading JSON") is json
    block(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=r'drawing needs matplotlib, which is not installed: '
                                                r'pip install "stagewise\[plot\]"') as err:
        require("matplotlib", "plot", "drawing")
    assert isinstance(err.value, stagewise.StagewiseError) and isinstance(err.value, ImportError)


def test_video_without_opencv(monkeypatch, tmp_path):
    from stagewise.runtimes.stream import video_frames

    block(monkeypatch, "cv2")
    with pytest.raises(MissingExtraError, match=r'reading video .* pip install "stagewise\[video\]"'):
        next(video_frames(tmp_path / "clip.mp4"))


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    from stagewise.reports import pareto_plot

    block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingExtraError, match=r'pip install "stagewise\[plot\]"'):
        pareto_plot({"rows": []}, tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


@pytest.mark.parametrize("adapter, package, extra", [
    ("stagewise.runtimes.onnxruntime_adapter", "onnxruntime", "onnxruntime"),
    ("stagewise.runtimes.openvino_adapter", "openvino", "openvino"),
])
def test_runtime_adapter_without_its_backend(monkeypatch, adapter, package, extra):
    monkeypatch.delitem(sys.modules, adapter, raising=False)
    block(monkeypatch, package)
    with pytest.raises(MissingExtraError, match=rf'pip install "stagewise\[{extra}\]"'):
        importlib.import_module(adapter)
    with pytest.raises(MissingExtraError, match=rf'runtime {package!r} is not installed; '
                                                rf'install it with: pip install "stagewise\[{extra}\]"'):
        RUNTIMES[package].opener()


def test_litert_without_an_interpreter(monkeypatch):
    from stagewise.runtimes.litert_adapter import PACKAGES, interpreter_module

    block(monkeypatch, *PACKAGES, *(f"{package}.interpreter" for package in PACKAGES))
    with pytest.raises(MissingExtraError, match=r'pip install "stagewise\[litert\]"'):
        interpreter_module()
    with pytest.raises(MissingExtraError, match=r'pip install "stagewise\[litert\]"'):
        RUNTIMES["litert"].opener()
