"""Bundles on disk: a directory or a ``.swb`` zip holding ``manifest.json`` and model files.

Reading parses ``manifest.json`` as strict JSON, validates and parses it
(:meth:`stagewise.manifest.Manifest.from_dict`), checks its signature when trusted keys are
given (:mod:`stagewise.signing`), unpacks a ``.swb`` under the limits of :mod:`stagewise.archive`,
and verifies the sha256 of every file the manifest names before anything uses it. Writing is
atomic: a bundle appears complete at its final path or not at all, and only a bundle is ever
replaced (:func:`check_output`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import archive, signing
from .errors import BundleError, IntegrityError, ManifestError, UnsafeArchiveError
from .formats import FORMATS
from .manifest import FORMAT, FORMAT_VERSION, ArtifactFile, Manifest, document_files

MANIFEST = "manifest.json"
SIGNATURE = signing.SIGNATURE
MAX_MANIFEST_DEPTH = 32
"""Deepest nesting of a manifest document (a real one nests about 7 levels)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    def classes(self) -> list[str]:
        """The class names, in target order."""
        return self.manifest.classes

    def artifact_paths(self, stage_index: int, artifact_format: str) -> list[Path]:
        """Absolute paths of one stage's files for ``artifact_format`` (main model file first)."""
        artifact = self.manifest.stages[stage_index].artifacts[artifact_format]
        return [self.root / f.path for f in artifact.files]

    def formats(self) -> list[str]:
        """Artifact formats that every stage carries."""
        return [f for f in FORMATS if all(f in s.artifacts for s in self.manifest.stages)]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def read_bundle(path: str | Path, verify: bool = True,
                trusted_keys: Sequence[Any] | None = None) -> Bundle:
    """Open a bundle directory or ``.swb`` file, validate its manifest and verify its files.

    A ``.swb`` is unpacked under the limits of :mod:`stagewise.archive` into a private temporary
    directory, removed by :meth:`Bundle.close`, when the bundle is garbage-collected, or on any
    error here. ``trusted_keys`` (Ed25519 public keys: PEM files, PEM bytes or key objects): the
    bundle must carry a signature by one of them over its manifest (:mod:`stagewise.signing`),
    and a bundle directory may hold no file its manifest does not name. A signed bundle directory
    is copied into a private temporary directory and the copies are verified, so what runs is
    exactly what was verified, even if someone replaces a file in the directory meanwhile.
    """
    path = Path(path)
    text, signature = raw_manifest(path)
    document = parse_manifest(text, path)
    manifest = Manifest.from_dict(document)
    if trusted_keys is not None:
        signing.check_signature(text, signature, trusted_keys, path)
    tmp = None
    if path.is_dir() and trusted_keys is None:
        root = path
    else:
        if path.is_dir():
            _refuse_unlisted(path, manifest)
        tmp = tempfile.TemporaryDirectory(prefix="stagewise-")
        root = Path(tmp.name)
    try:
        if tmp is not None:
            wanted = {f.path: f.bytes for f in manifest.files()}
            if path.is_dir():
                _snapshot(path, root, wanted)
            else:
                archive.extract(path, root, wanted)
            (root / MANIFEST).write_bytes(text)
            if signature is not None:
                (root / SIGNATURE).write_bytes(signature)
        if verify or trusted_keys is not None:
            verify_files(root, manifest)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return Bundle(root=root, manifest=manifest, source=path, _tmp=tmp)


def _snapshot(src: Path, dst: Path, wanted: dict[str, int | None]) -> None:
    """Copy the named files of bundle directory ``src`` into ``dst``, each at most its recorded size plus one
    byte (a larger one then fails verification, without filling the disk); a missing one is left out."""
    resolved = src.resolve()
    for rel, size in wanted.items():
        file = (src / rel).resolve()
        if resolved not in file.parents or not file.is_file():
            continue  # verification names it
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "rb") as fin, open(target, "wb") as fout:
            left = None if size is None else size + 1
            while left is None or left > 0:
                block = fin.read(1 << 20 if left is None else min(1 << 20, left))
                if not block:
                    break
                fout.write(block)
                left = None if left is None else left - len(block)


