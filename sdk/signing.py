"""Signed bundles: Ed25519 signatures over the exact bytes of ``manifest.json``.

The manifest pins every file of the bundle by sha256, so a signature over its bytes covers the
weights, thresholds and labels too. The signature lives in ``manifest.sig`` beside
``manifest.json`` (inside the ``.swb`` for the single-file form)::

    {"format": "stagewise-signature", "algorithm": "ed25519",
     "signatures": [{"key_id": "<first 16 hex of sha256(raw public key)>", "signature": "<base64>"}]}

A bundle loaded without trusted keys ignores the signature; with trusted keys it must carry a
valid signature by one of them (:func:`check_signature`). Keys are PEM files (PKCS#8 private,
SubjectPublicKeyInfo public), as written by :func:`generate_key`. Uses ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .errors import SignatureError
from .extras import require

SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = "stagewise-signature"
MAX_SIGNATURE_BYTES = 64 << 10


def _ed25519() -> Any:
    return require("cryptography.hazmat.primitives.asymmetric.ed25519", "signing", "signed bundles")


def _serialization() -> Any:
    return require("cryptography.hazmat.primitives.serialization", "signing", "signed bundles")


def key_id(public_key: Any) -> str:
    """The short id of an Ed25519 public key: the first 16 hex digits of the sha256 of its raw bytes."""
    s = _serialization()
    raw = public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new Ed25519 key pair as PEM files (the private one readable by its owner only); returns the key id."""
    s = _serialization()
    private = _ed25519().Ed25519PrivateKey.generate()
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} already exists; choose another name (keys are never overwritten)")
    pem = private.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(private.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return key_id(private.public_key())


def _pem(key: str | os.PathLike | bytes, what: str) -> bytes:
    if isinstance(key, bytes):
        return key
    path = Path(key)
    if not path.is_file():
        raise SignatureError(f"{what} {path} not found")
    return path.read_bytes()


def load_private_key(key: str | os.PathLike | bytes) -> Any:
    """An Ed25519 private key from a PEM file or PEM bytes."""
    try:
        private = _serialization().load_pem_private_key(_pem(key, "private key"), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read the private key ({exc}); give the PEM file `stagewise keygen` wrote") from exc
    if not isinstance(private, _ed25519().Ed25519PrivateKey):
        raise SignatureError("the private key is not an Ed25519 key; create one with `stagewise keygen`")
    return private


def load_public_key(key: Any) -> Any:
    """An Ed25519 public key from a PEM file, PEM bytes or a key object."""
    ed = _ed25519()
    if isinstance(key, ed.Ed25519PublicKey):
        return key
    try:
        public = _serialization().load_pem_public_key(_pem(key, "public key"))
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read the public key {key!r} ({exc}); give the .pub PEM file of "
                             "`stagewise keygen`") from exc
    if not isinstance(public, ed.Ed25519PublicKey):
        raise SignatureError(f"the public key {key!r} is not an Ed25519 key")
    return public


def sign(manifest_bytes: bytes, private_key: Any, existing: bytes | None = None) -> bytes:
    """The ``manifest.sig`` content with a signature of ``manifest_bytes`` by ``private_key``.

    Signatures in ``existing`` by other keys are kept only if they are valid for these bytes.
    """
    public = private_key.public_key()
    entries = [e for e in _entries(existing) if e["key_id"] != key_id(public)] if existing else []
    entries.append({"key_id": key_id(public),
                    "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii")})
    return (json.dumps({"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "signatures": entries}, indent=2)
            + "\n").encode()


def _entries(signature: bytes) -> list[dict]:
    try:
        document = json.loads(signature)
        entries = document["signatures"]
        if document.get("format") != SIGNATURE_FORMAT or document.get("algorithm") != "ed25519" or not all(
                isinstance(e["key_id"], str) and isinstance(e["signature"], str) for e in entries):
            raise ValueError("not a stagewise Ed25519 signature file")
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise SignatureError(f"{SIGNATURE} is not a valid signature file ({exc}); re-sign the bundle") from exc
    return entries


def check_signature(manifest_bytes: bytes, signature: bytes | None, trusted_keys: Sequence[Any],
                    origin: Path | str) -> str:
    """Raise :class:`SignatureError` unless ``signature`` holds a valid signature of ``manifest_bytes``
    by one of ``trusted_keys``; returns the id of the key that signed."""
    keys = [load_public_key(k) for k in trusted_keys]
    if not keys:
        raise SignatureError("trusted_keys is empty: give at least one public key, or None to skip signature checks")
    if signature is None:
        raise SignatureError(f"{origin} is not signed (no {SIGNATURE}); only bundles signed by a trusted key are "
                             "accepted: sign it with `stagewise sign BUNDLE --key KEY`")
    by_id = {key_id(k): k for k in keys}
    exc_type = require("cryptography.exceptions", "signing", "signed bundles").InvalidSignature
    for entry in _entries(signature):
        key = by_id.get(entry["key_id"])
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(entry["signature"], validate=True), manifest_bytes)
            return entry["key_id"]
        except (exc_type, ValueError) as exc:
            raise SignatureError(
                f"{origin}: the signature by key {entry['key_id']} does not match the manifest: the bundle was "
                "changed after it was signed; do not use it, get the original from its publisher") from exc
    raise SignatureError(f"{origin} is signed by key(s) {', '.join(e['key_id'] for e in _entries(signature))}, none "
                         f"of them trusted (trusted: {', '.join(by_id)})")

