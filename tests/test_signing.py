"""Signed bundles: a device given trusted keys accepts only bundles their owner signed, unchanged to the byte."""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

import stagewise
from stagewise.bundle import pack, read_bundle, sign_bundle, update_manifest, verify_bundle
from stagewise.cli import main
from stagewise.errors import IntegrityError, SignatureError
from stagewise.signing import generate_key
from toy_bundle import toy_bundle, toy_image

pytest.importorskip("cryptography")
pytest.importorskip("onnxruntime")


@pytest.fixture()
def keys(tmp_path) -> tuple[Path, Path]:
    generate_key(tmp_path / "owner.key", tmp_path / "owner.key.pub")
    return tmp_path / "owner.key", tmp_path / "owner.key.pub"


@pytest.fixture(params=["dir", ".swb"])
def signed(request, tmp_path, keys) -> Path:
    out = toy_bundle(tmp_path / ("bundle" if request.param == "dir" else "bundle.swb"), tmp_path / "models")
    sign_bundle(out, keys[0])
    return out


def _load(path, **kw):
    return stagewise.load(path, runtime="onnxruntime", warmup=False, **kw)


def test_signed_bundle_loads_with_its_key_and_unsigned_without_keys(tmp_path, signed, keys):
    with _load(signed, trusted_keys=[keys[1]]) as cascade:
        assert cascade.predict(toy_image()).name == "green"
    assert verify_bundle(signed, [keys[1]])
    unsigned = toy_bundle(tmp_path / "plain.swb", tmp_path / "m2")
    _load(unsigned).close()
    with pytest.raises(SignatureError, match="not signed"):
        _load(unsigned, trusted_keys=[keys[1]])
    generate_key(tmp_path / "other.key", tmp_path / "other.key.pub")
    with pytest.raises(SignatureError, match="none of them trusted"):
        _load(signed, trusted_keys=[tmp_path / "other.key.pub"])


def _members(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write(path: Path, members: dict[str, bytes]) -> None:
    if path.is_dir():
        for name, data in members.items():
            (path / name).write_bytes(data)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)


def test_any_changed_byte_of_manifest_or_artifacts_is_refused(signed, keys):
    original = _members(signed)
    names = ["manifest.json", "onnx/s0.onnx", "onnx/s2.onnx"]
    for name in names:
        data = original[name]
        for position in sorted({0, len(data) // 3, len(data) // 2, len(data) - 2}):
            changed = bytearray(data)
            changed[position] ^= 0x01
            _write(signed, {**original, name: bytes(changed)})
            with pytest.raises(stagewise.StagewiseError) as error:
                _load(signed, trusted_keys=[keys[1]])
            assert isinstance(error.value, (SignatureError, IntegrityError, stagewise.ManifestError)), error.value
    _write(signed, original)
    _load(signed, trusted_keys=[keys[1]]).close()


def test_recomputed_hashes_do_not_fool_the_signature(signed, keys):
    def relabel(manifest, root):
        return replace(manifest, task=replace(manifest.task, classes=("blue", "green", "red")))

    update_manifest(signed, relabel)  # a valid, re-hashed bundle, but not the one that was signed
    _load(signed).close()
    with pytest.raises(SignatureError, match="changed after it was signed|not signed"):
        _load(signed, trusted_keys=[keys[1]])


def test_signed_directory_may_hold_no_unlisted_file(tmp_path, keys):
    out = toy_bundle(tmp_path / "bundle", tmp_path / "models")
    sign_bundle(out, keys[0])
    (out / "onnx" / "weights.data").write_bytes(b"external data nobody verified")
    _load(out).close()
    with pytest.raises(IntegrityError, match="weights.data"):
        _load(out, trusted_keys=[keys[1]])


def test_pack_keeps_a_valid_signature(tmp_path, keys):
    out = toy_bundle(tmp_path / "bundle", tmp_path / "models")
    sign_bundle(out, keys[0])
    packed = pack(out, tmp_path / "packed.swb")
    read_bundle(packed, trusted_keys=[keys[1]]).close()


def test_cli_keygen_sign_verify(tmp_path, capsys):
    out = toy_bundle(tmp_path / "bundle.swb", tmp_path / "models")
    main(["keygen", "--out", str(tmp_path / "k")])
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    main(["sign", str(out), "--key", str(tmp_path / "k")])
    main(["verify", str(out), "--trusted-key", str(tmp_path / "k.pub")])
    assert "every file verified" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["keygen", "--out", str(tmp_path / "k")])
    assert done.value.code == 2
    generate_key(tmp_path / "x", tmp_path / "x.pub")
    with pytest.raises(SystemExit) as done:
        main(["verify", str(out), "--trusted-key", str(tmp_path / "x.pub")])
    assert done.value.code == 2
    assert "none of them trusted" in capsys.readouterr().err
