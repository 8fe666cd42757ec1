"""Exact maximum-inner-product (MIPS) top-k over the whole item catalog: the daemon's hot loop.

Three interchangeable backends with one contract, chosen once at import:

* ``native``: the C++ kernel (``edge_runtime/scoring/_native``, built from native/ by setup.py through CMake) with
  runtime SIMD dispatch (AVX-512 VNNI / AVX-512 / AVX2 / NEON / scalar; ``EDGEREC_SIMD`` forces a level);
* ``numba``: ``numba_kernel.py``, when the extension is not built or ``EDGEREC_NO_NATIVE=1``;
* ``numpy``: ``numpy_kernel.py`` (a BLAS mat-vec plus ``argpartition``), when Numba is missing too.

``EDGEREC_SCORING=native|numba|numpy`` forces one (ImportError if it is not available); the ``EDGE_RUNTIME_*``
spellings of these variables still work and log a deprecation line. ``IMPLEMENTATION`` names the one in use (e.g.
``native-avx512_vnni``); the daemon logs it at start-up. ``quantize.py`` holds the int8 quantization of items and
queries, ``arrays.py`` the argument checks and bitsets.

Contract (every backend; the tests run the same suite on each):
* scores: ``<q, x_i>`` for float32 items; ``<q, x_i> * s_i`` for int8 items with per-row float32 scales and a
  float32 query; ``((float)<q8, x_i>) * qs * s_i`` for int8 items with an int8 query of scale ``qs`` (exact integer
  accumulation, so every backend returns identical scores);
* filters act inside the scan: an item in ``exclude`` or with a 0 bit in ``allow`` never enters the result, nor does
  a NaN score; if fewer than k items pass, fewer come back (the returned width k' says so);
* ties are broken by the lower item index; rows are sorted by score descending, then index ascending.
"""
from __future__ import annotations

import numpy as np

from .. import const
from ..config import env_flag, env_value
from . import numpy_kernel
from .arrays import check_items, dense_scores, fix_hint, pack_mask, unpack_mask
from .quantize import quantize_queries, quantize_rows

__all__ = ["BACKEND", "FALLBACK_NOTE", "IMPLEMENTATION", "PackedInt8", "available_backends", "dense_scores",
           "native_kernel", "pack_int8", "pack_mask", "quantize_queries", "quantize_rows", "simd_level", "topk",
           "topk_served", "unpack_mask"]

_FORCED = (env_value("SCORING") or "").strip().lower()
_NO_NATIVE = env_flag("NO_NATIVE")
env_value("SIMD")   # read by the native kernel itself; asked here so the deprecated spelling is reported
if _FORCED not in ("", "native", "numba", "numpy"):
    raise ImportError(f"EDGEREC_SCORING (or the deprecated EDGE_RUNTIME_SCORING) = {_FORCED!r}: use native, numba "
                      "or numpy")

try:
    from . import _native
    _NATIVE_MISSING = ""
except ImportError as _exc:
    _native = None
    # no module at all: never built; a module that fails to load (another Python, a missing library) says why
    _NATIVE_MISSING = ("not built (no C++ compiler or CMake when edgerec was installed)"
                       if isinstance(_exc, ModuleNotFoundError) else f"built but not loadable ({_exc})")


def _load_numba():
    """The Numba kernel module, or None when Numba is not installed (imported on first use: Numba is slow to
    import, and a process on the native kernel never needs it)."""
    try:
        from . import numba_kernel
    except ImportError:
        return None
    return numba_kernel


if _FORCED == "native" and _native is None:
    raise ImportError("EDGEREC_SCORING=native but edge_runtime.scoring._native is not built "
                      "(reinstall with a C++ compiler and CMake; EDGEREC_REQUIRE_NATIVE=1 makes that an error)")
if _FORCED == "native" or (_FORCED == "" and _native is not None and not _NO_NATIVE):
    BACKEND = "native"
elif _FORCED in ("", "numba") and _load_numba() is not None:
    BACKEND = "numba"
elif _FORCED == "numba":
    raise ImportError("EDGEREC_SCORING=numba but Numba is not installed (pip install numba)")
