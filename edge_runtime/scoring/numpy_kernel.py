"""The NumPy fallback of the top-k kernel (a BLAS mat-vec plus ``argpartition``), used when neither the native
kernel nor Numba is there. Arguments arrive validated by ``edge_runtime.scoring.topk``; same contract."""
from __future__ import annotations

import numpy as np

from .arrays import dense_scores, unpack_mask


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


def topk(q, items, k, item_scales, query_scales, allow, excl):
    """Validated arguments in -> (ids int64 [B, k'], scores float32 [B, k'])."""
    if q.dtype == np.int8:
        dots = q.astype(np.int32) @ items.T.astype(np.int32)
        scores = (dots.astype(np.float32) * query_scales[:, None]) * item_scales
    else:
        scores = dense_scores(q, items, item_scales)
    allowed = unpack_mask(allow, items.shape[0]) if allow is not None else None
    rows = [_topk_row(scores[b], k, excl, allowed) for b in range(scores.shape[0])]
    width = min(len(r[0]) for r in rows)
    return np.stack([r[0][:width] for r in rows]), np.stack([r[1][:width] for r in rows])
