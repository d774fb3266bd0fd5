"""Bundle format: schema validation naming the field, integrity, safe archives, atomic writes."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace

import pytest

from stagewise.bundle import pack, read_bundle, update_manifest, write_bundle
from stagewise.manifest import ArtifactFile, Manifest, validate_manifest
from stagewise.errors import BundleError, IntegrityError, ManifestError, UnsafeArchiveError
from stagewise.testing import manifest_for, stage_entry


def two_stage_manifest() -> dict:
    stages = [stage_entry("s0", {"source": "image", "size": [8, 8], "tensor": "image"}, ["m/s0.onnx"], carry=True),
              stage_entry("s1", {"source": "carry", "from": "s0", "tensor": "carry"}, ["m/s1.onnx"], carry=False)]
    return manifest_for(stages, ["a", "b"], {"default": [0.9, None]})


@pytest.fixture
def files(tmp_path):
    out = {}
    for name in ("s0", "s1"):
        f = tmp_path / f"{name}.onnx"
        f.write_bytes(name.encode() * 100)
        out[f"m/{name}.onnx"] = f
    return out


@pytest.mark.parametrize("suffix", ["", ".swb"])
def test_roundtrip_records_and_checks_sha256(tmp_path, files, suffix):
    out = write_bundle(tmp_path / f"bundle{suffix}", two_stage_manifest(), files)
    bundle = read_bundle(out)
    entry = bundle.manifest.stages[0].artifacts["onnx"].files[0]
    assert len(entry.sha256) == 64 and entry.bytes == 200
    assert bundle.artifact_paths(1, "onnx")[0].read_bytes() == b"s1" * 100
    assert bundle.formats() == ["onnx"]
    bundle.close()


def test_modified_artifact_is_refused(tmp_path, files):
    out = write_bundle(tmp_path / "bundle", two_stage_manifest(), files)
    (out / "m" / "s1.onnx").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="m/s1.onnx.*modified"):
        read_bundle(out)


def test_missing_artifact_is_refused(tmp_path, files):
    out = write_bundle(tmp_path / "bundle", two_stage_manifest(), files)
    (out / "m" / "s0.onnx").unlink()
    with pytest.raises(IntegrityError, match="m/s0.onnx is missing"):
        read_bundle(out)


def test_modified_artifact_inside_swb_is_refused(tmp_path, files):
    out = write_bundle(tmp_path / "b.swb", two_stage_manifest(), files)
    tampered = tmp_path / "t.swb"
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, b"x" + data[1:] if item.filename == "m/s0.onnx" else data)
    with pytest.raises(IntegrityError, match="m/s0.onnx"):
        read_bundle(tampered)


@pytest.mark.parametrize("change, field", [
    (lambda m: m["stages"][0]["exit"].update(score="vibes"), "stages[0].exit.score"),
    (lambda m: m["stages"][1]["input"].update(source="patch"), "stages[1].input"),
    (lambda m: m["input"].update(std=[1, 0, 1]), "input.std[1]"),
    (lambda m: m["operating_points"][0].update(thresholds=[0.5]), "operating_points[0].thresholds"),
    (lambda m: m["stages"][1]["input"].update({"from": "nope"}), "stages[1].input.from"),
    (lambda m: m.update(default_operating_point="fast"), "default_operating_point"),
    (lambda m: m["stages"][0]["artifacts"]["onnx"]["files"][0].update(path="../escape.onnx"),
     "stages[0].artifacts.onnx.files[0].path"),
    (lambda m: m.pop("task"), "(top level)"),
])
def test_schema_errors_name_the_field(change, field):
    manifest = two_stage_manifest()
    for entry in (f for s in manifest["stages"] for f in s["artifacts"]["onnx"]["files"]):
        entry["sha256"] = "0" * 64
    validate_manifest(manifest)
    change(manifest)
    with pytest.raises(ManifestError) as err:
        validate_manifest(manifest)
    assert f"manifest field {field}" in str(err.value)


def test_corrupt_manifest_and_non_bundles(tmp_path, files):
    out = write_bundle(tmp_path / "bundle", two_stage_manifest(), files)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_bundle(out)
    junk = tmp_path / "junk.swb"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="neither a bundle directory"):
        read_bundle(junk)
    with pytest.raises(BundleError, match="not found"):
        read_bundle(tmp_path / "nowhere")


def test_future_format_version_says_to_upgrade(tmp_path, files):
    out = write_bundle(tmp_path / "bundle", two_stage_manifest(), files)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 2
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="upgrade stagewise"):
        read_bundle(out)


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt"])
def test_archive_members_cannot_escape(tmp_path, files, member):
    out = write_bundle(tmp_path / "b.swb", two_stage_manifest(), files)
    evil = tmp_path / "evil.swb"
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr(member, b"gotcha")
    with pytest.raises(UnsafeArchiveError, match="outside the bundle"):
        read_bundle(evil)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_failed_write_leaves_nothing(tmp_path, files):
    bad = two_stage_manifest()
    bad["stages"][0]["exit"]["score"] = "vibes"
    for target in (tmp_path / "out", tmp_path / "out.swb"):
        with pytest.raises(ManifestError):
            write_bundle(target, bad, files)
        assert not target.exists()
    del files["m/s1.onnx"]
    with pytest.raises(BundleError, match="no content given for bundle file m/s1.onnx"):
        write_bundle(tmp_path / "out", two_stage_manifest(), files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.onnx", "s1.onnx"]


def test_existing_bundle_is_kept_unless_overwrite(tmp_path, files):
    out = write_bundle(tmp_path / "b.swb", two_stage_manifest(), files)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(out, two_stage_manifest(), files)
    changed = two_stage_manifest()
    changed["name"] = "second"
    write_bundle(out, changed, files, overwrite=True)
    assert read_bundle(out).manifest.name == "second"


@pytest.mark.parametrize("suffix", ["", ".swb"])
def test_update_manifest_is_atomic(tmp_path, files, suffix):
    out = write_bundle(tmp_path / f"b{suffix}", two_stage_manifest(), files)

    update_manifest(out, lambda m, root: replace(m, name="renamed"))
    assert read_bundle(out).manifest.name == "renamed"

    def break_it(m, root):
        return m.with_stages(lambda k, s: replace(s, exit=replace(s.exit, temperature=-1)) if k == 0 else s)

    with pytest.raises(ManifestError, match="stages\\[0\\].exit.temperature"):
        update_manifest(out, break_it)
    assert read_bundle(out).manifest.name == "renamed"


def _with_exit_model(m: Manifest, model: ArtifactFile | None) -> Manifest:
    return m.with_stages(lambda k, s: replace(s, exit=replace(s.exit, model=model)) if k == 0 else s)


def _add_exit_model(m: Manifest, root, content: bytes, sha256: str | None = None) -> Manifest:
    """Name a new content-addressed file (stage 0's exit-score model) written under ``root``."""
    digest = hashlib.sha256(content).hexdigest()
    rel = f"exits/s0-{digest[:12]}.npz"
    (root / "exits").mkdir(exist_ok=True)
    (root / rel).write_bytes(content)
    return _with_exit_model(m, ArtifactFile(rel, sha256 or digest, len(content)))


@pytest.mark.parametrize("suffix", ["", ".swb"])
def test_update_manifest_adds_files_atomically(tmp_path, files, suffix):
    out = write_bundle(tmp_path / f"b{suffix}", two_stage_manifest(), files)

    def add(m, root):
        m = _add_exit_model(m, root, b"first model")
        assert read_bundle(out).manifest.stages[0].exit.model is None  # the old bundle is still whole
        return m

    first = update_manifest(out, add).stages[0].exit.model.path
    bundle = read_bundle(out)
    assert (bundle.root / first).read_bytes() == b"first model"
    bundle.close()

    def fail(m, root):
        _add_exit_model(m, root, b"never named")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        update_manifest(out, fail)
    bundle = read_bundle(out)
    assert bundle.manifest.stages[0].exit.model.path == first
    assert sorted(p.relative_to(bundle.root).as_posix() for p in (bundle.root / "exits").iterdir()) == [first]
    bundle.close()

    with pytest.raises(IntegrityError, match="exits/s0-"):
        update_manifest(out, lambda m, root: _add_exit_model(m, root, b"second model", sha256="0" * 64))
    assert read_bundle(out).manifest.stages[0].exit.model.path == first

    second = update_manifest(out, lambda m, root: _add_exit_model(m, root, b"second model"))
    bundle = read_bundle(out)
    names = sorted(p.relative_to(bundle.root).as_posix() for p in (bundle.root / "exits").iterdir())
    assert names == [second.stages[0].exit.model.path] and first not in names  # the old file is gone
    bundle.close()

    update_manifest(out, lambda m, root: _with_exit_model(m, None))
    bundle = read_bundle(out)
    assert not (bundle.root / "exits").exists()
    assert sorted(p.relative_to(bundle.root).as_posix() for p in bundle.root.rglob("*") if p.is_file()) == [
        "m/s0.onnx", "m/s1.onnx", "manifest.json"]
    bundle.close()


def test_pack_directory_to_swb(tmp_path, files):
    out = write_bundle(tmp_path / "dir", two_stage_manifest(), files)
    swb = pack(out, tmp_path / "packed.swb")
    assert read_bundle(swb).manifest.stages == read_bundle(out).manifest.stages
