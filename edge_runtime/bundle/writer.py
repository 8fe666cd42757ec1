"""Writing bundles: the trainer's side of the contract in ``format.py`` (and the benchmarks' synthetic bundles).

``stage_arrays`` writes the item matrices, ids, popularity and attributes under their ``format`` names into a
staging directory; the caller adds the ONNX encoders (``format.ENCODER_FP32`` / ``ENCODER_INT8``); ``write_bundle``
hashes every file, writes the manifest and moves the directory into place atomically.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BundleError
from ..scoring.quantize import quantize_rows
from .format import (ATTR_CODES, ATTR_EMB, ATTR_INDPTR, ATTR_NAMES, ID_MEAN, FORMAT_VERSION, ITEM_IDS, ITEMS_F32, ITEMS_I8,
                     ITEMS_SCALE, MANIFEST, POPULARITY, check_member_name, sha256_file)


def new_model_version(now: _dt.datetime | None = None, salt: str = "") -> str:
    """A version string that sorts by creation time: ``YYYYMMDD.HHMMSS-<8 hex>``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    tag = hashlib.sha256(f"{now.isoformat()}{salt}".encode()).hexdigest()[:8]
    return now.strftime("%Y%m%d.%H%M%S") + "-" + tag



def attribute_csr(item_attributes: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-item attribute lists -> (indptr int64 [N + 1], codes int32 [nnz] into names, names: each distinct value
    once, in first-seen order). The one CSR builder: the bundle's attribute files and the trainer's side
    information both come from it."""
    indptr = np.zeros(len(item_attributes) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in item_attributes], out=indptr[1:])
    names: dict[str, int] = {}
    codes = np.fromiter((names.setdefault(v, len(names)) for a in item_attributes for v in a), dtype=np.int32,
                        count=int(indptr[-1]))
    return indptr, codes, list(names)


def stage_arrays(staged: str | os.PathLike, items: np.ndarray, item_ids: Sequence[str], popularity: np.ndarray,
                 item_attributes: Sequence[Sequence[str]] | None = None,
                 compose: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write a bundle's arrays into ``staged``: float32 items [N, d], their per-row int8 quantization
    (``scoring.quantize_rows``), ids (N str), popularity float32 [N] and, when given, the attribute CSR and
    ``compose`` = (attribute-value embeddings float32 [V, d] in ``attribute_csr``'s name order, mean id embedding
    float32 [d]), from which a node composes new items' embeddings (``serving/compose.py``).

    Returns:
        (int8 items [N, d], float32 scales [N]) as written.
    Raises:
        BundleError: the shapes disagree.
    """
    staged = Path(staged)
    items = np.ascontiguousarray(items, dtype=np.float32)
    popularity = np.asarray(popularity, dtype=np.float32)
    n = len(item_ids)
    if items.ndim != 2 or items.shape[0] != n or popularity.shape != (n,) \
            or (item_attributes is not None and len(item_attributes) != n):
        raise BundleError(f"bundle arrays disagree: items {items.shape}, {n} ids, popularity {popularity.shape}")
    q, scales = quantize_rows(items)
    np.save(staged / ITEMS_F32, items, allow_pickle=False)
    np.save(staged / ITEMS_I8, q, allow_pickle=False)
    np.save(staged / ITEMS_SCALE, scales, allow_pickle=False)
    np.save(staged / POPULARITY, popularity, allow_pickle=False)
    with open(staged / ITEM_IDS, "w", encoding="utf-8") as f:
        json.dump([str(i) for i in item_ids], f)
    if item_attributes is not None:
        indptr, codes, names = attribute_csr(item_attributes)
        np.save(staged / ATTR_INDPTR, indptr, allow_pickle=False)
        np.save(staged / ATTR_CODES, codes, allow_pickle=False)
        with open(staged / ATTR_NAMES, "w", encoding="utf-8") as f:
            json.dump(names, f)
        if compose is not None:
            attr_emb, id_mean = (np.ascontiguousarray(a, dtype=np.float32) for a in compose)
            if attr_emb.shape != (len(names), items.shape[1]) or id_mean.shape != (items.shape[1],):
                raise BundleError(f"compose arrays {attr_emb.shape} / {id_mean.shape} do not fit {len(names)} "
                                  f"attribute values of d = {items.shape[1]}")
            np.save(staged / ATTR_EMB, attr_emb, allow_pickle=False)
            np.save(staged / ID_MEAN, id_mean, allow_pickle=False)
    return q, scales


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
