"""Classify a camera, a video file or an RTSP stream at a target frame rate, with an overlay and a frame log.

    python examples/camera/classify_camera.py BUNDLE SOURCE [--fps 10] [--budget-ms 80]
        [--out annotated.mp4] [--show] [--log frames.jsonl] [--limit N]

SOURCE is a camera index (``0``), a video file or a stream URL (``rtsp://...``), read with
OpenCV (``pip install "stagewise[video]"``). Frames go through
:class:`stagewise.runtimes.stream.Stream`: each must be answered by its deadline
(``--budget-ms``, default one frame period), later stages run only when they fit, and frames are
dropped when the device falls behind (a dropped frame is never decoded). Every answered frame
gets an overlay (class, score, exit stage, milliseconds); ``--out`` writes them to a video at the
target rate (a dropped frame repeats the last overlay, so the video keeps its timing),
``--show`` opens a window (needs ``opencv-python``, not the headless build), ``--log`` writes one
JSON line per frame. Without ``--out`` and ``--show`` it runs headless and prints a summary.
Video files play at ``--fps`` (default: the file's own rate); live sources pace themselves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from stagewise.extras import require
from stagewise.runtimes import load
from stagewise.runtimes.stream import FrameResult, Stream, video_fps, video_frames

GREEN, AMBER, RED = (60, 200, 60), (0, 170, 255), (40, 40, 230)  # BGR


class Remembered:
    """Wraps a lazy frame: decodes it when the stream processes it, and keeps the image for the overlay."""

    def __init__(self) -> None:
        self.image: np.ndarray | None = None

    def wrap(self, frames: Iterator[Callable[[], np.ndarray]]) -> Iterator[Callable[[], np.ndarray]]:
        for frame in frames:
            def decode(frame: Callable[[], np.ndarray] = frame) -> np.ndarray:
                self.image = frame()
                return self.image
            yield decode


def overlay(cv2: Any, rgb: np.ndarray, result: FrameResult, stage_names: list[str]) -> np.ndarray:
    """The frame as BGR with the answer written on it."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    p = result.prediction
    scale = max(bgr.shape[1] / 640, 0.35)
    colour = {"ok": GREEN, "budget_limited": AMBER}.get(result.status, RED)
    lines = [f"{p.name} {p.score:.2f}",
             f"stage {stage_names[p.stage_index]}  {result.end_ms - result.start_ms:.1f} ms  {result.status}"]
    for i, text in enumerate(lines):
        y = int((28 + 26 * i) * scale)
        cv2.putText(bgr, text, (int(8 * scale), y), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (0, 0, 0),
                    max(1, int(4 * scale)), cv2.LINE_AA)
        cv2.putText(bgr, text, (int(8 * scale), y), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, colour,
                    max(1, int(2 * scale)), cv2.LINE_AA)
    return bgr


def source_of(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def run(args: argparse.Namespace) -> dict:
    cv2 = require("cv2", "video", "the camera example")
    source = source_of(args.source)
    live = isinstance(source, int) or "://" in str(source)
    if not live and not Path(source).is_file():
        raise SystemExit(f"no such video file: {source} (give a camera index, a video file or a stream URL)")
    fps = args.fps or (None if live else video_fps(source)) or 15.0
    writer, shown, last = None, None, None
    remembered = Remembered()
    log = args.log.open("w") if args.log else None
    with load(args.bundle, runtime=args.backend, threads=args.threads) as cascade:
        stream = Stream(cascade, fps=fps, budget_ms=args.budget_ms, on_late="drop", pace=not live)
        print(f"{args.source}: {fps:g} fps, per-frame budget {stream.budget_ms:.1f} ms, stages "
              f"{', '.join(cascade.stage_names)} ({cascade.runtime}, {args.threads} thread(s))")
        try:
            for r in stream.run(remembered.wrap(video_frames(source, args.limit))):
                if log:
                    log.write(json.dumps(r.to_dict(trace=args.trace)) + "\n")
                if r.prediction is not None:
                    last = overlay(cv2, remembered.image, r, cascade.stage_names)
                if last is None:
                    continue
                if args.out:
                    if writer is None:
                        writer = cv2.VideoWriter(str(args.out), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                                 (last.shape[1], last.shape[0]))
                    writer.write(last)
                if args.show:
                    try:
                        cv2.imshow("stagewise", last)
                    except cv2.error as exc:
                        raise SystemExit("--show needs an OpenCV build with a GUI: pip install opencv-python "
                                         f"(the headless build cannot open windows): {exc}") from None
                    shown = True
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
        finally:
            if log:
                log.close()
            if writer is not None:
                writer.release()
            if shown:
                cv2.destroyAllWindows()
        return stream.stats.summary()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("source", help="camera index, video file, or stream URL (rtsp://...)")
    ap.add_argument("--fps", type=float, help="target frame rate (default: the video's own, else 15)")
    ap.add_argument("--budget-ms", type=float, help="per-frame deadline (default: one frame period)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, help="at most this many frames")
    ap.add_argument("--out", type=Path, help="write the annotated frames to this video file (.mp4)")
    ap.add_argument("--show", action="store_true", help="show the annotated frames in a window (q quits)")
    ap.add_argument("--log", type=Path, help="write one JSON line per frame")
    ap.add_argument("--trace", action="store_true", help="with --log: include each frame's per-stage trace")
    summary = run(ap.parse_args(argv))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
