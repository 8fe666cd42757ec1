"""Exact maximum-inner-product (MIPS) top-k over the whole item catalog.

This is the daemon's scoring interface. The implementation here is NumPy (a BLAS mat-vec plus ``argpartition``);
the native SIMD kernel plugs in behind the same ``topk`` signature.

Semantics every implementation keeps:
* scores are ``items @ q`` (float32 items) or ``(items_int8 @ q) * item_scales`` (int8 items with per-row float32
  scales: row r dequantizes to ``items[r] * item_scales[r]``), float32, in the same scale for both;
* filters act inside the scan: an item whose index is in ``exclude`` or whose bit in ``allow`` is 0 never enters
  the result, and NaN scores never do either; if fewer than k items pass, fewer come back (the caller sees it from
  the returned length);
* ties are broken by the lower item index, so every path returns the same ids.
"""
from __future__ import annotations

import numpy as np

IMPLEMENTATION = "numpy"


def _check_items(items: np.ndarray, item_scales: np.ndarray | None) -> None:
    if not isinstance(items, np.ndarray) or items.ndim != 2:
        raise ValueError(f"items must be a 2-D array [N, d], got {getattr(items, 'shape', type(items))}")
    if items.dtype == np.int8:
        if item_scales is None:
            raise ValueError("int8 items need item_scales (float32 [N], one scale per row)")
        if item_scales.shape != (items.shape[0],):
            raise ValueError(f"item_scales must have shape [{items.shape[0]}], got {item_scales.shape}")
    elif items.dtype != np.float32:
        raise ValueError(f"items must be float32 or int8, got {items.dtype}; convert with .astype(np.float32)")


def dense_scores(queries: np.ndarray, items: np.ndarray, item_scales: np.ndarray | None = None) -> np.ndarray:
    """All scores: float32 [B, N] for queries float32 [B, d] (or [N] for a single query of shape [d]).

    Raises:
        ValueError: wrong dtype or shape (the message says how to fix it).
    """
    _check_items(items, item_scales)
    q = np.asarray(queries, dtype=np.float32)
    if q.shape[-1] != items.shape[1]:
        raise ValueError(f"query dimension {q.shape[-1]} does not match items dimension {items.shape[1]}")
    if items.dtype == np.int8:
        scores = (q @ items.T.astype(np.float32)) * item_scales
    else:
        scores = q @ items.T
    return scores.astype(np.float32, copy=False)


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """bool [N] -> packed bitset uint8 [ceil(N / 8)], bit i of byte i // 8 (little bit order) = item i."""
    return np.packbits(np.asarray(mask, dtype=bool), bitorder="little")


def unpack_mask(bits: np.ndarray, n: int) -> np.ndarray:
    """Packed bitset uint8 (see ``pack_mask``) -> bool [n]."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint8 or bits.ndim != 1 or bits.shape[0] * 8 < n:
        raise ValueError(f"allow must be a packed uint8 bitset of at least {(n + 7) // 8} bytes "
                         f"(use edge_runtime.scoring.pack_mask), got {bits.dtype} {bits.shape}")
    return np.unpackbits(bits, count=n, bitorder="little").view(bool)


def _topk_row(scores: np.ndarray, k: int, excluded: np.ndarray | None, allowed: np.ndarray | None):
    valid = ~np.isnan(scores)
    if allowed is not None:
        valid &= allowed
    if excluded is not None and len(excluded):
        valid[excluded] = False
    cand = np.flatnonzero(valid)
    s = scores[cand]
    if len(cand) > k:
        part = np.argpartition(-s, k - 1)[:k]
        thr = s[part].min()
        above = s > thr
        # Everything strictly above the k-th score, then the lowest-index items tied at it.
        tied = np.flatnonzero(s == thr)[: k - int(above.sum())]
        keep = np.concatenate([np.flatnonzero(above), tied])
        cand, s = cand[keep], s[keep]
    order = np.lexsort((cand, -s))
    return cand[order].astype(np.int64), s[order].astype(np.float32)


def topk(queries: np.ndarray, items: np.ndarray, k: int, *, item_scales: np.ndarray | None = None,
         exclude: np.ndarray | None = None, allow: np.ndarray | None = None, num_threads: int | None = None):
    """Exact top-k by inner product.

    Args:
        queries: float32 [d] or [B, d].
        items: float32 [N, d], or int8 [N, d] with ``item_scales``.
        k: number of results, >= 1 (k > N returns at most N).
        item_scales: float32 [N], per-row scales of int8 items.
        exclude: int64 item indices that must not be returned (the shopper's seen items), shared by all queries.
        allow: packed uint8 bitset over item indices (see ``pack_mask``); only items whose bit is 1 can be returned.
        num_threads: accepted for interface compatibility; NumPy's BLAS decides its own threads.

    Returns:
        (ids, scores): int64 and float32, shape [k'] for a [d] query or [B, k'] for a batch, sorted by score
        descending then index ascending; k' <= k when fewer items pass the filters (for a batch, every row has the
        same k' since the filters are shared).

    Raises:
        ValueError: bad k, dtype or shape (the message says how to fix it).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    q = np.asarray(queries)
    single = q.ndim == 1
    if q.ndim not in (1, 2):
        raise ValueError(f"queries must have shape [d] or [B, d], got {q.shape}")
    scores = dense_scores(q.reshape(1, -1) if single else q, items, item_scales)
    n = items.shape[0]
    allowed = unpack_mask(allow, n) if allow is not None else None
    excl = None
    if exclude is not None:
        excl = np.asarray(exclude, dtype=np.int64).ravel()
        if len(excl) and (excl.min() < 0 or excl.max() >= n):
            raise ValueError(f"exclude holds item indices outside [0, {n})")
    rows = [_topk_row(scores[b], int(k), excl, allowed) for b in range(scores.shape[0])]
    if single:
        return rows[0]
    width = min(len(r[0]) for r in rows) if rows else 0
    ids = np.stack([r[0][:width] for r in rows]) if rows else np.zeros((0, 0), np.int64)
    sc = np.stack([r[1][:width] for r in rows]) if rows else np.zeros((0, 0), np.float32)
    return ids, sc


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization.

    Args:
        x: float32 [N, d].
    Returns:
        (q, scales): int8 [N, d] in [-127, 127] and float32 [N] with ``x[r] ~= q[r] * scales[r]``
        (scale = max |x[r]| / 127; an all-zero row gets scale 1).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D float32 matrix [N, d], got shape {x.shape}")
    amax = np.abs(x).max(axis=1)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales
