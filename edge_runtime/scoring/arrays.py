"""Array checks, packed allow-bitsets and dense reference scores shared by the top-k front end and its fallbacks."""
from __future__ import annotations

import numpy as np

from .. import const


def fix_hint(name: str, dtype) -> str:
    return f"convert with np.ascontiguousarray({name}, dtype=np.{np.dtype(dtype).name})"


def check_items(items: np.ndarray, item_scales: np.ndarray | None) -> None:
    if not isinstance(items, np.ndarray) or items.ndim != 2:
        raise ValueError(f"items must be a 2-D array [N, d], got {getattr(items, 'shape', type(items).__name__)}")
    if items.dtype == np.int8:
        if item_scales is None:
            raise ValueError("int8 items need item_scales (float32 [N], one scale per row)")
        if not isinstance(item_scales, np.ndarray) or item_scales.dtype != np.float32:
            raise ValueError(f"item_scales must be float32; {fix_hint('item_scales', np.float32)}")
        if item_scales.shape != (items.shape[0],):
            raise ValueError(f"item_scales must have shape [{items.shape[0]}], got {item_scales.shape}")
        if not item_scales.flags.c_contiguous:
            raise ValueError(f"item_scales must be C-contiguous; {fix_hint('item_scales', np.float32)}")
    elif items.dtype != np.float32:
        raise ValueError(f"items must be float32 or int8, got {items.dtype}; {fix_hint('items', np.float32)}")
    if not items.flags.c_contiguous:
        raise ValueError(f"items must be C-contiguous (rows packed); {fix_hint('items', items.dtype)}")
    if items.shape[1] < 1 or items.shape[1] > const.MAX_DIM:
        raise ValueError(f"items dimension d must be between 1 and {const.MAX_DIM}, got {items.shape[1]}")


def dense_scores(queries: np.ndarray, items: np.ndarray, item_scales: np.ndarray | None = None) -> np.ndarray:
    """All scores: float32 [B, N] for queries float32 [B, d] (or [N] for a single query of shape [d]).

    Raises:
        ValueError: wrong dtype or shape (the message says how to fix it).
    """
    check_items(items, item_scales)
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