else:
    BACKEND = "numpy"
IMPLEMENTATION = "native-" + _native.simd_level() if BACKEND == "native" else BACKEND
# Why scoring is not on the native kernel when nobody asked for that ("" otherwise): the daemon logs it as a
# warning at start (pip hides a failed kernel build, and the fallbacks are several times slower).
if BACKEND == "native" or _FORCED:
    FALLBACK_NOTE = ""
elif _NO_NATIVE:
    FALLBACK_NOTE = f"EDGEREC_NO_NATIVE=1: scoring through {BACKEND}, not the native kernel"
else:
    FALLBACK_NOTE = (f"the native top-k kernel is {_NATIVE_MISSING}: scoring through {BACKEND}, several times "
                     f"slower; install g++ and cmake, then pip install --force-reinstall --no-deps . "
                     f"(EDGEREC_REQUIRE_NATIVE=1 makes a failed build an error)")

MAX_QUERIES = const.MAX_QUERIES
MAX_DIM = const.MAX_DIM
MAX_DIM_INT8_QUERY = const.MAX_DIM_INT8_QUERY
MAX_RESULTS = const.MAX_RESULTS
MAX_THREADS = const.MAX_THREADS


def available_backends() -> list[str]:
    """Backends usable in this process (for ``topk(..., backend=...)``): a subset of native, numba, numpy."""
    return [b for b, ok in (("native", _native is not None), ("numba", _load_numba() is not None),
                            ("numpy", True)) if ok]


def native_kernel():
    """The native extension module when scoring runs on it (``BACKEND == "native"``), else None: what the native
    session encoder (``serving.encoder.NativeEncoder``) is built on, so ``EDGEREC_NO_NATIVE=1`` or
    ``EDGEREC_SCORING=numba`` turn both off."""
    return _native if BACKEND == "native" else None


def simd_level() -> str:
    """The native kernel's SIMD level ('avx512_vnni', 'avx512', 'avx2', 'neon', 'scalar'), or 'none'."""
    return _native.simd_level() if _native is not None else "none"


def simd_note() -> str:
    """Why an ``EDGEREC_SIMD`` request was not honoured ('' if it was, none was made, or there is no native
    kernel)."""
    return _native.simd_note() if _native is not None else ""


def scan_plan_note() -> str:
    """Which ``EDGEREC_PREFETCH`` / ``EDGEREC_SCAN_STREAMS`` settings the native kernel ignored, and why ('' if
    none, or there is no native kernel); the plan itself: ``_native.scan_plan()``."""
    return _native.scan_plan()["note"] if _native is not None else ""


class PackedInt8:
    """int8 items in the native kernel's VNNI tile layout (16 rows interleaved by 4 bytes), for int8 queries.

    Built once with ``pack_int8`` (like an index's own storage); ``topk`` accepts it as ``items`` with an int8 query.
    The row-major ``items`` are kept by reference for the Numba / NumPy backends.

    Attributes:
        items: int8 [N, d] row-major; scales: float32 [N]; packed: uint8 tiles, or None without the native kernel.
    """

    def __init__(self, items: np.ndarray, scales: np.ndarray):
        check_items(items, scales)
        if items.dtype != np.int8:
            raise ValueError(f"pack_int8 needs int8 items, got {items.dtype}; see quantize_rows")
        if items.shape[1] > MAX_DIM_INT8_QUERY:
            raise ValueError(f"packed int8 items support d <= {MAX_DIM_INT8_QUERY}")
        self.items, self.scales = items, scales
        self.packed = _native.pack_i8(items) if _native is not None else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.items.shape

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes if self.packed is not None else self.items.nbytes


def pack_int8(items: np.ndarray, scales: np.ndarray) -> PackedInt8:
    """Pack int8 items [N, d] (with float32 [N] scales) for the fastest int8-query scan; see ``PackedInt8``."""
    return PackedInt8(items, scales)