def raw_manifest(path: Path) -> tuple[bytes, bytes | None]:
    """The bytes of a bundle's ``manifest.json`` and ``manifest.sig`` (``None``: unsigned), read under the limits."""
    if path.is_dir():
        return _read_limited(path / MANIFEST, path), _read_optional(path / SIGNATURE)
    if not path.is_file():
        raise BundleError(f"bundle not found: {path}")
    if not zipfile.is_zipfile(path):
        raise BundleError(f"{path} is neither a bundle directory nor a .swb (zip) file")
    signature = (archive.read_member(path, SIGNATURE, signing.MAX_SIGNATURE_BYTES)
                 if archive.has_member(path, SIGNATURE) else None)
    return archive.read_member(path, MANIFEST, archive.MAX_MANIFEST_BYTES), signature


def _read_limited(file: Path, origin: Path) -> bytes:
    if not file.is_file():
        raise BundleError(f"{origin} has no {MANIFEST}: not a stagewise bundle")
    if file.stat().st_size > archive.MAX_MANIFEST_BYTES:
        raise ManifestError(f"{origin}: {MANIFEST} is larger than {archive.MAX_MANIFEST_BYTES} bytes; "
                            "this is not a stagewise manifest")
    return file.read_bytes()


def _read_optional(file: Path) -> bytes | None:
    if not file.is_file():
        return None
    if file.stat().st_size > signing.MAX_SIGNATURE_BYTES:
        raise IntegrityError(f"{file} is larger than {signing.MAX_SIGNATURE_BYTES} bytes; not a stagewise signature")
    return file.read_bytes()


def unlisted_files(root: Path, manifest: Manifest) -> list[str]:
    """The files (and links) in bundle directory ``root`` that its ``manifest`` does not name."""
    named = {f.path for f in manifest.files()} | {MANIFEST, SIGNATURE}
    return [rel for file in sorted(root.rglob("*"))
            if (file.is_symlink() or file.is_file()) and (rel := file.relative_to(root).as_posix()) not in named]


def _refuse_unlisted(root: Path, manifest: Manifest) -> None:
    """A signed bundle directory holds only what its manifest names: a runtime must read no unverified file."""
    for rel in unlisted_files(root, manifest)[:1]:
        raise IntegrityError(
            f"{root} holds {rel}, which its manifest does not name: a runtime could read it unverified "
            "(e.g. ONNX external data). Remove it, or rebuild and re-sign the bundle")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        deepest = max(deepest, level)
        if level > MAX_MANIFEST_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        todo.extend((c, level + 1) for c in children)
    return deepest


def parse_manifest(text: bytes | str, origin: Path | str) -> dict:
    """The JSON document of ``manifest.json``: strict JSON (no NaN or Infinity), at most :data:`MAX_MANIFEST_DEPTH` deep."""
    try:
        manifest = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{origin}: {MANIFEST} is not valid JSON ({exc}); the bundle is corrupt, rebuild it") from exc
    if not isinstance(manifest, dict):
        raise ManifestError(f"{origin}: {MANIFEST} must hold a JSON object, not {type(manifest).__name__}")
    if _depth(manifest) > MAX_MANIFEST_DEPTH:
        raise ManifestError(f"{origin}: {MANIFEST} nests deeper than {MAX_MANIFEST_DEPTH} levels; "
                            "this is not a stagewise manifest")
    if manifest.get("format_version") not in (None, FORMAT_VERSION):
        raise ManifestError(
            f"manifest field format_version: {manifest['format_version']!r} is not supported by this stagewise "
            f"(reads version {FORMAT_VERSION}); upgrade stagewise or rebuild the bundle")
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check that every named file exists inside ``root`` with its recorded sha256."""
    _verify_entries(root, manifest.files())


def _verify_entries(root: Path, entries: Iterable[ArtifactFile]) -> None:
    resolved_root = root.resolve()
    for entry in entries:
        file = (root / entry.path).resolve()
        if resolved_root not in file.parents:
            raise UnsafeArchiveError(f"manifest names {entry.path!r}, which lies outside the bundle")
        if not file.is_file():
            raise IntegrityError(f"bundle file {entry.path} is missing; the bundle is incomplete, rebuild or re-copy it")
        actual = sha256_file(file)
        if actual != entry.sha256:
            raise IntegrityError(
                f"bundle file {entry.path} has sha256 {actual[:12]}…, the manifest records "
                f"{(entry.sha256 or '')[:12]}…: the file was modified or corrupted; rebuild or re-copy the bundle")


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a stagewise bundle: a directory or ``.swb`` whose ``manifest.json`` carries the format tag."""
    try:
        return parse_manifest(raw_manifest(Path(path))[0], path).get("format") == FORMAT
    except BundleError:
        return False


