"""Shared plumbing of the benchmark scripts: where the real data is, and how results are kept."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
RESULTS = REPO_ROOT / "benchmarks" / "results"


def require_data(folder: Path, name: str) -> Path:
    """The archive ``name`` under ``folder``; exits with a clear message (status 0: skipped) if absent."""
    path = Path(folder) / name
    if not path.exists():
        print(f"SKIPPED: {path} not found. This benchmark needs the real data set {name} from the project's "
              f"shared data folder (../shared/data next to the repository, or pass --data DIR).", file=sys.stderr)
        sys.exit(0)
    return path


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def save(result: dict, path: Path) -> Path:
    """Write ``result`` as JSON (numpy values converted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else float(o)))
    print(f"wrote {path}")
    return path


def decode_all(images, describe: str) -> list[np.ndarray]:
    """Decode every image of an ImageSet once (timing loops then see only arrays)."""
    from stagewise.progress import progress_bar

    return [images.image(i) for i in progress_bar(range(len(images)), describe)]


Runner = Callable[[np.ndarray], object]
