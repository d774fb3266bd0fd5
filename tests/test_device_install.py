"""A device venv with only the device extras (no torch, TensorFlow or onnx) runs the committed toy bundle.

Creating the venv needs the package index (skipped, saying so, only when it is unreachable). The
onnxruntime + serve venv takes about 45 s here and runs in the suite. The tflite-runtime venv
(numpy 1, about 70 s more) runs when ``STAGEWISE_TFLITE_VENV=1`` is set, as the CI step in
``.ci/run`` does, so that the suite stays under its time budget.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx
import pytest

from serving import TOY_BUNDLE

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "tensorflow", "keras", "onnx", "nncf", "ai_edge_litert")


def device_venv(where: Path, extras: str) -> Path:
    """A fresh venv with ``stagewise[extras]`` installed from this checkout; returns its bin folder."""
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(where / "probe"),
                            "uvicorn>=0.29"], capture_output=True, text=True, timeout=120)
    if probe.returncode:
        pytest.skip(f"the package index is unreachable: {probe.stderr.strip()[-300:]}")
    venv.create(where / "venv", with_pip=True)
    bin_ = where / "venv" / "bin"
    install = subprocess.run([str(bin_ / "python"), "-m", "pip", "install", "-q", f"{ROOT}[{extras}]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    return bin_


def assert_no_frameworks(bin_: Path) -> None:
    code = ("import importlib.util, json, stagewise.runtimes; "
            f"print(json.dumps([m for m in {FRAMEWORKS!r} if importlib.util.find_spec(m)]))")
    found = subprocess.run([str(bin_ / "python"), "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(found) == []


def run_image(bin_: Path, image: Path, backend: str, *options: str) -> dict:
    out = subprocess.run([str(bin_ / "stagewise"), "run", str(TOY_BUNDLE), str(image), "--backend", backend, "--json",
                          *options], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_onnxruntime_and_serve_extras_run_and_serve_a_bundle_without_frameworks(tmp_path, image_folder):
    started = time.monotonic()
    bin_ = device_venv(tmp_path, "onnxruntime,serve")
    installed = time.monotonic() - started
    assert_no_frameworks(bin_)
    image = sorted(image_folder.glob("class2/*.png"))[0]
    answer = run_image(bin_, image, "onnxruntime")
    port = free_port()
    server = subprocess.Popen([str(bin_ / "stagewise"), "serve", str(TOY_BUNDLE), "--port", str(port),
                               "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1]
            time.sleep(0.1)
        served = httpx.post(f"http://127.0.0.1:{port}/v1/classify", content=image.read_bytes()).json()
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal: the exit systemd counts as clean for SIGTERM
    assert server.returncode in (0, -signal.SIGTERM), err
    assert (served["label"], served["stage_name"]) == (answer["label"], answer["stage_name"])
    assert served["score"] == pytest.approx(answer["score"], abs=1e-6)
    print(f"device venv: install {installed:.0f} s, total {time.monotonic() - started:.0f} s")


@pytest.mark.skipif(os.environ.get("STAGEWISE_TFLITE_VENV") != "1",
                    reason="builds a second venv with numpy 1 (about 70 s of installing); .ci/run runs it as its own "
                           "step with STAGEWISE_TFLITE_VENV=1")
def test_tflite_runtime_extra_alone_runs_a_tflite_bundle(tmp_path, image_folder):
    bin_ = device_venv(tmp_path, "tflite-runtime")
    assert_no_frameworks(bin_)
    interpreter = subprocess.run([str(bin_ / "python"), "-c", "from stagewise.runtimes.litert_adapter import "
                                  "interpreter_module; print(interpreter_module().__name__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    assert interpreter.startswith("tflite_runtime")
    from stagewise.runtimes import load
    # the toy's exit threshold sits at a score of 1 - 2e-10, where fp32 kernels of two runtimes may decide
    # differently; the "full" point runs both stages, so the answers must agree up to rounding
    with load(TOY_BUNDLE, runtime="onnxruntime") as reference:
        for image in sorted(image_folder.glob("class*/000.png")):
            answer = run_image(bin_, image, "auto", "--operating-point", "full")
            expected = reference.predict(image, operating_point="full")
            assert (answer["label"], answer["stage_name"]) == (expected.label, expected.stage_name)
            assert answer["score"] == pytest.approx(expected.score, abs=1e-4)
