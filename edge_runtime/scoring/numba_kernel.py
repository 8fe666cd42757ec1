"""Numba fallback of the native top-k kernel (same semantics as native/src/topk_kernel-inl.h).

Used when the C++ extension is not built or is disabled (``EDGEREC_NO_NATIVE=1``); ``edge_runtime.scoring``
validates the arguments before they get here. Importing this module raises ImportError when Numba is missing.
"""
from __future__ import annotations

import numpy as np
from numba import njit

F32, I8_F32Q, I8_I8Q = 0, 1, 2


@njit(cache=True, nogil=True, inline="always")
def _worse(s1, i1, s2, i2):
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(cache=True, nogil=True)
def _push(hs, hi, size, k, s, i):
    """Push (s, i) into the heap (hs, hi) of current ``size``; returns the new size. Top = worst entry."""
    if size < k:
        c = size
        size += 1
        while c > 0:
            p = (c - 1) // 2
            if not _worse(s, i, hs[p], hi[p]):
                break
            hs[c] = hs[p]
            hi[c] = hi[p]
            c = p
        hs[c] = s
        hi[c] = i
        return size
    if not _worse(hs[0], hi[0], s, i):
        return size
    c = 0
    while True:
        left = 2 * c + 1
        right = left + 1
        m = c
        ms = s
        mi = i
        if left < size and _worse(hs[left], hi[left], ms, mi):
            m = left
            ms = hs[left]
            mi = hi[left]
        if right < size and _worse(hs[right], hi[right], ms, mi):
            m = right
        if m == c:
            break
        hs[c] = hs[m]
        hi[c] = hi[m]
        c = m
    hs[c] = s
    hi[c] = i
    return size


@njit(cache=True, nogil=True)
def _excluded(excl, idx):
    j = np.searchsorted(excl, idx)
    return j < excl.shape[0] and excl[j] == idx


@njit(cache=True, nogil=True)
def _scan(mode, items_f, items_8, scales, q_f, q_8, q_scales, k, allow, use_allow, excl, out_s, out_i, out_n):
    n = items_f.shape[0] if mode == F32 else items_8.shape[0]
    d = items_f.shape[1] if mode == F32 else items_8.shape[1]
    nq = out_s.shape[0]
    for q in range(nq):
        hs = out_s[q]
        hi = out_i[q]
        size = 0
        for i in range(n):
            if use_allow and not ((allow[i >> 3] >> (i & 7)) & 1):
                continue
            if mode == F32:
                acc = np.float32(0.0)
                for j in range(d):
                    acc += q_f[q, j] * items_f[i, j]
                s = acc
            elif mode == I8_F32Q:
                acc = np.float32(0.0)
                for j in range(d):
                    acc += q_f[q, j] * np.float32(items_8[i, j])
                s = acc * scales[i]
            else:
                dot = np.int32(0)
                for j in range(d):
                    dot += np.int32(q_8[q, j]) * np.int32(items_8[i, j])
                s = (np.float32(dot) * q_scales[q]) * scales[i]
            if s != s:
                continue
            if size == k and not (s > hs[0]):
                continue
            if excl.shape[0] and _excluded(excl, i):
                continue
            size = _push(hs, hi, size, k, np.float32(s), i)
        out_n[q] = size


_EMPTY_F = np.zeros((0, 1), dtype=np.float32)
_EMPTY_8 = np.zeros((0, 1), dtype=np.int8)
_EMPTY_S = np.zeros(0, dtype=np.float32)
_EMPTY_U8 = np.zeros(0, dtype=np.uint8)


def topk(queries, items, k, item_scales=None, query_scales=None, allow=None, exclude=None):
    """Validated arguments in (see edge_runtime.scoring.topk) -> (ids int64 [B, k'], scores float32 [B, k'])."""
    nq = queries.shape[0]
    k = min(k, max(items.shape[0], 1))
    if items.dtype == np.int8:
        mode = I8_I8Q if queries.dtype == np.int8 else I8_F32Q
    else:
        mode = F32
    out_s = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    out_n = np.zeros(nq, dtype=np.int64)
    excl = exclude if exclude is not None else np.zeros(0, dtype=np.int64)
    _scan(mode,
          items if mode == F32 else _EMPTY_F, items if mode != F32 else _EMPTY_8,
          item_scales if item_scales is not None else _EMPTY_S,
          queries if queries.dtype == np.float32 else _EMPTY_F, queries if queries.dtype == np.int8 else _EMPTY_8,
          query_scales if query_scales is not None else _EMPTY_S,
          k, allow if allow is not None else _EMPTY_U8, allow is not None, excl, out_s, out_i, out_n)
    width = int(out_n.min()) if nq else 0
    ids = np.empty((nq, width), dtype=np.int64)
    scores = np.empty((nq, width), dtype=np.float32)
    for q in range(nq):
        m = int(out_n[q])
        order = np.lexsort((out_i[q, :m], -out_s[q, :m]))[:width]
        ids[q] = out_i[q, order]
        scores[q] = out_s[q, order]
    return ids, scores
