"""Model bundles: a versioned directory the trainer writes and the daemon loads.

Layout (``FORMAT_VERSION`` 1)::

    manifest.json            format_version, model_version, created_at, training config, dataset fingerprint,
                             metrics, model facts (num_items, dim, max_len) and {"files": {name: {sha256, bytes}}}
    encoder.onnx             fp32 session encoder: item_seq int64 [B, L] (left-padded, 0 = pad) -> user_vec f32 [B, d]
    encoder.int8.onnx        the same encoder, int8 dynamic quantization (ONNX Runtime)
    items.f32.npy            float32 [N, d] item embeddings (row r = item_ids[r], model token r + 1)
    items.i8.npy             int8 [N, d] item embeddings, row r dequantizes to items.i8[r] * items.scale[r]
    items.scale.npy          float32 [N] per-row scales
    item_ids.json            ["<item id>", ...] external item ids by row
    popularity.npy           float32 [N] training interaction counts, for shoppers with no known history
    item_attr_indptr.npy     (optional) int64 [N + 1] CSR offsets of each item's attribute list
    item_attr_codes.npy      (optional) int32 [nnz] CSR values: index into item_attr_names.json
    item_attr_names.json     (optional) ["<attribute>", ...] each distinct attribute value once
                             (a load creates one string per distinct value, not one per item-attribute pair;
                             bundles with the older item_attr_values.json [nnz strings] still load)

Every file is listed in the manifest with its sha256; ``load_manifest`` refuses a bundle whose files are missing,
altered or named outside the bundle directory, naming the file. Arrays are ``.npy`` read with
``allow_pickle=False``; nothing in a bundle is ever unpickled.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FILES = ("encoder.int8.onnx", "items.f32.npy", "items.i8.npy", "items.scale.npy", "item_ids.json",
                  "popularity.npy")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    buf = bytearray(1 << 18)   # one reused 256 KiB buffer: hashing a bundle allocates nothing per block
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def new_model_version(now: _dt.datetime | None = None, salt: str = "") -> str:
    """A version string that sorts by creation time: ``YYYYMMDD.HHMMSS-<8 hex>``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    tag = hashlib.sha256(f"{now.isoformat()}{salt}".encode()).hexdigest()[:8]
    return now.strftime("%Y%m%d.%H%M%S") + "-" + tag


def check_member_name(name: str) -> str:
    """Validate a bundle file name: relative, no ``..``, no backslash, no empty parts.

    Raises:
        BundleError: the name could escape the bundle directory.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundleError(f"bundle file name {name!r} is not allowed")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", "", ".") for part in p.parts):
        raise BundleError(f"bundle file name {name!r} is not allowed (absolute or '..')")
    return name


_VERSION_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
MAX_VERSION_CHARS = 128


def check_version_name(version) -> str:
    """Validate a model version used as a directory name (registry, state directory): 1-128 characters of
    ``[A-Za-z0-9._+-]``, starting with a letter or digit (no ``/``, no ``..`` component, no control characters).

    Raises:
        BundleError: anything else (the name is shown escaped).
    """
    if not isinstance(version, str) or not 0 < len(version) <= MAX_VERSION_CHARS \
            or not set(version) <= _VERSION_OK or not version[0].isalnum():
        raise BundleError(f"model version {str(version)[:80]!r} is not allowed: use 1-{MAX_VERSION_CHARS} characters "
                          "of A-Z a-z 0-9 . _ + -, starting with a letter or digit")
    return version


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Refuse an output directory that exists, is not empty and is not a bundle (checked before training, so a
    mistyped --out costs nothing).

    Raises:
        BundleError: ``out_dir`` is a file, or a non-empty directory without a manifest.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())):
        raise BundleError(f"{out_dir} exists and is not a bundle; choose an empty or new --out directory")
    return out_dir


def write_bundle(out_dir: str | os.PathLike, staged: str | os.PathLike, manifest: dict) -> Path:
    """Finish a bundle: hash every file in ``staged``, write ``manifest.json`` and move it to ``out_dir``.

    ``out_dir`` is replaced when it already holds a bundle (a ``manifest.json``); an existing non-empty directory
    that is not a bundle is refused.

    Raises:
        BundleError: ``out_dir`` exists and is not a bundle.
    """
    out_dir, staged = Path(out_dir), Path(staged)
    files = {}
    for p in sorted(staged.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(staged).as_posix()
            files[check_member_name(rel)] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=files)
    with open(staged / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(staged, 0o755)  # mkdtemp made it 0700; a bundle is read by the daemon's (other) user
    if out_dir.exists():
        check_out_dir(out_dir)
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=out_dir.parent))
        os.replace(out_dir, old / "b")
        os.replace(staged, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, out_dir)
    return out_dir


def load_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> dict:
    """Read and check ``manifest.json``.

    With ``verify``, every listed file must exist inside the bundle (no symlink escaping it), have the listed size
    and sha256; the required files must be listed.

    Raises:
        BundleError: unreadable manifest, unsupported format, missing / altered / unsafe file (named).
    """
    root = Path(bundle_dir)
    try:
        with open(root / MANIFEST, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise BundleError(f"{root}: no {MANIFEST}; not a bundle directory") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{root / MANIFEST}: unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BundleError(f"{root}: bundle format_version {got!r} is not supported (expected {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{root / MANIFEST}: 'files' must map file names to {{sha256, bytes}}")
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{root}: manifest does not list required file {name!r}")
    if verify:
        real_root = root.resolve()
        for name, meta in files.items():
            check_member_name(name)
            path = root / name
            try:
                real = path.resolve(strict=True)
            except (FileNotFoundError, RuntimeError):
                raise BundleError(f"{root}: file {name!r} listed in the manifest is missing") from None
            if real_root not in real.parents:
                raise BundleError(f"{root}: file {name!r} links outside the bundle")
            if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
                raise BundleError(f"{root}: manifest entry for {name!r} has no sha256")
            if meta.get("bytes") is not None and (not isinstance(meta["bytes"], int) or isinstance(meta["bytes"], bool)):
                raise BundleError(f"{root}: manifest entry for {name!r}: 'bytes' must be an integer, got "
                                  f"{type(meta['bytes']).__name__}")
            if meta.get("bytes") is not None and real.stat().st_size != meta["bytes"]:
                raise BundleError(f"{root}: file {name!r} has {real.stat().st_size} bytes, manifest says "
                                  f"{meta['bytes']}: checksum mismatch, refusing the bundle")
            if sha256_file(real) != meta["sha256"]:
                raise BundleError(f"{root}: file {name!r} does not match its sha256 in the manifest: "
                                  f"checksum mismatch, refusing the bundle")
    return manifest
