"""Classify a video file, a camera or a folder of frames at a target frame rate under a per-frame deadline.

    python examples/stream/classify_stream.py BUNDLE SOURCE [--fps 15] [--budget-ms 50] [--on-late drop|degrade]

SOURCE is a folder of images (played in name order), a video file (needs OpenCV:
``pip install "stagewise[video]"``) or a camera index such as ``0``. Each frame is answered by
its deadline (``--budget-ms``, default one frame period): later stages run only when they fit,
and when the device falls behind, frames are dropped (or, with ``--on-late degrade``, answered
with the first stage only). ``--mean-budget-ms`` additionally keeps the mean cost per frame at a
target by moving between the bundle's operating points. ``--trace FILE`` writes every frame's
per-stage trace as JSON lines.

Try it on the ImageNet demo images shipped with the package (a folder of frames) with the
cascade the budget benchmark builds::

    python -m benchmarks.budget_build                       # prints runs/budget/lite0_224_lite2_260_mean.swb
    python examples/stream/classify_stream.py runs/budget/lite0_224_lite2_260_mean.swb \
        sdk/demo_data/imagenet-160/images --fps 10 --limit 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stagewise.runtimes import load
from stagewise.runtimes.stream import Stream, folder_frames, video_fps, video_frames


def frames_of(source: str, limit: int | None):
    if source.isdigit():
        return video_frames(int(source), limit)
    path = Path(source)
    if path.is_dir():
        files = folder_frames(path)
        return files[:limit] if limit else files
    return video_frames(path, limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("source", help="folder of images, video file, or camera index")
    ap.add_argument("--fps", type=float, help="target frame rate (default: the video's own, else 15)")
    ap.add_argument("--budget-ms", type=float, help="per-frame deadline (default: one frame period)")
    ap.add_argument("--on-late", choices=["drop", "degrade"], default="drop")
    ap.add_argument("--mean-budget-ms", type=float, help="also keep the mean cost per frame at this target")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, help="at most this many frames")
    ap.add_argument("--no-pace", action="store_true", help="do not wait for frames to be due (live sources)")
    ap.add_argument("--trace", type=Path, help="write one JSON line per frame with its per-stage trace")
    ap.add_argument("--quiet", action="store_true", help="only the summary")
    args = ap.parse_args()

    fps = args.fps or (video_fps(args.source) if not Path(args.source).is_dir() and not args.source.isdigit() else None) or 15.0
    with load(args.bundle, runtime=args.backend, threads=args.threads, mean_budget_ms=args.mean_budget_ms) as cascade:
        stream = Stream(cascade, fps=fps, budget_ms=args.budget_ms, on_late=args.on_late, pace=not args.no_pace)
        print(f"{args.source}: {fps:g} fps, per-frame budget {stream.budget_ms:.1f} ms, on late: {args.on_late}, "
              f"stages {', '.join(cascade.stage_names)} ({cascade.runtime}, {args.threads} thread(s))")
        trace = args.trace.open("w") if args.trace else None
        try:
            for r in stream.run(frames_of(args.source, args.limit)):
                if trace:
                    trace.write(json.dumps(r.to_dict()) + "\n")
                if args.quiet:
                    continue
                if r.status == "dropped":
                    print(f"frame {r.index:4d}  dropped")
                else:
                    p = r.prediction
                    print(f"frame {r.index:4d}  {p.name:28.28s} {p.score:.2f}  stage {p.stage_name:10s} "
                          f"{r.end_ms - r.start_ms:6.1f} ms  {r.status}")
        finally:
            if trace:
                trace.close()
        summary = stream.stats.summary()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
