"""Bad bundles, archives, options and outputs end in specific errors; nothing outside a bundle is ever destroyed."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import stagewise
from stagewise import archive
from stagewise.bundle import check_output, read_bundle, remove_stale_build_dirs, write_bundle
from stagewise.cli import main
from stagewise.errors import (BundleError, DeviceUnavailableError, IntegrityError, InvalidOptionError, ManifestError,
                              UnsafeArchiveError)
from toy_bundle import toy_bundle, toy_files, toy_image, toy_manifest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The temporary directory stagewise unpacks into, private to the test (to count what is left there)."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture()
def models(tmp_path) -> dict[str, Path]:
    return toy_files(tmp_path / "models")


def _load(path, **kw):
    return stagewise.load(path, runtime="onnxruntime", warmup=False, **kw)


def _swb(path: Path, members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


# --- --force and the output folder -------------------------------------------------------------------------------

def test_force_refuses_a_directory_that_is_not_a_bundle_and_deletes_nothing(tmp_path, models):
    target = tmp_path / "documents"
    target.mkdir()
    (target / "thesis.txt").write_text("years of work")
    with pytest.raises(BundleError, match="not a stagewise bundle"):
        write_bundle(target, toy_manifest(), models, overwrite=True)
    assert (target / "thesis.txt").read_text() == "years of work"
    other = tmp_path / "notes.swb"
    other.write_bytes(b"my notes")
    with pytest.raises(BundleError, match="not a stagewise bundle"):
        write_bundle(other, toy_manifest(), models, overwrite=True)
    assert other.read_bytes() == b"my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["documents", "models", "notes.swb"]  # no staging left


def test_force_replaces_a_bundle(tmp_path, models):
    for out in (tmp_path / "b", tmp_path / "b.swb"):
        write_bundle(out, toy_manifest(), models)
        manifest = toy_manifest()
        manifest["name"] = "second"
        write_bundle(out, manifest, models, overwrite=True)
        assert read_bundle(out).manifest.name == "second"


def test_force_refuses_a_bundle_folder_holding_other_files_and_deletes_nothing(tmp_path, models):
    out = write_bundle(tmp_path / "b", toy_manifest(), models)
    (out / "notes").mkdir()
    (out / "notes" / "results.csv").write_text("a month of measurements")
    with pytest.raises(BundleError, match=r"also holds 1 file\(s\) its manifest does not name \(notes/results.csv\)"):
        write_bundle(out, toy_manifest(), models, overwrite=True)
    assert (out / "notes" / "results.csv").read_text() == "a month of measurements"
    (out / "notes" / "results.csv").unlink()
    (out / "notes").rmdir()
    write_bundle(out, toy_manifest(), models, overwrite=True)  # only what the manifest names: replaced


def test_output_folder_must_be_writable_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(BundleError, match="cannot write the bundle"):
        check_output(blocker / "out.swb", overwrite=False)


def test_convert_with_force_on_a_non_bundle_exits_with_one_line(tmp_path, capsys):
    target = tmp_path / "keep"
    target.mkdir()
    (target / "doc.txt").write_text("keep me")
    with pytest.raises(SystemExit) as done:
        main(["convert", "tests/toy_models.py:residual_net", "--exits", "a", "--data", str(tmp_path),
              "--out", str(target), "--force"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a stagewise bundle" in err
    assert (target / "doc.txt").read_text() == "keep me"


def test_stale_staging_and_build_folders_are_removed(tmp_path, models, private_tmp):
    dead = tmp_path / ".b.swb.abc-staging999999999"
    dead.mkdir()
    alive = tmp_path / f".b.swb.def-staging{os.getpid()}"
    alive.mkdir()
    write_bundle(tmp_path / "b.swb", toy_manifest(), models)
    assert not dead.exists() and alive.exists()
    old = private_tmp / "stagewise-build-old"
    (old / "stage").mkdir(parents=True)
    fresh = private_tmp / "stagewise-build-new"
    fresh.mkdir()
    past = time.time() - 2 * 86400
    for p in (old / "stage", old):
        os.utime(p, (past, past))
    assert remove_stale_build_dirs() == [old]
    assert fresh.exists()


# --- archive limits ----------------------------------------------------------------------------------------------

def test_zip_bomb_is_refused_before_writing_more_than_the_cap(tmp_path, models, private_tmp):
    good = toy_bundle(tmp_path / "good.swb", tmp_path / "m")
    with zipfile.ZipFile(good) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist()]
    manifest = json.loads(dict(members)["manifest.json"])
    recorded = manifest["stages"][0]["artifacts"]["onnx"]["files"][0]["bytes"]
    bomb = [(n, b"\0" * (256 << 20) if n == "onnx/s0.onnx" else d) for n, d in members]
    _swb(tmp_path / "bomb.swb", bomb)
    assert (tmp_path / "bomb.swb").stat().st_size < 2 << 20
    with pytest.raises(UnsafeArchiveError, match="zip bomb|more than"):
        read_bundle(tmp_path / "bomb.swb")
    assert list(private_tmp.iterdir()) == []
    # an entry larger than recorded but not compressible enough to trip the ratio guard: the cap stops it
    rng = np.random.default_rng(0)
    grown = [(n, d + rng.integers(0, 4, 1 << 20, dtype=np.uint8).tobytes() if n == "onnx/s0.onnx" else d)
             for n, d in members]
    _swb(tmp_path / "grown.swb", grown)
    written = []
    real_copy = archive._copy

    def spy(arc, zf, info, limit, write):
        written.append(limit)
        return real_copy(arc, zf, info, limit, write)

    archive._copy = spy
    try:
        with pytest.raises(UnsafeArchiveError, match="more than"):
            read_bundle(tmp_path / "grown.swb")
    finally:
        archive._copy = real_copy
    assert written[-1] == recorded
    assert list(private_tmp.iterdir()) == []


def test_huge_manifest_and_unlisted_members_are_never_extracted(tmp_path, private_tmp):
    good = toy_bundle(tmp_path / "good.swb", tmp_path / "m")
    with zipfile.ZipFile(good) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist()]
    _swb(tmp_path / "big.swb", [(n, d + b" " * (archive.MAX_MANIFEST_BYTES + 1) if n == "manifest.json" else d)
                                for n, d in members])
    with pytest.raises(BundleError):
        read_bundle(tmp_path / "big.swb")
    _swb(tmp_path / "extra.swb", members + [("onnx/extra.data", b"unverified")])
    bundle = read_bundle(tmp_path / "extra.swb")
    assert not (bundle.root / "onnx/extra.data").exists()
    bundle.close()
    assert list(private_tmp.iterdir()) == []


def test_duplicate_members_and_corrupt_archives_are_bundle_errors(tmp_path, private_tmp):
    good = toy_bundle(tmp_path / "good.swb", tmp_path / "m")
    with zipfile.ZipFile(good) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist()]
    with pytest.warns(UserWarning):
        _swb(tmp_path / "dup.swb", members + [("manifest.json", b"{}")])
    with pytest.raises(UnsafeArchiveError, match="twice"):
        read_bundle(tmp_path / "dup.swb")
    data = good.read_bytes()
    (tmp_path / "cut.swb").write_bytes(data[: len(data) // 2] + data[-200:])
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("onnx/s0.onnx")
    flipped = bytearray(data)
    flipped[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    (tmp_path / "crc.swb").write_bytes(bytes(flipped))
    for name in ("cut.swb", "crc.swb"):
        with pytest.raises(BundleError):
            read_bundle(tmp_path / name)
    assert list(private_tmp.iterdir()) == []


def test_temporary_folders_go_after_errors_and_garbage_collection(tmp_path, private_tmp):
    good = toy_bundle(tmp_path / "good.swb", tmp_path / "m")
    cascade = _load(good)
    assert len(list(private_tmp.iterdir())) == 1
    del cascade
    gc.collect()
    assert list(private_tmp.iterdir()) == []
    manifest = toy_manifest()
    manifest["task"]["labels"].append("violet")
    wrong = write_bundle(tmp_path / "wrong.swb", manifest, toy_files(tmp_path / "m2"))
    with pytest.raises(ManifestError, match="task.labels: 4 labels"):
        _load(wrong)
    assert list(private_tmp.iterdir()) == []


# --- the manifest: strict JSON, bounds, and what the models declare -----------------------------------------------

def _with(tmp_path: Path, change) -> Path:
    manifest = toy_manifest()
    change(manifest)
    out = tmp_path / f"b{len(list(tmp_path.glob('b*')))}"
    return write_bundle(out, manifest, toy_files(tmp_path / "models"))


@pytest.mark.parametrize("text, message", [
    ('"temperature": NaN', "not valid JSON"),
    ('"temperature": Infinity', "not valid JSON"),
])
def test_nan_and_infinity_are_refused(tmp_path, text, message):
    out = _with(tmp_path, lambda m: None)
    doc = (out / "manifest.json").read_text().replace('"temperature": 1.0', text, 1)
    (out / "manifest.json").write_text(doc)
    with pytest.raises(ManifestError, match=message):
        read_bundle(out)


def test_deep_nesting_is_refused(tmp_path):
    out = _with(tmp_path, lambda m: None)
    for depth in (40, 5000):
        text = (out / "manifest.json").read_text()
        (out / "manifest.json").write_text('{"calibration": ' + '{"x": ' * depth + "{}" + "}" * depth + ", " + text[1:])
        with pytest.raises(ManifestError, match="not valid JSON|deeper"):
            read_bundle(out)
        (out / "manifest.json").write_text(text)


@pytest.mark.parametrize("field, change", [
    ("thresholds", lambda m: m["operating_points"][1].update(thresholds=[1.5, 0.6, None])),
    ("thresholds", lambda m: m["operating_points"][1].update(thresholds=[-0.1, 0.6, None])),
    ("temperature", lambda m: m["stages"][0]["exit"].update(temperature=0)),
    ("temperature", lambda m: m["stages"][0]["exit"].update(temperature=1e9)),
    ("crop_fraction", lambda m: m["input"].update(crop_fraction=0.01)),
    ("size", lambda m: m["stages"][0]["input"].update(size=[1000000, 8])),
    ("p50", lambda m: m["stages"][0]["cost"]["latency_ms"]["onnxruntime-cpu-defaultt"].update(p50=1e300)),
    ("std", lambda m: m["input"].update(std=[0, 1, 1])),
])
def test_numbers_out_of_range_name_the_field(tmp_path, field, change):
    manifest = toy_manifest()
    change(manifest)
    with pytest.raises(ManifestError, match=field):
        write_bundle(tmp_path / "b", manifest, toy_files(tmp_path / "models"))


def test_max_logit_thresholds_may_exceed_one(tmp_path):
    def change(m):
        for s in m["stages"]:
            s["exit"]["score"] = "max_logit"
        m["operating_points"][1]["thresholds"] = [7.5, 12.0, None]

    with _load(_with(tmp_path, change)) as cascade:
        assert cascade.predict(toy_image(), operating_point="fast").name == "green"


@pytest.mark.parametrize("change, field, value", [
    (lambda m: m["stages"][1]["input"].update(tensor="pixels"), "stages[1].input.tensor", "image"),
    (lambda m: m["stages"][2]["outputs"].update(logits="scores"), "stages[2].outputs.logits", "logits"),
    (lambda m: m["task"].update(labels=["a", "b"]), "task.labels: 2 labels", "[None, 3]"),
    (lambda m: m["stages"][0]["input"].update(size=[16, 16]), "stages[0].input.size", "[None, 3, 8, 8]"),
    (lambda m: m["input"].update(layout="NHWC"), "input.size|input.layout", "8, 8"),
])
def test_manifest_is_checked_against_the_loaded_models(tmp_path, change, field, value):
    with pytest.raises(ManifestError) as error:
        _load(_with(tmp_path, change))
    assert any(f in str(error.value) for f in field.split("|")) and value in str(error.value)


# --- options -----------------------------------------------------------------------------------------------------

def test_options_are_checked_at_the_boundary(tmp_path):
    out = _with(tmp_path, lambda m: None)
    with _load(out) as cascade:
        for bad in (float("nan"), float("inf"), -1.0, 0):
            if bad != 0:  # a zero per-request budget runs the first stage alone
                with pytest.raises(InvalidOptionError, match="budget_ms"):
                    cascade.predict(toy_image(), budget_ms=bad)
            with pytest.raises(InvalidOptionError, match="mean_budget_ms"):
                cascade.predict(toy_image(), mean_budget_ms=bad)
            with pytest.raises(InvalidOptionError, match="mean_budget_ms"):
                cascade.set_mean_budget(bad)
        assert cascade.predict(toy_image(), budget_ms=0).stage_index == 0
        assert list(map(cascade.predict, [toy_image()] * 3))[0].name == "green"
        for bad in (0, -1):
            with pytest.raises(InvalidOptionError, match="max_batch"):
                cascade.predict_batch([toy_image()], max_batch=bad)
    with pytest.raises(InvalidOptionError, match="threads"):
        _load(out, threads=0)
    with pytest.raises(InvalidOptionError, match="mean_budget_ms"):
        _load(out, mean_budget_ms=float("nan"))
    with pytest.raises(DeviceUnavailableError, match="CPUExecutionProvider"):
        _load(out, device="GPU")
    with pytest.raises(DeviceUnavailableError, match="not available"):
        _load(out, options={"providers": ["NoSuchExecutionProvider"]})


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_failures_are_one_line_with_an_exit_code(tmp_path, capsys, monkeypatch):
    out = _with(tmp_path, lambda m: m.update(calibration={"free": "form", "n": "many"}))
    main(["inspect", str(out)])  # a free-form calibration record is shown as JSON only, no traceback
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["bench", str(out), "--data", str(tmp_path), "--limit", "0"])
    assert done.value.code == 2
    with pytest.raises(SystemExit) as done:
        main(["run", str(out), str(out / "manifest.json"), "--budget-ms", "nan", "--backend", "onnxruntime"])
    assert done.value.code == 2
    assert "not a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["run", str(out), str(out / "manifest.json"), "--backend", "onnxruntime"])  # not an image
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err

    def boom(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr("stagewise.bundle.read_bundle", boom)
    with pytest.raises(SystemExit) as done:
        main(["inspect", str(out)])
    assert done.value.code == 3
    err = capsys.readouterr().err
    assert "unexpected error" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["--debug", "inspect", str(out)])
    assert "Traceback" in capsys.readouterr().err


def test_cli_missing_extra_and_unwritable_output_are_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from stagewise.runtimes.base import Runtime

    out = _with(tmp_path, lambda m: None)
    Image.fromarray(toy_image()).save(tmp_path / "green.png")
    monkeypatch.setattr(Runtime, "installed", lambda self: False)
    with pytest.raises(SystemExit) as done:
        main(["run", str(out), str(tmp_path / "green.png"), "--backend", "onnxruntime"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "stagewise[onnxruntime]"' in err
    monkeypatch.undo()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as done:
        main(["convert", "tests/toy_models.py:residual_net", "--exits", "a", "--data", str(tmp_path),
              "--out", str(blocker / "out.swb")])
    assert done.value.code == 2 and "cannot write the bundle" in capsys.readouterr().err


def test_a_signed_directory_runs_exactly_what_was_verified(tmp_path, models, monkeypatch):
    """A writer that swaps the models right after verification (the race a concurrent writer can win) changes
    nothing: the signed load verified and runs private copies."""
    pytest.importorskip("cryptography")
    from toy_bundle import onnx_stage_model
    from stagewise import bundle as bundle_module
    from stagewise.bundle import sign_bundle
    from stagewise.signing import generate_key

    out = write_bundle(tmp_path / "signed", toy_manifest(), models)
    generate_key(tmp_path / "k.pem", tmp_path / "k.pub")
    sign_bundle(out, tmp_path / "k.pem")
    real = bundle_module.verify_files

    def verify_then_swap(root, manifest):
        real(root, manifest)
        for k in range(3):  # models that answer the darkest channel instead of the brightest
            onnx_stage_model(out / "onnx" / f"s{k}.onnx", 8, 8, scale=-6.0)

    monkeypatch.setattr(bundle_module, "verify_files", verify_then_swap)
    with _load(out, trusted_keys=[tmp_path / "k.pub"], options={"cache_dir": False}) as cascade:
        assert cascade.bundle.root != out
        assert cascade.predict(toy_image(), operating_point="full").name == "green"
    monkeypatch.setattr(bundle_module, "verify_files", real)
    with pytest.raises(IntegrityError):
        _load(out, trusted_keys=[tmp_path / "k.pub"])

