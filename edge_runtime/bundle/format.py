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
    item_attr_emb.npy        (optional, with the attribute files) float32 [V, d]: the model's embedding of each
                             attribute value (row j = item_attr_names[j]), for composing new items' embeddings
    item_id_mean.npy         (optional, with item_attr_emb.npy) float32 [d]: the mean id-embedding row of the items
                             (``serving/compose.py`` gives the rule: a new item = id mean + mean of its attribute
                             values' embeddings; without a known attribute, the mean item embedding)

Every file is listed in the manifest with its sha256; ``load_manifest`` refuses a bundle whose files are missing,
altered or named outside the bundle directory, naming the file. Arrays are ``.npy`` read with
``allow_pickle=False``; nothing in a bundle is ever unpickled. This file is the contract between the trainer
(``writer.py`` writes it) and the node (``read_arrays`` reads it); the signature beside the manifest is
``signing.py``'s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np

from .. import const
from ..errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"             # written by signing.py, beside the manifest (not listed in it)
ENCODER_FP32 = "encoder.onnx"
ENCODER_INT8 = "encoder.int8.onnx"
ENCODER_NATIVE = "encoder.int8.native.npz"   # optional: the int8 encoder's weights for the native encoder
ITEMS_F32 = "items.f32.npy"
ITEMS_I8 = "items.i8.npy"
ITEMS_SCALE = "items.scale.npy"
ITEM_IDS = "item_ids.json"
POPULARITY = "popularity.npy"
ATTR_INDPTR = "item_attr_indptr.npy"
ATTR_CODES = "item_attr_codes.npy"
ATTR_NAMES = "item_attr_names.json"
ATTR_EMB = "item_attr_emb.npy"
ID_MEAN = "item_id_mean.npy"
ATTR_VALUES_V0 = "item_attr_values.json"   # older bundles: one string per (item, attribute) pair
REQUIRED_FILES = (ENCODER_INT8, ITEMS_F32, ITEMS_I8, ITEMS_SCALE, ITEM_IDS, POPULARITY)
PRECISIONS = ("int8", "fp32")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    buf = bytearray(const.HASH_BUFFER_BYTES)   # one reused buffer: hashing a bundle allocates nothing per block
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


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
MAX_VERSION_CHARS = const.MAX_VERSION_CHARS


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


@dataclasses.dataclass
class BundleArrays:
    """What a node reads from a verified bundle for one precision.

    Attributes:
        manifest: the parsed manifest.
        encoder_path: the ONNX encoder to load for this precision.
        native_encoder_path: the same encoder's weights for the native encoder (``ENCODER_NATIVE``, int8 only),
            or None when the bundle has none (older bundles, other models).
        items: int8 [N, d] (with ``scales`` float32 [N]) or float32 [N, d] (``scales`` None), C-contiguous.
        item_ids: external id by row (str, N). popularity: float32 [N].
        attr_indptr / attr_codes / attr_names: the item-attribute CSR (int64 [N + 1], int64 [nnz] codes into
            attr_names), or None / empty without attributes.
        attr_emb / id_mean: float32 [len(attr_names), d] and [d], the parts new items' embeddings are composed of
            (``serving/compose.py``), or None when the bundle has none.
    """

    manifest: dict
    encoder_path: Path
    items: np.ndarray
    scales: np.ndarray | None
    item_ids: list[str]
    popularity: np.ndarray
    attr_indptr: np.ndarray | None
    attr_codes: np.ndarray
    attr_names: list[str]
    attr_emb: np.ndarray | None = None
    id_mean: np.ndarray | None = None
    native_encoder_path: Path | None = None


def read_arrays(bundle_dir: str | os.PathLike, precision: str = "int8", verify: bool = True) -> BundleArrays:
    """Read a bundle for serving at ``precision``: manifest (checked as ``load_manifest`` does), item matrix,
    ids, popularity, attributes; shapes checked against each other.

    Raises:
        ValueError: ``precision`` is not 'int8' or 'fp32'.
        BundleError: unreadable or inconsistent files (named).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'int8' or 'fp32', got {precision!r}")
    root = Path(bundle_dir)
    manifest = load_manifest(root, verify=verify)
    load = lambda name: np.load(root / name, allow_pickle=False)  # noqa: E731
    try:
        if precision == "int8":
            items, scales = load(ITEMS_I8), load(ITEMS_SCALE).astype(np.float32)
            encoder = root / ENCODER_INT8
        else:
            items, scales = load(ITEMS_F32).astype(np.float32), None
            encoder = root / (ENCODER_FP32 if (root / ENCODER_FP32).is_file() else ENCODER_INT8)
        with open(root / ITEM_IDS, "r", encoding="utf-8") as f:
            item_ids = [str(x) for x in json.load(f)]
        popularity = load(POPULARITY).astype(np.float32)
        attr_indptr = None
        attr_codes, attr_names = np.zeros(0, dtype=np.int64), []
        if (root / ATTR_INDPTR).is_file():
            attr_indptr = load(ATTR_INDPTR)
            if (root / ATTR_CODES).is_file():
                attr_codes = load(ATTR_CODES).astype(np.int64)
                with open(root / ATTR_NAMES, "r", encoding="utf-8") as f:
                    attr_names = [str(v) for v in json.load(f)]
            else:   # older bundles: one string per (item, attribute) pair
                with open(root / ATTR_VALUES_V0, "r", encoding="utf-8") as f:
                    codes: dict[str, int] = {}
                    attr_codes = np.fromiter((codes.setdefault(str(v), len(codes)) for v in json.load(f)),
                                             dtype=np.int64)
                    attr_names = list(codes)
        attr_emb = id_mean = None
        if (root / ATTR_EMB).is_file() and (root / ID_MEAN).is_file():
            attr_emb, id_mean = load(ATTR_EMB).astype(np.float32), load(ID_MEAN).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{root}: cannot read bundle arrays: {exc}") from None
    n = len(item_ids)
    if items.ndim != 2 or items.shape[0] != n or popularity.shape != (n,) \
            or (scales is not None and scales.shape != (n,)):
        raise BundleError(f"{root}: item matrix has {items.shape[0] if items.ndim else 0} rows, popularity "
                          f"{popularity.shape[0] if popularity.ndim else 0}, item_ids {n}: they must agree")
    if attr_indptr is not None:
        if len(attr_codes) != int(attr_indptr[-1]) or len(attr_indptr) != n + 1 or (
                len(attr_codes) and not 0 <= int(attr_codes.min()) <= int(attr_codes.max()) < len(attr_names)):
            raise BundleError(f"{root}: item attribute table is inconsistent ({len(attr_codes)} codes over "
                              f"{len(attr_names)} names, indptr ending at {int(attr_indptr[-1])} over "
                              f"{len(attr_indptr) - 1} items)")
    if attr_emb is not None:
        d = items.shape[1]
        if attr_emb.shape != (len(attr_names), d) or id_mean.shape != (d,):
            raise BundleError(f"{root}: {ATTR_EMB} is {attr_emb.shape} and {ID_MEAN} {id_mean.shape}; expected "
                              f"({len(attr_names)}, {d}) and ({d},)")
    # listed in the manifest (so verified with the rest), int8 only: the file is the int8 encoder's weights
    native = root / ENCODER_NATIVE if precision == "int8" and ENCODER_NATIVE in manifest.get("files", {}) else None
    return BundleArrays(manifest, encoder, np.ascontiguousarray(items), scales, item_ids, popularity, attr_indptr,
                        attr_codes, attr_names, attr_emb, id_mean, native)
