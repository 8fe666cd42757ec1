"""Ed25519 signatures on model bundles (the ``cryptography`` library; RFC 8032).

A bundle is signed by signing the exact bytes of its ``manifest.json``; the manifest lists every file with its
sha256 and size, so one 64-byte signature covers the whole bundle. The signature lives beside the manifest in
``manifest.sig`` (JSON)::

    {"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<128 hex>"}

``key_id`` is the first 16 hex digits of the sha256 of the raw 32-byte public key; it only picks the key to try,
the signature decides. Keys on disk: the private key as PKCS#8 PEM (mode 0600), the public key as
SubjectPublicKeyInfo PEM, both written by ``edgerec keygen``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import SignatureError
from .format import MANIFEST, SIGNATURE

SIGNATURE_FILE = SIGNATURE
ALGORITHM = "ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    """16 hex digits naming a public key: sha256 of its raw 32 bytes, truncated."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new key pair: ``<prefix>.key`` (private, PKCS#8 PEM, mode 0600) and ``<prefix>.pub`` (public PEM).

    Raises:
        FileExistsError: either file exists (a key is never overwritten).
    """
    priv_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Read a PKCS#8 PEM Ed25519 private key.

    Raises:
        SignatureError: unreadable, encrypted or not Ed25519.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: cannot read the signing key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_keys(paths) -> dict[str, Ed25519PublicKey]:
    """Trusted keys: PEM files -> {key_id: key}.

    Raises:
        SignatureError: a file is unreadable or not an Ed25519 public key (named).
    """
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise SignatureError(f"{path}: cannot read the trusted key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{path}: not an Ed25519 public key")
        keys[key_id(key)] = key
    return keys


def sign_bytes(manifest_bytes: bytes, key: Ed25519PrivateKey) -> dict:
    """The ``manifest.sig`` record for these manifest bytes."""
    return {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()), "signature": key.sign(manifest_bytes).hex()}


def sign_bundle(bundle_dir: str | os.PathLike, key: Ed25519PrivateKey) -> dict:
    """Sign ``bundle_dir/manifest.json`` and write ``manifest.sig``; returns the record."""
    root = Path(bundle_dir)
    record = sign_bytes((root / MANIFEST).read_bytes(), key)
    tmp = root / (SIGNATURE_FILE + ".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(tmp, root / SIGNATURE_FILE)
    return record


def parse_signature(raw: bytes | str | dict) -> dict:
    """A ``manifest.sig`` record from bytes / str / dict, shape-checked.

    Raises:
        SignatureError: malformed record.
    """
    try:
        rec = raw if isinstance(raw, dict) else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureError(f"signature record is not JSON: {exc}") from None
    if not isinstance(rec, dict) or rec.get("algorithm") != ALGORITHM or not isinstance(rec.get("key_id"), str) \
            or not isinstance(rec.get("signature"), str):
        raise SignatureError("signature record must be {algorithm: 'ed25519', key_id: str, signature: hex str}")
    return rec


def verify_bytes(manifest_bytes: bytes, record: bytes | str | dict, trusted: dict[str, Ed25519PublicKey]) -> str:
    """Check a signature on manifest bytes against the trusted keys; returns the key id that verified.

    Raises:
        SignatureError: malformed record, a key that is not trusted, or a signature that does not verify.
    """
    rec = parse_signature(record)
    key = trusted.get(rec["key_id"])
    if key is None:
        raise SignatureError(f"bundle signed by key {rec['key_id'][:16]!r}, which is not a trusted key "
                             f"(trusted: {sorted(trusted) or 'none'})")
    try:
        key.verify(bytes.fromhex(rec["signature"]), manifest_bytes)
    except (InvalidSignature, ValueError):
        raise SignatureError(f"manifest signature does not verify with key {rec['key_id']}: the manifest was "
                             "altered or signed by someone else") from None
    return rec["key_id"]


def verify_bundle(bundle_dir: str | os.PathLike, trusted: dict[str, Ed25519PublicKey]) -> str:
    """Verify ``manifest.sig`` over ``manifest.json`` in a bundle directory (the file checksums are checked by
    ``bundle.load_manifest``). Returns the key id.

    Raises:
        SignatureError: no signature file, untrusted key, bad signature.
    """
    root = Path(bundle_dir)
    try:
        record = (root / SIGNATURE_FILE).read_bytes()
        manifest = (root / MANIFEST).read_bytes()
    except FileNotFoundError as exc:
        raise SignatureError(f"{root}: unsigned bundle (no {Path(exc.filename).name})") from None
    return verify_bytes(manifest, record, trusted)
