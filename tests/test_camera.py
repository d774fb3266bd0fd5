"""The camera example, headless, on a short video made from the committed ImageNet demo images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from serving import TOY_BUNDLE
from stagewise.runtimes import load
from stagewise.runtimes.stream import FrameResult

cv2 = pytest.importorskip("cv2", reason='the camera tests need OpenCV: pip install "stagewise[video]" (the dev install has it)')
ROOT = Path(__file__).resolve().parents[1]
DEMO_IMAGES = ROOT / "sdk" / "demo_data" / "imagenet-160" / "images"


def camera_example():
    spec = importlib.util.spec_from_file_location("classify_camera", ROOT / "examples" / "camera" / "classify_camera.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), 25, (96, 96))
    for path in sorted(DEMO_IMAGES.glob("*.jpg"))[:16]:
        writer.write(cv2.resize(cv2.imread(str(path)), (96, 96)))
    writer.release()
    return out


def test_camera_example_writes_overlay_video_and_frame_log(clip, tmp_path):
    video, log = tmp_path / "annotated.mp4", tmp_path / "frames.jsonl"
    summary = camera_example().main([str(TOY_BUNDLE), str(clip), "--backend", "onnxruntime", "--out", str(video),
                                     "--log", str(log), "--trace"])
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(16)) and summary["frames"] == 16
    answered = [x for x in lines if x["status"] != "dropped"]
    assert len(answered) == summary["processed"] > 0
    assert all(x["class_name"].startswith("class") and x["stage_name"] in ("exit0", "final") and x["trace"]
               for x in answered)
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 16 - lines.index(answered[0]) and frames[0].shape == (96, 96, 3)


def test_the_overlay_writes_the_answer_on_the_frame_top():
    rgb = np.full((96, 96, 3), 128, dtype=np.uint8)
    with load(TOY_BUNDLE, runtime="onnxruntime") as cascade:
        result = FrameResult(0, "ok", 0.0, 100.0, 0.0, 4.0, 100.0, cascade.predict(rgb))
        bgr = camera_example().overlay(cv2, rgb, result, cascade.stage_names)
    changed = np.abs(bgr.astype(int) - 128).sum(axis=(1, 2)) > 0
    assert changed[:40].any() and not changed[60:].any()


def test_a_missing_video_file_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no such video file"):
        camera_example().main([str(TOY_BUNDLE), str(tmp_path / "none.mp4")])
