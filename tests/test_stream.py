"""Streams on the scripted mock backend with a fake clock: pacing, per-frame deadlines, dropping, degrading."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stagewise import MissingExtraError
from stagewise.runtimes.stream import Stream, StreamError, folder_frames, stream, video_frames
from stagewise.testing import fake_runtime, scripted_bundle, scripted_cascade, scripted_image

UNSURE = scripted_image([10, 10, 10], label=1)


class FakeSleep:
    def __init__(self, clock):
        self.clock, self.calls = clock, []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.now += seconds


class LazyFrame:
    def __init__(self, image):
        self.image, self.decoded = image, False

    def __call__(self):
        self.decoded = True
        return self.image


def setup(tmp_path, latencies):
    cascade, sessions, clock = scripted_cascade(tmp_path / "bundle", latencies)
    cascade.warm_up()
    clock.now = 0.0
    return cascade, sessions, clock, FakeSleep(clock)


def test_paces_to_the_frame_rate_and_fits_stages_into_each_frame(tmp_path):
    cascade, _, clock, sleep = setup(tmp_path, (2.0, 5.0, 20.0))
    results = list(stream(cascade, [UNSURE] * 20, fps=50, clock=clock, sleep=sleep))  # 20 ms per frame
    assert [r.index for r in results] == list(range(20))
    assert all(r.status == "budget_limited" for r in results)  # stage 2 (20 ms) never fits in 20 ms - 7 ms
    assert all(r.prediction.stage_index == 1 and r.trace[2].reason == "over_budget" for r in results)
    assert [r.start_ms for r in results] == pytest.approx([20.0 * i for i in range(20)])
    assert all(r.latency_ms == pytest.approx(7.0) for r in results)
    assert len(sleep.calls) == 19  # waited for every frame after the first


def test_drops_frames_when_behind_and_never_decodes_them(tmp_path):
    cascade, _, clock, sleep = setup(tmp_path, (30.0, 5.0, 20.0))
    frames = [LazyFrame(UNSURE) for _ in range(30)]
    s = Stream(cascade, fps=50, clock=clock, sleep=sleep)
    results = list(s.run(frames))
    statuses = [r.status for r in results]
    assert len(results) == 30
    dropped = [r.index for r in results if r.status == "dropped"]
    processed = [r for r in results if r.status != "dropped"]
    assert dropped and processed
    assert all(not frames[i].decoded for i in dropped) and all(frames[r.index].decoded for r in processed)
    # the first stage alone (30 ms) cannot meet a 20 ms frame deadline: every processed frame is late,
    # but the backlog never grows: each processed frame started at most one period after it was due
    assert all(r.status == "late" and r.prediction.stage_index == 0 for r in processed)
    assert max(r.start_ms - r.due_ms for r in processed) <= 20.0 + 1e-6
    assert s.stats.dropped == len(dropped) and s.stats.processed == len(processed) == s.stats.late
    assert 0.0 <= s.stats.deadline_hit_rate < 0.01 and statuses[0] == "late"


class SlowDecode(LazyFrame):
    """A frame whose decoding takes ``ms`` on the fake clock (a big keyframe, a slow disk)."""

    def __init__(self, image, clock, ms):
        super().__init__(image)
        self.clock, self.ms = clock, ms

    def __call__(self):
        self.clock.now += self.ms / 1e3
        return super().__call__()


def test_drop_waits_for_a_fresh_frame_when_that_one_would_make_it(tmp_path):
    """One frame decodes slowly (20 ms) and is late; the next one could not get even its first
    stage done by its deadline, so it is dropped for the fresh frame after it, and from then on
    every frame meets its deadline again."""
    cascade, sessions, clock, sleep = setup(tmp_path, (12.0, 5.0, 20.0))
    frames = [UNSURE] * 12
    frames[1] = SlowDecode(UNSURE, clock, 20.0)
    s = Stream(cascade, fps=50, clock=clock, sleep=sleep)
    results = list(s.run(frames))
    statuses = [r.status for r in results]
    assert statuses[1] == "late"
    assert statuses[2] == "dropped"  # ready at 52 ms, deadline 60, the first stage needs 12: hopeless
    assert results[3].start_ms == pytest.approx(60.0)  # waited for frame 3 to be due
    assert all(st in ("ok", "budget_limited") for st in statuses[3:])
    assert s.stats.deadline_hit_rate == pytest.approx(1 - 1 / s.stats.processed)


def test_degrade_processes_every_frame_with_what_is_left(tmp_path):
    cascade, sessions, clock, sleep = setup(tmp_path, (8.0, 5.0, 20.0))
    frames = [UNSURE] * 10
    frames[1] = SlowDecode(UNSURE, clock, 20.0)
    s = Stream(cascade, fps=50, on_late="degrade", max_lag_frames=2, clock=clock, sleep=sleep)
    results = list(s.run(frames))
    assert [r.status for r in results].count("dropped") == 0
    # the frame after the slow one starts late, gets only the first stage, and the stream catches up
    assert results[2].start_ms > results[2].due_ms and results[2].prediction.stage_index == 0
    assert results[2].budget_ms < 20.0 and results[2].prediction.budget_limited
    assert all(r.prediction.stage_index == 1 for r in results[4:])
    assert all(r.status != "late" for r in results[3:])


def test_degrade_still_drops_when_the_backlog_exceeds_the_limit(tmp_path):
    cascade, _, clock, sleep = setup(tmp_path, (50.0, 5.0, 20.0))
    s = Stream(cascade, fps=50, on_late="degrade", max_lag_frames=2, clock=clock, sleep=sleep)
    results = list(s.run([UNSURE] * 20))
    processed = [r for r in results if r.status != "dropped"]
    assert s.stats.dropped > 0
    assert max(r.start_ms - r.due_ms for r in processed) <= 2 * 20.0 + 20.0 + 1e-6


def test_summary_and_bad_settings(tmp_path):
    cascade, _, clock, sleep = setup(tmp_path, (2.0, 5.0, 20.0))
    s = Stream(cascade, fps=25, budget_ms=30, clock=clock, sleep=sleep)
    list(s.run([UNSURE] * 10))
    summary = s.stats.summary()
    assert summary["processed"] == 10 and summary["deadline_hit_rate"] == 1.0
    assert summary["exit_histogram"] == [0, 0, 10]  # 30 ms budget: all three stages (27 ms) fit
    with pytest.raises(StreamError, match="fps"):
        Stream(cascade, fps=0)
    with pytest.raises(StreamError, match="on_late"):
        Stream(cascade, fps=10, on_late="skip")


def test_folder_frames_in_name_order(tmp_path):
    for name in ("b.png", "a.jpg", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.png")
    assert [p.name for p in folder_frames(tmp_path)] == ["a.jpg", "b.png"]
    with pytest.raises(StreamError, match="no image files"):
        folder_frames(tmp_path / "missing") if False else folder_frames(_empty(tmp_path))
    with pytest.raises(StreamError, match="not a folder"):
        folder_frames(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_video_frames_need_opencv_or_say_so(tmp_path):
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match="stagewise\\[video\\]"):
            next(video_frames(tmp_path / "clip.mp4"))
        return
    with pytest.raises(StreamError, match="cannot open"):
        next(video_frames(tmp_path / "missing.mp4"))


def test_example_script_plays_a_folder_of_frames(tmp_path, monkeypatch, capsys):
    """examples/stream/classify_stream.py end to end on a mock runtime and a folder of frames."""
    import json
    import runpy
    import sys
    from pathlib import Path

    bundle = scripted_bundle(tmp_path / "bundle")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        Image.fromarray(scripted_image([10, 10, 10], label=1)).save(frames / f"{i:03d}.png")
    script = Path(__file__).resolve().parents[1] / "examples" / "stream" / "classify_stream.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(bundle), str(frames), "--fps", "20", "--on-late", "degrade",
                                      "--backend", "fake", "--trace", str(tmp_path / "trace.jsonl")])
    with fake_runtime("fake"):
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("\nframe ") == 5 and '"frames": 5' in out  # dropped frames are listed too
    lines = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(5))
    done = [x for x in lines if x["status"] != "dropped"]
    assert done and all(x["class_name"] == "b" and x["trace"][0]["reason"] == "first" for x in done)
