"""The ONNX Runtime model cache never makes a valid bundle unloadable: entries are verified, writes atomic,
a full or read-only folder is skipped with a warning, leftovers of killed writers are removed."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import stagewise
from stagewise.bundle import write_bundle
from stagewise.runtimes import model_cache
from stagewise.runtimes.model_cache import CacheWarning
from toy_bundle import toy_bundle, toy_image, toy_manifest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture()
def bundle(tmp_path) -> Path:
    return toy_bundle(tmp_path / "b", tmp_path / "models")


def _load(path: Path, cache: Path):
    return stagewise.load(path, runtime="onnxruntime", warmup=False, options={"cache_dir": str(cache)})


def _from_cache(path: Path, cache: Path) -> list[bool]:
    with _load(path, cache) as c:
        assert c.predict(toy_image()).name == "green"
        return [s.session.loaded_from_cache for s in c._stages]


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.onnx"))


def test_entries_are_verified_private_and_reused(tmp_path, bundle):
    cache = tmp_path / "cache"
    assert _from_cache(bundle, cache) == [False] * 3
    entries = _entries(cache)
    assert len(entries) == 3 and len(list(cache.glob("*.json"))) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in cache.iterdir())
    assert not list(cache.glob("*.partial"))
    assert _from_cache(bundle, cache) == [True] * 3


@pytest.mark.parametrize("damage", ["truncate", "tamper", "drop_record", "group_writable"])
def test_a_damaged_entry_is_a_miss_and_the_next_load_repairs_it(tmp_path, bundle, damage):
    cache = tmp_path / "cache"
    _from_cache(bundle, cache)
    entry = _entries(cache)[0]
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:len(entry.read_bytes()) // 2])
    elif damage == "tamper":  # same size, other content: the record's sha256 catches it
        data = bytearray(entry.read_bytes())
        data[-20] ^= 0xFF
        entry.write_bytes(bytes(data))
    elif damage == "drop_record":
        entry.with_suffix(".json").unlink()
    else:
        entry.chmod(0o666)
    with pytest.warns(CacheWarning) if damage != "drop_record" else warnings.catch_warnings():
        used = _from_cache(bundle, cache)
    assert used.count(False) == 1
    if damage != "group_writable":  # another user's file is left alone, never read
        assert _from_cache(bundle, cache) == [True] * 3


def test_a_full_disk_during_the_first_load_publishes_nothing(tmp_path, bundle):
    """The first load runs with a file-size limit (what a full disk does to ONNX Runtime's write): it loads,
    warns, leaves no entry; once there is room the next load writes the cache and the one after uses it."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import resource, signal, warnings
        import stagewise
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = stagewise.load({str(bundle)!r}, runtime="onnxruntime", warmup=False,
                               options={{"cache_dir": {str(cache)!r}}})
        print(c.predict(__import__("toy_bundle").toy_image()).name, len(caught))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    name, warned = out.stdout.split()
    assert name == "green" and int(warned) >= 3
    assert not any(cache.iterdir())
    assert _from_cache(bundle, cache) == [False] * 3
    assert _from_cache(bundle, cache) == [True] * 3


def test_a_read_only_cache_folder_is_skipped_with_a_warning(tmp_path, bundle, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(model_cache.tempfile, "mkstemp", read_only)
    with pytest.warns(CacheWarning, match="cannot write to the model cache"):
        assert _from_cache(bundle, cache) == [False] * 3
    assert not any(cache.iterdir())


def test_a_read_only_cache_is_still_read(tmp_path, bundle, monkeypatch):
    cache = tmp_path / "cache"
    _from_cache(bundle, cache)
    monkeypatch.setattr(model_cache.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError()))
    assert _from_cache(bundle, cache) == [True] * 3


def test_temporary_files_of_killed_writers_are_removed(tmp_path, bundle):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = cache / f".0123abcd.{dead.pid}.xyz.partial"
    legacy = cache / "tmpq1w2e3.partial"  # the name older versions used
    fresh_legacy = cache / "tmpfresh.partial"
    alive = cache / f".0123abcd.{os.getpid()}.abc.partial"
    for p in (orphan, legacy, fresh_legacy, alive):
        p.write_bytes(b"half a model")
    old = time.time() - 2 * model_cache.STALE_PARTIAL_S
    os.utime(legacy, (old, old))
    _from_cache(bundle, cache)
    assert not orphan.exists() and not legacy.exists()
    assert fresh_legacy.exists() and alive.exists()


def test_a_model_with_external_data_loads_every_time(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    models = tmp_path / "models"
    models.mkdir()
    w = numpy_helper.from_array((np.eye(3) * 6).astype(np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "stage", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, models / "s0.onnx", save_as_external_data=True, location="s0.onnx.data", size_threshold=0)
    manifest = toy_manifest()
    manifest["stages"] = manifest["stages"][:1]
    manifest["stages"][0]["artifacts"]["onnx"]["files"] = [{"path": "onnx/s0.onnx"}, {"path": "onnx/s0.onnx.data"}]
    for point in manifest["operating_points"]:
        point["thresholds"] = [None]
    out = write_bundle(tmp_path / "ext", manifest, {"onnx/s0.onnx": models / "s0.onnx",
                                                    "onnx/s0.onnx.data": models / "s0.onnx.data"})
    cache = tmp_path / "cache"
    for _ in range(3):
        assert _from_cache(out, cache) == [False]
    assert not cache.exists() or not any(cache.iterdir())