def check_output(out: str | Path, overwrite: bool) -> None:
    """Refuse ``out`` before any work: it exists and may not be replaced, or its folder cannot be written.

    ``overwrite`` replaces only a stagewise bundle (:func:`is_bundle`) whose folder holds nothing
    but what its manifest names; anything else at ``out``, or a bundle folder that also holds
    other files (:func:`unlisted_files`), is refused, and nothing is deleted.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise BundleError(f"{out} already exists; choose another --out or pass overwrite (--force)")
        if out.is_symlink() or not is_bundle(out):
            raise BundleError(f"{out} exists and is not a stagewise bundle; --force replaces only a bundle, so "
                              "nothing was changed. Choose another --out or move it away yourself")
        extra = unlisted_files(out, Manifest.from_dict(parse_manifest(raw_manifest(out)[0], out))) if out.is_dir() else []
        if extra:
            raise BundleError(f"{out} is a bundle folder that also holds {len(extra)} file(s) its manifest does not "
                              f"name ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); --force would delete "
                              "them, so nothing was changed. Move them out of the folder, or choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise BundleError(f"cannot write the bundle under {parent} ({exc.strerror or exc}); "
                          "choose an --out in a writable folder") from exc


def _clean_stale(folder: Path, name: str) -> None:
    """Remove staging copies of ``name`` in ``folder`` left by killed stagewise processes of this user."""
    for stale in folder.glob(f".{name}.*-{_STAGING}*"):
        pid = stale.name.rsplit(f"-{_STAGING}", 1)[-1].split(".")[0]
        if pid.isdigit() and not process_alive(int(pid)) and stale.lstat().st_uid == os.getuid():
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_STAGING = "staging"
BUILD_PREFIX = "stagewise-build-"
"""Prefix of the converters' work folders in the temporary directory."""
STALE_AFTER_S = 24 * 3600
"""A build folder untouched this long belongs to a conversion that was killed."""


def remove_stale_build_dirs(now: float | None = None) -> list[Path]:
    """Remove this user's conversion work folders (``stagewise-build-*`` in the temporary directory) that nothing
    has touched for :data:`STALE_AFTER_S` seconds, left by killed conversions; returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{BUILD_PREFIX}*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.lstat().st_uid != os.getuid():
                continue
            newest = max([p.lstat().st_mtime for p in folder.rglob("*")] + [folder.lstat().st_mtime])
        except OSError:
            continue
        if now - newest > STALE_AFTER_S:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _completed(manifest: Manifest | Mapping[str, Any], files: dict[str, Path]) -> Manifest:
    """The manifest with each file's sha256 and size filled in from ``files``, validated."""
    document = manifest.to_dict() if isinstance(manifest, Manifest) else json.loads(json.dumps(manifest))
    for entry in document_files(document):
        if entry["path"] not in files:
            raise BundleError(f"no content given for bundle file {entry['path']}")
        entry["sha256"] = sha256_file(files[entry["path"]])
        entry["bytes"] = os.path.getsize(files[entry["path"]])
    return Manifest.from_dict(document)


def _manifest_bytes(manifest: Manifest) -> bytes:
    """The bytes of ``manifest.json`` as :func:`write_bundle` writes them (the one place a manifest becomes JSON)."""
    return (json.dumps(manifest.to_dict(), indent=2) + "\n").encode()


def write_bundle(out: str | Path, manifest: Manifest | Mapping[str, Any], files: dict[str, Path],
                 overwrite: bool = False, signature: bytes | None = None) -> Path:
    """Write a bundle atomically: fill in each file's sha256 and size, validate, then publish.

    ``manifest`` is a :class:`Manifest` (its files' sha256 and sizes may be ``None``), or a
    hand-written JSON document of one (its files may leave out ``sha256`` and ``bytes``).

    ``files`` maps each manifest path to the local file holding its content. ``out`` ending in
    ``.swb`` gives the single-file form, anything else a directory. On any error nothing is
    left at ``out``; an existing bundle there is only replaced when ``overwrite`` is set, and
    anything else there is refused (:func:`check_output`). ``signature`` is a ``manifest.sig``
    to keep (valid only if the manifest's bytes are unchanged).
    """
    out = Path(out)
    check_output(out, overwrite)
    manifest = _completed(manifest, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out.parent, out.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=f"-{_STAGING}{os.getpid()}", dir=out.parent))
    packed = staging.with_name(staging.name + ".swb")
    try:
        for rel, src in files.items():
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        (staging / MANIFEST).write_bytes(_manifest_bytes(manifest))
        if signature is not None:
            (staging / SIGNATURE).write_bytes(signature)
        if out.suffix == ".swb":
            _zip_dir(staging, packed)
            _publish(packed, out)
        else:
            _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        packed.unlink(missing_ok=True)
    return out


