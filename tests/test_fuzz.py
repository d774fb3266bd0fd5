"""Seeded, bounded fuzzing of two toy bundles' manifests and archives: every case ends in a
``StagewiseError`` or a well-formed answer (the unchanged one, for archive mutations), never a raw
exception, a NaN answer or a hang. The bundles: three image stages, and an early-exit cascade
whose later stages read the previous stage's carry tensor.

Run a larger round with ``python tests/test_fuzz.py 4000 600`` (manifest and archive mutations
per bundle kind).
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

from stagewise.testing import manifest_for  # noqa: E402
from stagewise.bundle import write_bundle  # noqa: E402
from stagewise.manifest import document_files  # noqa: E402
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


def _uint8_nchw(doc: dict, rng: random.Random) -> None:
    rng.choice(doc["stages"])["input"].update(dtype="uint8", layout=rng.choice(["NCHW", None]))


def _control_character_path(doc: dict, rng: random.Random) -> None:
    entry = rng.choice(list(document_files(doc)))
    at = rng.randrange(len(entry["path"]) + 1)
    entry["path"] = entry["path"][:at] + rng.choice(["\0", "\n", "\x1f"]) + entry["path"][at:]


def _carry_from_another_stage(doc: dict, rng: random.Random) -> None:
    k = rng.randrange(1, len(doc["stages"]))
    doc["stages"][k]["input"] = {**doc["stages"][k]["input"], "source": "carry",
                                 "from": doc["stages"][rng.randrange(len(doc["stages"]))]["name"]}
    doc["stages"][k]["input"].pop("size", None)


TARGETED = (_uint8_nchw, _control_character_path, _carry_from_another_stage)
"""Mutations that raised raw exceptions in an earlier round of probes (each must now end in a StagewiseError)."""


def mutate_manifest(document: dict, rng: random.Random) -> str:
    """The text of one mutation of ``document``: a value replaced, removed, duplicated, scaled or nested, a byte
    changed, or (one case in ten) one of the :data:`TARGETED` mutations."""
    doc = copy.deepcopy(document)
    if rng.random() < 0.1:
        rng.choice(TARGETED)(doc, rng)
        return json.dumps(doc, indent=2)
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


def carry_stage_model(path: Path, source: str, height: int, rows: int, scale: float, carry: str | None,
                      carry_rows: int = 0) -> None:
    """A tiny early-exit stage: reads ``source`` (n x 3 x ``height`` x 8), answers the mean colour of its top
    ``rows`` rows times ``scale`` as logits, and passes its top ``carry_rows`` rows on as ``carry`` (when named):
    each stage's carry has its own shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def rows_of(name: str, n: int, out: str) -> list:
        ends = numpy_helper.from_array(np.array([n], np.int64), f"{out}_ends")
        initializers.append(ends)
        return [helper.make_node("Slice", [name, "zero", f"{out}_ends", "axis"], [out])]

    initializers = [numpy_helper.from_array((np.eye(3) * scale).astype(np.float32), "w"),
                    numpy_helper.from_array(np.array([0], np.int64), "zero"),
                    numpy_helper.from_array(np.array([2], np.int64), "axis")]
    nodes = rows_of(source, rows, "crop") + [
        helper.make_node("GlobalAveragePool", ["crop"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])]
    if carry:
        nodes += rows_of(source, carry_rows, carry)
        outputs.append(helper.make_tensor_value_info(carry, TensorProto.FLOAT, ["n", 3, carry_rows, 8]))
    graph = helper.make_graph(nodes, "stage",
                              [helper.make_tensor_value_info(source, TensorProto.FLOAT, ["n", 3, height, 8])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def carry_bundle(out: Path, models: Path) -> Path:
    """An early-exit toy cascade: stage 0 reads the image, stages 1 and 2 the carry of the stage before
    (8, 6 and 4 rows high)."""
    models.mkdir(parents=True, exist_ok=True)
    stages, files = [], {}
    heights, rows = [8, 6, 4], [2, 5, 4]
    for k in range(3):
        source = "image" if k == 0 else f"c{k - 1}"
        carry = f"c{k}" if k < 2 else None
        carry_stage_model(models / f"e{k}.onnx", source, heights[k], rows[k], 4.0, carry,
                          heights[k + 1] if carry else 0)
        files[f"onnx/e{k}.onnx"] = models / f"e{k}.onnx"
        stages.append({"name": f"e{k}", "input": ({"source": "image", "size": [8, 8], "tensor": "image"} if k == 0 else
                                                  {"source": "carry", "from": f"e{k - 1}", "tensor": source}),
                       "artifacts": {"onnx": {"files": [{"path": f"onnx/e{k}.onnx"}], "precision": "fp32"}},
                       "outputs": {"logits": "logits", **({"carry": carry} if carry else {})},
                       "exit": {"score": "max_softmax", "temperature": 1.0, "combine": "own"}, "cost": {"macs": 1}})
    manifest = manifest_for(stages, ["red", "green", "blue"], {"full": [None, None, None], "fast": [0.6, 0.6, None]})
    manifest["input"].update(mean=[128, 128, 128], std=[64, 64, 64])
    return write_bundle(out, manifest, files)


BUNDLES = {"image": toy_bundle, "carry": carry_bundle}


def _answers(path: Path) -> tuple:
    with stagewise.load(path, runtime="onnxruntime", warmup=False) as cascade:
        image = toy_image()
        out = []
        for point in cascade.operating_points:
            p = cascade.predict(image, operating_point=point)
            if not (0 <= p.label < len(cascade.classes) and p.name == cascade.classes[p.label]
                    and np.isfinite(p.score) and np.all(np.isfinite(p.probabilities))):
                raise AssertionError(f"malformed prediction {p}")
            out.append((point, p.name, p.stage_index, round(p.score, 6)))
        out.extend((b.name, b.stage_index) for b in cascade.predict_batch([image, image], max_batch=1))
        return tuple(out)


def _case(path: Path) -> tuple[str, object]:
    try:
        return "answer", _answers(path)
    except stagewise.StagewiseError as exc:
        return "error", type(exc).__name__


def fuzz(work: Path, manifest_cases: int, archive_cases: int, seed: int = 0, kinds: tuple[str, ...] = tuple(BUNDLES)) -> dict:
    """Run the mutations on each bundle kind; returns counts per outcome and the raw exceptions (``failures``,
    NaN answers included), with the slowest case."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    failures: list[str] = []
    slowest = 0.0
    for bundle_kind in kinds:
        build = BUNDLES[bundle_kind]
        swb = build(work / f"{bundle_kind}.swb", work / f"{bundle_kind}-models")
        folder = build(work / bundle_kind, work / f"{bundle_kind}-models")
        baseline = _answers(folder)
        document = json.loads((folder / "manifest.json").read_text())
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
                failures.append(f"{bundle_kind} {kind} #{i}: {type(exc).__name__}: {exc}")
                outcome, detail = "raw", None
            if outcome == "answer":
                outcome = "unchanged" if detail == baseline else "changed"
                if kind == "archive" and outcome == "changed":
                    failures.append(f"{bundle_kind} archive #{i}: a corrupted archive loaded and answered differently")
            counts[f"{bundle_kind}:{kind}:{outcome if outcome != 'error' else detail}"] += 1
            slowest = max(slowest, time.perf_counter() - start)
    return {"counts": dict(sorted(counts.items())), "failures": failures, "slowest_s": slowest,
            "raw": sum(v for k, v in counts.items() if k.endswith(":raw")),
            "nan_answers": sum("malformed prediction" in f for f in failures)}


@pytest.mark.parametrize("bundle_kind", list(BUNDLES))
@pytest.mark.parametrize("mutation", TARGETED, ids=lambda m: m.__name__.strip("_"))
def test_each_targeted_mutation_is_a_stagewise_error(tmp_path, bundle_kind, mutation):
    pytest.importorskip("onnxruntime")
    folder = BUNDLES[bundle_kind](tmp_path / "b", tmp_path / "models")
    document, baseline = json.loads((folder / "manifest.json").read_text()), _answers(folder)
    rng = random.Random(0)
    for i in range(5):
        changed = copy.deepcopy(document)
        mutation(changed, rng)
        target = tmp_path / f"m{i}"
        shutil.copytree(folder, target)
        (target / "manifest.json").write_text(json.dumps(changed))
        outcome, detail = _case(target)  # a raw exception fails the test here
        assert outcome == "error" or detail == baseline, (changed["stages"], detail)


def test_fuzzed_manifests_and_archives_end_in_stagewise_errors_or_answers(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = fuzz(tmp_path, manifest_cases=300, archive_cases=60, seed=15)
    assert result["failures"] == []
    assert result["slowest_s"] < 5.0
    counts = result["counts"]
    for bundle_kind in BUNDLES:
        assert sum(v for k, v in counts.items() if k.startswith(f"{bundle_kind}:manifest:")) == 300
        assert sum(v for k, v in counts.items() if k.startswith(f"{bundle_kind}:archive:")) == 60
        assert counts.get(f"{bundle_kind}:manifest:unchanged", 0) > 0
        assert any(k.startswith(f"{bundle_kind}:") and k.endswith("ManifestError") for k in counts)


if __name__ == "__main__":
    import tempfile

    n_manifest, n_archive = (int(a) for a in sys.argv[1:3])
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        print(json.dumps(fuzz(Path(work), n_manifest, n_archive, seed=int(sys.argv[3]) if len(sys.argv) > 3 else 2026),
                         indent=2))
        print(f"{time.perf_counter() - t0:.1f} s")