def topk_served(queries: np.ndarray, items: np.ndarray, k: int, item_scales: np.ndarray | None,
                exclude: list[int] | None, allow: np.ndarray | None, per_query: bool = False,
                query_excludes: list[list[int]] | None = None):
    """``topk`` for the daemon's requests, whose arguments are valid by construction: float32 queries [d] or
    [B, d] from the encoder, a served model's items (checked once at load), ``exclude`` a list of the model's own
    rows (any order, repeats allowed) or None, ``allow`` a ``pack_mask`` bitset or None. With the native backend
    it goes straight to the kernel (which still checks dtypes, shapes and layout, raising ValueError), skipping
    the Python checks ``topk`` makes for arbitrary callers (measured: 15 µs of a 12k-item request's 130 µs);
    otherwise it is ``topk``. Same results, same returns.

    ``query_excludes`` (a batch [B, d] with ``per_query``, ``exclude`` None): one exclusion list per query (rows,
    any order, repeats allowed; empty or None for none), applied inside the one shared scan. Returns then a list of B
    (ids int64 [k_b], scores float32 [k_b]) pairs, each exactly what a lone call of that query with its own
    list returns (the native kernel takes all the lists in one call; the fallbacks make one call per query).

    Raises:
        ValueError: as ``topk`` (an exclusion outside [0, N) included).
    """
    if query_excludes is not None:
        if exclude is not None or not per_query:
            raise ValueError("query_excludes replaces exclude and needs per_query=True (each query's own list)")
        return _topk_each(queries, items, k, item_scales, allow, query_excludes)
    if BACKEND != "native" or queries.dtype != np.float32 or isinstance(items, PackedInt8):
        return topk(queries, items, k, item_scales=item_scales, exclude=exclude, allow=allow, items_checked=True,
                    per_query=per_query)
    excl = np.array(_checked_rows(exclude, items.shape[0]), dtype=np.int64) if exclude else None
    single = queries.ndim == 1
    ids, sc = _native.topk(queries.reshape(1, -1) if single else queries, items, min(int(k), max(items.shape[0], 1)),
                           item_scales, None, allow, excl, 1, per_query)
    return (ids[0], sc[0]) if single else (ids, sc)


def _checked_rows(rows, n: int) -> list[int]:
    """A request's exclusion rows (any order, repeats allowed; None or empty for none), sorted and deduplicated.

    Raises:
        ValueError: a row outside [0, n).
    """
    ex = sorted(set(rows)) if rows else []
    if ex and (ex[0] < 0 or ex[-1] >= n):
        raise ValueError(f"exclude holds item indices outside [0, {n})")
    return ex