def _zip_dir(src: Path, dst: Path) -> None:
    """Pack a bundle directory: the manifest (and signature) deflated, model files stored as they are.

    Model weights barely compress (about 8 % for the demo cascade), and inflating them is most
    of what opening a ``.swb`` costs at cold start (measured: 724-760 ms -> 533-584 ms for
    import + load + first answer of the demo cascade).
    """
    with zipfile.ZipFile(dst, "w") as zf:
        for file in sorted(src.rglob("*")):
            if file.is_file():
                small = file.suffix in (".json", ".sig")
                zf.write(file, file.relative_to(src).as_posix(),
                         compress_type=zipfile.ZIP_DEFLATED if small else zipfile.ZIP_STORED)


def _publish(staged: Path, out: Path) -> None:
    """Move ``staged`` to ``out``; an existing ``out`` is swapped out and removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{_STAGING}{os.getpid()}")
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
    return write_bundle(out, bundle.manifest, files, overwrite=overwrite, signature=_read_optional(bundle.root / SIGNATURE))


def update_manifest(path: str | Path, change: Callable[[Manifest, Path], Manifest]) -> Manifest:
    """Rewrite a bundle's manifest atomically with ``change(manifest, root) -> manifest``.

    The bundle's files are verified first. ``change`` gets the bundle's :class:`Manifest` and
    ``root``, the folder holding the bundle's files (the bundle directory itself, or where a
    ``.swb`` is unpacked); it returns the new manifest (built with :func:`dataclasses.replace`). It
    may add files under ``root`` and name them in the manifest with their sha256
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
            manifest = Manifest.from_dict(change(bundle.manifest, root).to_dict())  # validated
            _verify_entries(root, (f for f in manifest.files() if (f.path, f.sha256) not in old_entries))
            if path.is_dir():
                tmp = path / f".{MANIFEST}.part"
                tmp.write_bytes(_manifest_bytes(manifest))
                os.replace(tmp, path / MANIFEST)
            else:
                files = {f.path: root / f.path for f in manifest.files()}
                write_bundle(path, manifest, files, overwrite=True)
        except BaseException:
            if path.is_dir():
                _remove_files(root, _file_tree(root) - before)
            raise
        if path.is_dir():
            named = {f.path for f in manifest.files()}
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


def sign_bundle(path: str | Path, private_key: Any) -> str:
    """Sign a bundle (directory or ``.swb``) in place with an Ed25519 private key; returns the key id.

    The bundle is verified first; the signature covers the exact bytes of its ``manifest.json``
    (which pins every file's sha256) and is written as ``manifest.sig`` (into the ``.swb``, which is
    repacked atomically). Other keys' signatures that are still valid are kept.
    """
    path = Path(path)
    key = signing.load_private_key(private_key)
    bundle = read_bundle(path)
    try:
        text, existing = raw_manifest(path)
        if path.is_dir():
            content = signing.sign(text, key, existing)
            tmp = path / f".{SIGNATURE}.part"
            tmp.write_bytes(content)
            os.replace(tmp, path / SIGNATURE)
        else:
            files = {f.path: bundle.root / f.path for f in bundle.manifest.files()}
            completed = _completed(bundle.manifest, files)
            content = signing.sign(_manifest_bytes(completed), key, existing)
            write_bundle(path, completed, files, overwrite=True, signature=content)
    finally:
        bundle.close()
    return signing.key_id(key.public_key())


def verify_bundle(path: str | Path, trusted_keys: Sequence[Any]) -> str:
    """Check a bundle's signature and files against ``trusted_keys``; returns the id of the key that signed."""
    path = Path(path)
    bundle = read_bundle(path, trusted_keys=trusted_keys)
    try:
        return signing.check_signature(*raw_manifest(path), trusted_keys, path)
    finally:
        bundle.close()
