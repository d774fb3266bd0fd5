"""Bundles on disk: a directory or a ``.swb`` zip holding ``manifest.json`` and model files.

Reading validates the manifest against the shipped JSON Schema plus the cross-field rules the
schema cannot express, and verifies the sha256 of every file the manifest names before anything
uses it. Writing is atomic: a bundle appears complete at its final path or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import jsonschema

from .errors import BundleError, IntegrityError, ManifestError, UnsafeArchiveError
from .manifest import FORMAT_VERSION, Manifest

MANIFEST = "manifest.json"
ARTIFACT_FORMATS = ("onnx", "openvino", "tflite")


@lru_cache(maxsize=1)
def manifest_schema() -> dict:
    """The JSON Schema of manifest format version 1, as shipped in the package."""
    text = resources.files("stagewise").joinpath("schema/manifest.schema.json").read_text()
    return json.loads(text)


def _field_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate_manifest(manifest: Any) -> None:
    """Raise :class:`ManifestError` naming the offending field if ``manifest`` is not valid."""
    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        raise ManifestError(f"manifest field {_field_path(error.absolute_path)}: {error.message}")
    _check_references(manifest)


def _check_references(m: dict) -> None:
    names = [s["name"] for s in m["stages"]]
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest field stages: stage names must be unique, got {names}")
    for i, stage in enumerate(m["stages"]):
        source = stage["input"]
        if source["source"] == "carry":
            earlier = {s["name"]: s for s in m["stages"][:i]}
            if source["from"] not in earlier or "carry" not in earlier[source["from"]]["outputs"]:
                raise ManifestError(
                    f"manifest field stages[{i}].input.from: {source['from']!r} must name an earlier stage "
                    "that has a carry output")
    paths = [f["path"] for s in m["stages"] for a in s["artifacts"].values() for f in a["files"]]
    if len(set(paths)) != len(paths):
        raise ManifestError("manifest field stages[].artifacts: each file may be named only once")
    points = [p["name"] for p in m["operating_points"]]
    if len(set(points)) != len(points):
        raise ManifestError(f"manifest field operating_points: names must be unique, got {points}")
    for j, point in enumerate(m["operating_points"]):
        if len(point["thresholds"]) != len(m["stages"]):
            raise ManifestError(
                f"manifest field operating_points[{j}].thresholds: needs one entry per stage "
                f"({len(m['stages'])}), got {len(point['thresholds'])}")
    if m["default_operating_point"] not in points:
        raise ManifestError(
            f"manifest field default_operating_point: {m['default_operating_point']!r} is not one of {points}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(manifest: dict) -> Iterator[dict]:
    """Every ``{path, sha256}`` entry of a manifest document, in stage order (model files, then exit-score models)."""
    for stage in manifest["stages"]:
        for artifact in stage["artifacts"].values():
            yield from artifact["files"]
        if "model" in stage.get("exit", {}):
            yield stage["exit"]["model"]


@dataclass
class Bundle:
    """A validated, verified bundle. ``root`` is a directory holding ``manifest.json``.

    For a ``.swb`` file, ``root`` is a private temporary directory that lives as long as this
    object (or until :meth:`close`).
    """

    root: Path
    manifest: Manifest
    source: Path
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def artifact_paths(self, stage_index: int, artifact_format: str) -> list[Path]:
        """Absolute paths of one stage's files for ``artifact_format`` (main model file first)."""
        artifact = self.manifest.stages[stage_index].artifacts[artifact_format]
        return [self.root / f.path for f in artifact.files]

    def formats(self) -> list[str]:
        """Artifact formats that every stage carries."""
        return [f for f in ARTIFACT_FORMATS if all(f in s.artifacts for s in self.manifest.stages)]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory or ``.swb`` file, validate its manifest and verify its files."""
    path = Path(path)
    tmp = None
    if path.is_dir():
        root = path
    elif path.is_file():
        if not zipfile.is_zipfile(path):
            raise BundleError(f"{path} is neither a bundle directory nor a .swb (zip) file")
        tmp = tempfile.TemporaryDirectory(prefix="stagewise-")
        root = Path(tmp.name)
        _safe_extract(path, root)
    else:
        raise BundleError(f"bundle not found: {path}")
    document = _read_manifest(root, path)
    manifest = Manifest.from_dict(document)
    if verify:
        verify_files(root, document)
    return Bundle(root=root, manifest=manifest, source=path, _tmp=tmp)


def _read_manifest(root: Path, origin: Path) -> dict:
    file = root / MANIFEST
    if not file.is_file():
        raise BundleError(f"{origin} has no {MANIFEST}: not a stagewise bundle")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{origin}: {MANIFEST} is not valid JSON ({exc}); the bundle is corrupt, rebuild it") from exc
    if isinstance(manifest, dict) and manifest.get("format_version") not in (None, FORMAT_VERSION):
        raise ManifestError(
            f"manifest field format_version: {manifest['format_version']!r} is not supported by this stagewise "
            f"(reads version {FORMAT_VERSION}); upgrade stagewise or rebuild the bundle")
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Check that every named file exists inside ``root`` with its recorded sha256."""
    _verify_entries(root, artifact_files(manifest))


