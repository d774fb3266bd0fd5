"""Seeded, bounded fuzzing of the toy bundle's manifest and archive: every case ends in a
``StagewiseError`` or a well-formed answer (the unchanged one, for archive mutations), never a raw
exception or a hang.

Run a larger round with ``python tests/test_fuzz.py 2000 400`` (manifest and archive mutations).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import stagewise

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_bundle import toy_bundle, toy_image  # noqa: E402

POOL = [None, True, False, 0, -1, 1, 0.5, 1.5, 1e308, -1e308, 10 ** 6, 10 ** 20, float("nan"), float("inf"),
        -float("inf"), "", "x", "NaN", "../../outside", "/etc/passwd", "onnx/s1.onnx", "logits", "image", [], {},
        [1, 2], [None], {"p50": 1.0}, ["a", "b", "c", "d"]]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _nest(depth: int):
    value: object = 1
    for _ in range(depth):
        value = {"x": value}
    return value


def mutate_manifest(document: dict, rng: random.Random) -> str:
    """The text of one mutation of ``document``: a value replaced, removed, duplicated, scaled or nested, or a byte changed."""
    doc = copy.deepcopy(document)
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = rng.randrange(7)
    if op == 6:
        text = bytearray(json.dumps(doc, indent=2).encode())
        text[rng.randrange(len(text))] = rng.randrange(256)
        return text.decode("utf-8", errors="replace")
    if op == 1:
        del parent[key]
    elif op == 2 and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    elif op == 3 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * rng.choice([-1, 0, 10, 1e6, 1e-6]) + rng.choice([0, 1, -1])
    elif op == 4 and isinstance(parent[key], str):
        parent[key] = parent[key] + rng.choice(["x", "/..", "\\", "\u00e9", " "])
    elif op == 5:
        parent[key] = _nest(rng.choice([40, 200]))
    else:  # op 0, or an op that does not apply to this value
        parent[key] = copy.deepcopy(rng.choice(POOL))
    return json.dumps(doc, indent=2)


def mutate_archive(data: bytes, rng: random.Random) -> bytes:
    """One mutation of a ``.swb``'s bytes: flipped bytes, a truncation, an insertion or a zeroed range."""
    out = bytearray(data)
    op = rng.randrange(4)
    at = rng.randrange(len(out))
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif op == 1:
        del out[at:]
    elif op == 2:
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        out[at:at + rng.randint(1, 256)] = bytes(min(256, len(out) - at))
    return bytes(out)


def _answers(path: Path) -> tuple:
    with stagewise.load(path, backend="onnxruntime", warmup=False) as cascade:
        image = toy_image()
        out = []
        for point in cascade.operating_points:
            p = cascade.predict(image, operating_point=point)
            if not (0 <= p.label < len(cascade.classes) and p.name == cascade.classes[p.label]
                    and np.isfinite(p.score) and np.all(np.isfinite(p.probabilities))):
                raise AssertionError(f"malformed prediction {p}")
            out.append((point, p.name, p.stage, round(p.score, 6)))
        out.extend((b.name, b.stage) for b in cascade.predict_batch([image, image], max_batch=1))
        return tuple(out)


def _case(path: Path) -> tuple[str, object]:
    try:
        return "answer", _answers(path)
    except stagewise.StagewiseError as exc:
        return "error", type(exc).__name__


def fuzz(work: Path, manifest_cases: int, archive_cases: int, seed: int = 0) -> dict:
    """Run the mutations; returns counts per outcome and the raw exceptions (``failures``), with the slowest case."""
    rng = random.Random(seed)
    swb = toy_bundle(work / "toy.swb", work / "models")
    folder = toy_bundle(work / "toy", work / "models")
    baseline = _answers(folder)
    document = json.loads((folder / "manifest.json").read_text())
    counts: Counter = Counter()
    failures: list[str] = []
    slowest = 0.0
    cases = [("manifest", i) for i in range(manifest_cases)] + [("archive", i) for i in range(archive_cases)]
    for kind, i in cases:
        start = time.perf_counter()
        if kind == "manifest":
            (folder / "manifest.json").write_text(mutate_manifest(document, rng), errors="surrogateescape")
            target = folder
        else:
            target = work / "mutated.swb"
            target.write_bytes(mutate_archive(swb.read_bytes(), rng))
        try:
            outcome, detail = _case(target)
        except Exception as exc:  # a raw exception is the finding the fuzzer looks for
            failures.append(f"{kind} #{i}: {type(exc).__name__}: {exc}")
            outcome, detail = "raw", None
        if outcome == "answer":
            outcome = "unchanged" if detail == baseline else "changed"
            if kind == "archive" and outcome == "changed":
                failures.append(f"archive #{i}: a corrupted archive loaded and answered differently")
        counts[f"{kind}:{outcome}" if outcome != "error" else f"{kind}:{detail}"] += 1
        slowest = max(slowest, time.perf_counter() - start)
    shutil.copyfile(work / "toy" / "manifest.json", work / "last-mutation.json")
    return {"counts": dict(sorted(counts.items())), "failures": failures, "slowest_s": slowest}


def test_fuzzed_manifests_and_archives_end_in_stagewise_errors_or_answers(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    start = time.perf_counter()
    result = fuzz(tmp_path, manifest_cases=500, archive_cases=100, seed=15)
    assert result["failures"] == []
    assert result["slowest_s"] < 5.0
    assert time.perf_counter() - start < 90.0
    counts = result["counts"]
    assert sum(v for k, v in counts.items() if k.startswith("manifest:")) == 500
    assert sum(v for k, v in counts.items() if k.startswith("archive:")) == 100
    assert counts.get("manifest:unchanged", 0) > 0 and any(k.endswith("ManifestError") for k in counts)


if __name__ == "__main__":
    import tempfile

    n_manifest, n_archive = (int(a) for a in sys.argv[1:3])
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        print(json.dumps(fuzz(Path(work), n_manifest, n_archive, seed=2026), indent=2))
        print(f"{time.perf_counter() - t0:.1f} s")