def _topk_each(queries: np.ndarray, items: np.ndarray, k: int, item_scales: np.ndarray | None,
               allow: np.ndarray | None, query_excludes: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``topk_served`` with one exclusion list per query (see there)."""
    if queries.ndim != 2 or len(query_excludes) != queries.shape[0]:
        raise ValueError(f"query_excludes needs one list per query of a [B, d] batch, got {len(query_excludes)} "
                         f"lists for queries of shape {queries.shape}")
    n = items.shape[0]
    lists = [_checked_rows(ex, n) for ex in query_excludes]
    flat: list[int] = []
    offsets = [0]
    for ex in lists:   # plain lists, then one array each: ~4 µs for 4 lists of 8 (generators and cumsum: ~9)
        flat += ex
        offsets.append(len(flat))
    if BACKEND != "native" or queries.dtype != np.float32 or isinstance(items, PackedInt8):
        return [topk(queries[b], items, k, item_scales=item_scales, exclude=ex or None, allow=allow,
                     items_checked=True) for b, ex in enumerate(lists)]
    ids, sc, sizes = _native.topk(queries, items, min(int(k), max(n, 1)), item_scales, None, allow,
                                  np.array(flat, dtype=np.int64), 1, True, np.array(offsets, dtype=np.int64))
    return [(ids[b, :m], sc[b, :m]) for b, m in enumerate(sizes.tolist())]


def topk(queries: np.ndarray, items: np.ndarray, k: int, *, item_scales: np.ndarray | None = None,
         query_scales: np.ndarray | None = None, exclude=None, allow: np.ndarray | None = None,
         num_threads: int | None = None, backend: str | None = None, items_checked: bool = False,
         per_query: bool = False):
    """Exact top-k by inner product (see the module docstring for the contract).

    Args:
        queries: float32 [d] or [B, d] (B <= 4096); or int8 with ``query_scales`` (int8 items only).
        items: float32 [N, d], or int8 [N, d] with ``item_scales``; C-contiguous; or ``PackedInt8`` (int8 queries).
        k: number of results, >= 1 (k > N returns at most N).
        item_scales: float32 [N], per-row scales of int8 items.
        query_scales: float32 [B] (or a scalar for a single query), scales of int8 queries.
        exclude: item indices never to return (the shopper's seen items), any integer sequence; shared by all queries.
        allow: packed uint8 bitset over item indices (``pack_mask``); only items whose bit is 1 can be returned.
        num_threads: threads that split the item range (native backend; default 1, as the daemon runs requests in
            parallel threads already).
        backend: 'native', 'numba' or 'numpy' to bypass the import-time choice (tests, benchmarks).
        items_checked: the caller checked ``items`` / ``item_scales`` already (``arrays.check_items``; a served
            model does at load): skipped here, as they cost more per call than the 12k-item scan's selection.
        per_query: every query of a batch gets exactly (bit for bit) what a call with that query alone returns.
            Float queries are otherwise scored by a batch kernel whose float sums run in another order (the last
            bits of a score, hence the order of near-ties, may differ); with ``per_query`` the native kernel
            scores them query by query over each block of items (each block read from memory once for the batch,
            and int8 items widened to float once), the fallbacks one query per call. The daemon batches concurrent
            requests with it, so a shopper's reply never depends on who else asked at the same moment. int8
            queries are exact integer sums either way.

    Returns:
        (ids, scores): int64 and float32, shape [k'] for a [d] query or [B, k'] for a batch; k' <= k when fewer
        items pass (for a batch, rows are cut to the shortest).

    Raises:
        ValueError: bad k, dtype, shape or layout; the message says how to fix it.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer))
                                    or not 1 <= num_threads <= MAX_THREADS):
        raise ValueError(f"num_threads must be an integer from 1 to {MAX_THREADS}, got {num_threads!r}")
    if not isinstance(queries, np.ndarray):
        raise ValueError(f"queries must be a NumPy array, got {type(queries).__name__}; use np.asarray(q, np.float32)")
    packed = None
    if isinstance(items, PackedInt8):
        packed, items = items, items.items
        if item_scales is None:
            item_scales = packed.scales
        if queries.dtype != np.int8:
            raise ValueError("packed int8 items take int8 queries; see quantize_queries")
    if not items_checked:
        check_items(items, item_scales)
    if items.dtype == np.float32 and item_scales is not None:
        raise ValueError("item_scales apply to int8 items only; float32 items are used as they are")
    if queries.dtype != np.int8 and query_scales is not None:
        raise ValueError("query_scales apply to int8 queries only")
    single = queries.ndim == 1
    if queries.ndim not in (1, 2):
        raise ValueError(f"queries must have shape [d] or [B, d], got {queries.shape}")
    q = queries.reshape(1, -1) if single else queries
    n, d = items.shape
    if q.shape[1] != d:
        raise ValueError(f"query dimension {q.shape[1]} does not match items dimension {d}")
    if q.shape[0] > MAX_QUERIES:
        raise ValueError(f"at most {MAX_QUERIES} queries per call, got {q.shape[0]}; split the batch")
    k = int(min(k, max(n, 1)))
    if q.shape[0] * k > MAX_RESULTS:
        raise ValueError(f"{q.shape[0]} queries x k={k} exceeds {MAX_RESULTS} results per call; lower k or split "
                         f"the batch")
    if q.dtype == np.int8:
        if items.dtype != np.int8:
            raise ValueError("int8 queries need int8 items; pass float32 queries for float32 items")
        if query_scales is None:
            raise ValueError("int8 queries need query_scales (float32 [B]); see quantize_queries")
        query_scales = np.atleast_1d(np.asarray(query_scales))
        if query_scales.dtype != np.float32 or query_scales.shape != (q.shape[0],):
            raise ValueError(f"query_scales must be float32 of shape [{q.shape[0]}]; {fix_hint('query_scales', np.float32)}")
        if d > MAX_DIM_INT8_QUERY:
            raise ValueError(f"int8 queries support d <= {MAX_DIM_INT8_QUERY}; pass float32 queries")
    elif q.dtype != np.float32:
        raise ValueError(f"queries must be float32 (or int8 with query_scales), got {q.dtype}; "
                         f"{fix_hint('queries', np.float32)}")
    if not q.flags.c_contiguous:
        raise ValueError(f"queries must be C-contiguous; {fix_hint('queries', q.dtype)}")
    excl = None
    if exclude is not None:
        ordered = False
        if isinstance(exclude, (set, frozenset, list, tuple)) and len(exclude) <= 256:
            # a short Python sequence (a shopper's seen items): deduplicated and sorted in Python, which costs
            # less than NumPy's sortedness check and unique on a few dozen entries
            try:
                exclude, ordered = sorted(set(exclude)), True
            except TypeError:   # unhashable or unorderable entries: the dtype check below names them
                ordered = False
        elif isinstance(exclude, (set, frozenset)):
            exclude = sorted(exclude)
        elif not isinstance(exclude, (np.ndarray, list, tuple, range)):
            raise ValueError(f"exclude must be an array or sequence of item indices, got {type(exclude).__name__}")
        try:
            raw = np.asarray(exclude)
        except ValueError:   # ragged nesting
            raw = np.asarray(exclude, dtype=object)
        if raw.size and raw.dtype.kind not in "iu":
            raise ValueError(f"exclude must hold integer item indices, got dtype {raw.dtype} (a boolean mask? pass "
                             f"np.flatnonzero(mask), or use allow=pack_mask(~mask))")
        excl = raw.astype(np.int64, copy=False).ravel()
        if not ordered and len(excl) > 1 and not bool(np.all(excl[1:] > excl[:-1])):  # O(m); sort only if needed
            excl = np.unique(excl)
        excl = np.ascontiguousarray(excl)
        if len(excl) and (excl[0] < 0 or excl[-1] >= n):
            raise ValueError(f"exclude holds item indices outside [0, {n})")
        if not len(excl):
            excl = None
    if allow is not None:
        if not isinstance(allow, np.ndarray) or allow.dtype != np.uint8 or allow.ndim != 1 \
                or allow.shape[0] * 8 < n or not allow.flags.c_contiguous:
            raise ValueError(f"allow must be a packed uint8 bitset of at least {(n + 7) // 8} bytes "
                             f"(use edge_runtime.scoring.pack_mask)")
    backend = backend or BACKEND
    if backend not in ("native", "numba", "numpy") or (backend == "native" and _native is None):
        raise ValueError(f"backend {backend!r} is not available; available: {available_backends()}")
    if q.shape[0] == 0 or n == 0:
        ids, sc = np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
    elif backend == "native" and packed is not None and packed.packed is not None:
        ids, sc = _native.topk_packed(q, packed.packed, n, d, int(k), item_scales, query_scales, allow, excl,
                                      1 if num_threads is None else max(1, int(num_threads)))
    elif backend == "native":
        ids, sc = _native.topk(q, items, int(k), item_scales, query_scales, allow, excl,
                               1 if num_threads is None else max(1, int(num_threads)), bool(per_query))
    elif per_query and q.shape[0] > 1 and q.dtype != np.int8:   # fallbacks: one query per call
        parts = [topk(q[b], items, int(k), item_scales=item_scales, exclude=excl, allow=allow, backend=backend,
                      items_checked=True) for b in range(q.shape[0])]
        width = min(len(p[0]) for p in parts)
        ids = np.stack([p[0][:width] for p in parts])
        sc = np.stack([p[1][:width] for p in parts])
    elif backend == "numba":
        numba_impl = _load_numba()
        if numba_impl is None:
            raise ValueError("backend 'numba' is not available: Numba is not installed")
        ids, sc = numba_impl.topk(q, items, int(k), item_scales, query_scales, allow, excl)
    else:
        ids, sc = numpy_kernel.topk(q, items, int(k), item_scales, query_scales, allow, excl)
    return (ids[0], sc[0]) if single else (ids, sc)