def _verify_entries(root: Path, entries: Iterable[dict]) -> None:
    resolved_root = root.resolve()
    for entry in entries:
        file = (root / entry["path"]).resolve()
        if resolved_root not in file.parents:
            raise UnsafeArchiveError(f"manifest names {entry['path']!r}, which lies outside the bundle")
        if not file.is_file():
            raise IntegrityError(f"bundle file {entry['path']} is missing; the bundle is incomplete, rebuild or re-copy it")
        actual = sha256_file(file)
        if actual != entry["sha256"]:
            raise IntegrityError(
                f"bundle file {entry['path']} has sha256 {actual[:12]}…, the manifest records "
                f"{entry['sha256'][:12]}…: the file was modified or corrupted; rebuild or re-copy the bundle")


def _safe_extract(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            mode = info.external_attr >> 16
            if name.is_absolute() or ".." in name.parts or "\\" in info.filename or (mode & 0o170000) == 0o120000:
                raise UnsafeArchiveError(
                    f"{archive}: member {info.filename!r} would be written outside the bundle (absolute path, '..' "
                    "or symlink); refusing to open it")
        zf.extractall(dest)


def write_bundle(out: str | Path, manifest: dict | Manifest, files: dict[str, Path], overwrite: bool = False) -> Path:
    """Write a bundle atomically: fill in each file's sha256 and size, validate, then publish.

    ``manifest`` is the JSON document (a dict) or a parsed :class:`Manifest`.

    ``files`` maps each manifest path to the local file holding its content. ``out`` ending in
    ``.swb`` gives the single-file form, anything else a directory. On any error nothing is
    left at ``out`` (an existing bundle there is only replaced when ``overwrite`` is set).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another --out or pass overwrite (--force)")
    manifest = manifest.to_dict() if isinstance(manifest, Manifest) else json.loads(json.dumps(manifest))
    for entry in artifact_files(manifest):
        if entry["path"] not in files:
            raise BundleError(f"no content given for bundle file {entry['path']}")
        entry["sha256"] = sha256_file(files[entry["path"]])
        entry["bytes"] = os.path.getsize(files[entry["path"]])
    validate_manifest(manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, src in files.items():
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.suffix == ".swb":
            packed = staging.with_suffix(".swb.part")
            _zip_dir(staging, packed)
            _publish(packed, out)
        else:
            _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        staging.with_suffix(".swb.part").unlink(missing_ok=True)
    return out


def _zip_dir(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(src.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(src).as_posix())


def _publish(staged: Path, out: Path) -> None:
    """Move ``staged`` to ``out``; an existing ``out`` is swapped out and removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(staged, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def pack(bundle_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Pack a bundle directory into a ``.swb`` file (verified first)."""
    bundle = read_bundle(bundle_dir)
    files = {f.path: bundle.root / f.path for f in bundle.manifest.files()}
    return write_bundle(out, bundle.manifest, files, overwrite=overwrite)


def update_manifest(path: str | Path, change: Callable[[dict, Path], dict]) -> dict:
    """Rewrite a bundle's manifest atomically with ``change(document, root) -> document``.

    The bundle's files are verified first. ``change`` gets a copy of the manifest's JSON document
    (:meth:`Manifest.to_dict`) and ``root``, the
    folder holding the bundle's files (the bundle directory itself, or where a ``.swb`` is
    unpacked); it may add files under ``root`` and name them in the manifest with their sha256
    and size, but must not modify a file the current manifest names (new content gets a new,
    e.g. content-addressed, name). The new manifest is validated and every file it adds verified
    before it replaces the old one: a bundle directory gets it with one rename (the old manifest
    stays valid until then), a ``.swb`` is repacked and swapped. Afterwards the files the new
    manifest no longer names, and files ``change`` added without naming them, are removed. On any
    error the bundle is left as it was.
    """
    path = Path(path)
    bundle = read_bundle(path)
    root = bundle.root
    try:
        before = _file_tree(root)
        old_entries = {(f.path, f.sha256) for f in bundle.manifest.files()}
        try:
            manifest = change(bundle.manifest.to_dict(), root)
            validate_manifest(manifest)
            _verify_entries(root, (e for e in artifact_files(manifest) if (e["path"], e["sha256"]) not in old_entries))
            if path.is_dir():
                tmp = path / f".{MANIFEST}.part"
                tmp.write_text(json.dumps(manifest, indent=2) + "\n")
                os.replace(tmp, path / MANIFEST)
            else:
                files = {e["path"]: root / e["path"] for e in artifact_files(manifest)}
                write_bundle(path, manifest, files, overwrite=True)
        except BaseException:
            if path.is_dir():
                _remove_files(root, _file_tree(root) - before)
            raise
        if path.is_dir():
            named = {e["path"] for e in artifact_files(manifest)}
            unnamed = ({p for p, _ in old_entries} | (_file_tree(root) - before)) - named
            _remove_files(root, unnamed)
    finally:
        bundle.close()
    return manifest


def _file_tree(root: Path) -> set[str]:
    """Every file under ``root``, as a path relative to it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _remove_files(root: Path, relative: Iterable[str]) -> None:
    """Delete files under ``root`` and the folders that this leaves empty (never ``root`` itself)."""
    for rel in sorted(relative):
        file = root / rel
        file.unlink(missing_ok=True)
        folder = file.parent
        while folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
