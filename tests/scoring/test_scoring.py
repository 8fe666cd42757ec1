"""edge_runtime.scoring.topk on every backend (native at the process's SIMD level, Numba, NumPy) against a
brute-force NumPy reference. test_scoring_paths.py reruns this file once per SIMD level, each in its own process.

Exactness: with integer-valued data every partial sum is exact in float32, so every backend and SIMD level must
return exactly the reference ids and scores; random float data is compared with a tolerance.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from edge_runtime import scoring

BACKENDS = scoring.available_backends()


def reference(q, items, k, item_scales=None, query_scales=None, exclude=(), allow=None):
    """Full sort: score desc, then index asc; NaN, excluded and disallowed items dropped."""
    if q.dtype == np.int8:
        s = ((q.astype(np.int64) @ items.astype(np.int64).T).astype(np.float32) * query_scales[:, None]) * item_scales
    elif items.dtype == np.int8:
        s = (q.astype(np.float64) @ items.astype(np.float64).T).astype(np.float32) * item_scales
    else:
        s = (q.astype(np.float64) @ items.astype(np.float64).T).astype(np.float32)
    ids, scores = [], []
    for row in s:
        ok = ~np.isnan(row)
        if allow is not None:
            ok &= allow
        ok[list(exclude)] = False
        idx = np.flatnonzero(ok)
        order = np.lexsort((idx, -row[idx]))[:k]
        ids.append(idx[order])
        scores.append(row[idx][order])
    width = min(len(r) for r in ids)
    return np.stack([r[:width] for r in ids]), np.stack([r[:width] for r in scores])


def int_data(rng, n, d, nq, mode):
    """Integer-valued data for exact comparison in the given mode ('f32', 'i8f', 'i8i')."""
    if mode == "f32":
        return (rng.integers(-8, 9, (nq, d)).astype(np.float32), rng.integers(-8, 9, (n, d)).astype(np.float32),
                {})
    items = rng.integers(-127, 128, (n, d)).astype(np.int8)
    scales = (rng.integers(1, 64, n) / 64).astype(np.float32)   # dyadic: products stay exact
    if mode == "i8f":
        return rng.integers(-8, 9, (nq, d)).astype(np.float32), items, {"item_scales": scales}
    q = rng.integers(-127, 128, (nq, d)).astype(np.int8)
    return q, items, {"item_scales": scales, "query_scales": (rng.integers(1, 64, nq) / 64).astype(np.float32)}


def test_implementation_is_the_requested_one():
    forced = os.environ.get("EDGEREC_SIMD")
    if forced:
        assert scoring.simd_level() == forced
        assert scoring.IMPLEMENTATION == f"native-{forced}"
    if os.environ.get("EDGEREC_NO_NATIVE") == "1":
        assert scoring.BACKEND in ("numba", "numpy")
    assert "numpy" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["f32", "i8f", "i8i", "i8p"])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 64, 65, 1000])
@pytest.mark.parametrize("d", [1, 3, 17, 64, 100, 128, 257])
def test_exact_against_reference(backend, mode, n, d):
    rng = np.random.default_rng(n * 1000 + d)
    for nq in (1, 5, 9, 33):   # 9 and 33 take the batch kernel at every SIMD width
        q, items, kw = int_data(rng, n, d, nq, "i8i" if mode == "i8p" else mode)
        if mode == "i8p":      # packed tiles: topk takes the PackedInt8 in place of items + item_scales
            packed = scoring.pack_int8(items, kw["item_scales"])
        for k in sorted({1, 10, n, n + 3}):
            excl = rng.choice(n, min(n, 3), replace=False) if n > 3 else ()
            allow = rng.random(n) < 0.8
            if mode == "i8p":
                ids, sc = scoring.topk(q, packed, k, query_scales=kw["query_scales"], exclude=excl,
                                       allow=scoring.pack_mask(allow), backend=backend)
            else:
                ids, sc = scoring.topk(q, items, k, exclude=excl, allow=scoring.pack_mask(allow), backend=backend,
                                       **kw)
            rid, rsc = reference(q, items, k, exclude=excl, allow=allow, **kw)
            np.testing.assert_array_equal(ids, rid)
            np.testing.assert_array_equal(sc, rsc)
            assert ids.dtype == np.int64 and sc.dtype == np.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_and_threads(backend):
    rng = np.random.default_rng(7)
    for mode in ("f32", "i8f", "i8i"):
        q, items, kw = int_data(rng, 70_000, 64, 3, mode)
        excl = rng.choice(70_000, 700, replace=False)
        rid, rsc = reference(q, items, 100, exclude=excl, **kw)
        for threads in (1, 2, 3):
            ids, sc = scoring.topk(q, items, 100, exclude=excl, num_threads=threads, backend=backend, **kw)
            np.testing.assert_array_equal(ids, rid)
            np.testing.assert_array_equal(sc, rsc)
        single = scoring.topk(q[0], items, 100, exclude=excl, backend=backend,
                              **{k: (v[:1] if k == "query_scales" else v) for k, v in kw.items()})
        np.testing.assert_array_equal(single[0], rid[0])
        if mode == "i8i":
            packed = scoring.pack_int8(items, kw["item_scales"])
            for threads in (1, 2):
                ids, sc = scoring.topk(q, packed, 100, query_scales=kw["query_scales"], exclude=excl,
                                       num_threads=threads, backend=backend)
                np.testing.assert_array_equal(ids, rid)
                np.testing.assert_array_equal(sc, rsc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_floats_within_tolerance(backend):
    rng = np.random.default_rng(3)
    items = rng.standard_normal((5000, 64)).astype(np.float32)
    q = rng.standard_normal((4, 64)).astype(np.float32)
    ids, sc = scoring.topk(q, items, 50, backend=backend)
    rid, rsc = reference(q, items, 50)
    np.testing.assert_allclose(sc, rsc, rtol=1e-5, atol=1e-5)
    exact = np.einsum("bkd,bd->bk", items[ids].astype(np.float64), q.astype(np.float64))
    np.testing.assert_allclose(sc, exact, rtol=1e-5, atol=1e-5)
    assert (ids == rid).mean() > 0.98   # only near-ties may swap


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_nan_inf_duplicates(backend):
    items = np.ones((40, 4), dtype=np.float32)
    ids, sc = scoring.topk(np.ones(4, np.float32), items, 3, backend=backend)
    assert ids.tolist() == [0, 1, 2] and sc.tolist() == [4.0] * 3
    ids, _ = scoring.topk(np.ones(4, np.float32), items, 3, exclude=[1, 1, 0], backend=backend)
    assert ids.tolist() == [2, 3, 4]
    weird = np.array([[1.0], [np.nan], [np.inf], [-np.inf], [2.0], [np.nan], [2.0]], dtype=np.float32)
    ids, sc = scoring.topk(np.ones(1, np.float32), weird, 10, backend=backend)
    assert ids.tolist() == [2, 4, 6, 0, 3]
    assert np.isposinf(sc[0]) and np.isneginf(sc[-1]) and not np.isnan(sc).any()
    ids, sc = scoring.topk(-np.ones(1, np.float32), weird, 2, backend=backend)
    assert ids.tolist() == [3, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_than_k_and_empty(backend):
    rng = np.random.default_rng(0)
    items = rng.standard_normal((100, 8)).astype(np.float32)
    allow = np.zeros(100, bool)
    allow[[3, 50, 99]] = True
    ids, _ = scoring.topk(rng.standard_normal(8).astype(np.float32), items, 10, allow=scoring.pack_mask(allow),
                          exclude=[50], backend=backend)
    assert sorted(ids.tolist()) == [3, 99]
    ids, sc = scoring.topk(np.ones(8, np.float32), items, 5, exclude=np.arange(100), backend=backend)
    assert ids.shape == (0,) and sc.shape == (0,)
    ids, sc = scoring.topk(np.zeros((0, 8), np.float32), items, 5, backend=backend)
    assert ids.shape == (0, 0)
    ids, _ = scoring.topk(np.ones(8, np.float32), items, 5, allow=scoring.pack_mask(np.zeros(100, bool)),
                          backend=backend)
    assert len(ids) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_items_match_dequantized(backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    q8, scales = scoring.quantize_rows(x)
    assert q8.dtype == np.int8 and np.abs(q8).max() <= 127
    np.testing.assert_allclose(q8 * scales[:, None], x, atol=scales.max() / 2 + 1e-7)
    query = rng.standard_normal(64).astype(np.float32)
    ids, sc = scoring.topk(query, q8, 20, item_scales=scales, backend=backend)
    deq = np.ascontiguousarray(q8.astype(np.float32) * scales[:, None])
    rid, rsc = scoring.topk(query, deq, 20, backend="numpy")
    assert (ids == rid).mean() > 0.9
    np.testing.assert_allclose(sc, rsc, rtol=1e-4, atol=1e-4)
    qq, qs = scoring.quantize_queries(query)
    ids8, _ = scoring.topk(qq, q8, 20, item_scales=scales, query_scales=qs, backend=backend)
    assert len(set(ids8.tolist()[0]) & set(rid.tolist())) >= 16


@pytest.mark.parametrize("call, words", [
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float64), 1), "float32 or int8"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.int8), 1), "item_scales"),
    (lambda: scoring.topk(np.ones(5, np.float32), np.ones((3, 4), np.float32), 1), "dimension"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float32), 0), "positive integer"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float32), 1, exclude=[7]), "outside"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones(4, np.float32), 1), "2-D"),
    (lambda: scoring.topk(np.ones(4, np.float64), np.ones((3, 4), np.float32), 1), "ascontiguousarray"),
    (lambda: scoring.topk(np.ones((3, 8), np.float32)[:, ::2], np.ones((3, 4), np.float32), 1), "C-contiguous"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 8), np.float32)[:, ::2], 1), "C-contiguous"),
    (lambda: scoring.topk(np.ones(4, np.int8), np.ones((3, 4), np.int8), 1,
                          item_scales=np.ones(3, np.float32)), "query_scales"),
    (lambda: scoring.topk(np.ones(4, np.int8), np.ones((3, 4), np.float32), 1), "int8 items"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float32), 1, allow=np.ones(3, bool)),
     "packed uint8"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float32), 1, backend="gpu"), "not available"),
    (lambda: scoring.topk(np.ones(4, np.float32), scoring.pack_int8(np.ones((3, 4), np.int8), np.ones(3, np.float32)),
                          1), "int8 queries"),
    (lambda: scoring.pack_int8(np.ones((3, 4), np.float32), np.ones(3, np.float32)), "needs int8 items"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.eye(4, dtype=np.float32), 1,
                          exclude=np.array([False, False, False, True])), "boolean mask"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.eye(4, dtype=np.float32), 1, exclude=[0.9]), "integer item"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.eye(4, dtype=np.float32), 1,
                          exclude=(i for i in range(2))), "sequence of item indices"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.eye(4, dtype=np.float32), 1, num_threads=2 ** 63),
     "num_threads"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.eye(4, dtype=np.float32), 1, item_scales="junk"),
     "int8 items only"),
    (lambda: scoring.topk(np.ones((4096, 1), np.float32), np.ones((10 ** 6, 1), np.float32), 10 ** 6),
     "results per call"),
    (lambda: scoring.topk([1.0, 2.0], scoring.pack_int8(np.ones((3, 2), np.int8), np.ones(3, np.float32)), 1),
     "NumPy array"),
])
def test_bad_input_value_errors(call, words):
    with pytest.raises(ValueError, match=words):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_batches_and_dims_do_not_crash(backend):
    """Work buffers grow with d x batch (they once lived on the stack and crashed at ~8 MB)."""
    if backend != "native":
        pytest.skip("sizes chosen for the native kernel's buffers")
    for nq, d in ((2048, 1024), (256, 8192)):
        ids, sc = scoring.topk(np.ones((nq, d), np.float32), np.ones((64, d), np.float32), 1, backend=backend)
        assert ids.shape == (nq, 1) and (ids == 0).all() and (sc == d).all()
    q8 = np.full((64, 1024), -128, np.int8)
    ids, _ = scoring.topk(q8, np.full((40, 1024), -128, np.int8), 1, item_scales=np.ones(40, np.float32),
                          query_scales=np.ones(64, np.float32), backend=backend)
    assert (ids == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_extremes_exact_in_batches(backend):
    """-128 everywhere at d = 1024: the largest sums must stay exact on the batch path (2^24 = 128 * 128 * 1024)."""
    rng = np.random.default_rng(5)
    items = rng.choice(np.array([-128, 127, -127], np.int8), (50, 1024))
    items[7] = -128
    q = np.full((9, 1024), -128, np.int8)
    kw = {"item_scales": np.ones(50, np.float32), "query_scales": np.ones(9, np.float32)}
    ids, sc = scoring.topk(q, items, 5, backend=backend, **kw)
    rid, rsc = reference(q, items, 5, **kw)
    np.testing.assert_array_equal(ids, rid)
    np.testing.assert_array_equal(sc, rsc)
    assert ids[0, 0] == 7 and sc[0, 0] == 128 * 128 * 1024


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [1, 2, 3])
@pytest.mark.parametrize("d", [7, 64, 100])
def test_int8_queries_with_minus_128_exact(backend, nq, d):
    """Single and few int8 queries (below every batch threshold) over the whole int8 range: -128 in queries and
    items, and queries of only -128 / 127 extremes (the largest 16-bit pair sums of the AVX2 path, and the queries
    that its sign trick cannot take). Row-major and packed items, exact against the reference."""
    rng = np.random.default_rng(nq * 1000 + d)
    n = 1000
    items = rng.integers(-128, 128, (n, d)).astype(np.int8)
    items[::7] = rng.choice(np.array([-128, 127], np.int8), (len(items[::7]), d))
    for q in (rng.integers(-128, 128, (nq, d)).astype(np.int8),
              rng.choice(np.array([-128, -127, 127], np.int8), (nq, d)),
              np.clip(rng.integers(-128, 128, (nq, d)), -127, 127).astype(np.int8)):
        kw = {"item_scales": (rng.integers(1, 64, n) / 64).astype(np.float32),
              "query_scales": (rng.integers(1, 64, nq) / 64).astype(np.float32)}
        rid, rsc = reference(q, items, 10, **kw)
        ids, sc = scoring.topk(q, items, 10, backend=backend, **kw)
        np.testing.assert_array_equal(ids, rid)
        np.testing.assert_array_equal(sc, rsc)
        packed = scoring.pack_int8(items, kw["item_scales"])
        ids, sc = scoring.topk(q, packed, 10, query_scales=kw["query_scales"], backend=backend)
        np.testing.assert_array_equal(ids, rid)
        np.testing.assert_array_equal(sc, rsc)


@pytest.mark.skipif("native" not in BACKENDS, reason="native kernel not built")
def test_native_releases_the_gil():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((1_000_000, 64)).astype(np.float32)
    q = rng.standard_normal((8, 64)).astype(np.float32)
    ticks = 0
    done = threading.Event()

    def work():
        for _ in range(3):
            scoring.topk(q, items, 10, backend="native")
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0)
    t.join()
    # with the GIL held for the whole scan the loop above could not run in between
    assert ticks > 100


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("int8_items", [False, True])
@pytest.mark.parametrize("d", [7, 40, 64, 100])   # 40 and 100: the AVX-512 kernel's 8- and 4-column tails
def test_per_query_batches_equal_single_queries_bit_for_bit(backend, int8_items, d):
    """Random float queries (real-valued: sums are not exact, so the order of additions shows in the last bits):
    with per_query=True every row of a batch, of any size, is exactly what a call with that query alone returns,
    filters included; so the daemon's batches never change a reply."""
    rng = np.random.default_rng(d * 10 + int8_items)
    n = 3000
    items = rng.standard_normal((n, d)).astype(np.float32)
    kw = {}
    if int8_items:
        items, kw["item_scales"] = scoring.quantize_rows(items)
    allow = scoring.pack_mask(rng.random(n) < 0.9)
    excl = rng.choice(n, 40, replace=False)
    for nq in (2, 3, 4, 8, 9, 17, 33):
        q = rng.standard_normal((nq, d)).astype(np.float32)
        ids, sc = scoring.topk(q, items, 25, exclude=excl, allow=allow, backend=backend, per_query=True, **kw)
        for b in range(nq):
            one = scoring.topk(q[b], items, 25, exclude=excl, allow=allow, backend=backend, **kw)
            np.testing.assert_array_equal(ids[b], one[0])
            np.testing.assert_array_equal(sc[b], one[1])
        rid, rsc = reference(q, items, 25, exclude=excl, allow=scoring.unpack_mask(allow, n), **kw)
        np.testing.assert_allclose(sc, rsc, rtol=1e-5, atol=1e-5)   # and right, within float rounding


@pytest.mark.parametrize("int8_items", [False, True])
@pytest.mark.parametrize("d", [7, 40, 64])
def test_per_query_exclusions_equal_lone_calls(int8_items, d):
    """topk_served with one exclusion list per query (the daemon's shared scan of a batch): each query gets
    exactly what a lone call with its own list returns: empty lists, repeats, lists of the query's own top items,
    a list reaching the last row, and a catalog so small that some rows come back shorter than k."""
    rng = np.random.default_rng(d + 100 * int8_items)
    for n in (3000, 30):
        items = rng.standard_normal((n, d)).astype(np.float32)
        scales = None
        if int8_items:
            items, scales = scoring.quantize_rows(items)
        allow = scoring.pack_mask(rng.random(n) < 0.9)
        q = rng.standard_normal((9, d)).astype(np.float32)
        lists = []
        for b in range(9):
            top = scoring.topk(q[b], items, 20, item_scales=scales, allow=allow)[0].tolist()
            lists.append([[], top[:5], top + top[:3], rng.integers(0, n, 40).tolist(), [n - 1, 0],
                          top[:1], [], top[::2], list(range(min(n, 25)))][b])
        got = scoring.topk_served(q, items, 12, scales, None, allow, per_query=True, query_excludes=lists)
        assert len(got) == 9
        for b, (ids, sc) in enumerate(got):
            one = scoring.topk_served(q[b], items, 12, scales, lists[b] or None, allow)
            np.testing.assert_array_equal(ids, one[0])
            np.testing.assert_array_equal(sc, one[1])
            assert ids.dtype == np.int64 and sc.dtype == np.float32
            assert not set(ids.tolist()) & set(lists[b])
        if n == 30:   # 25 of 30 excluded (and some not allowed): that row is short, the others are not cut to it
            assert len(got[8][0]) <= 5 < len(got[0][0]) == 12
    with pytest.raises(ValueError, match="outside"):
        scoring.topk_served(q, items, 5, scales, None, None, per_query=True, query_excludes=[[n]] + [[]] * 8)
    with pytest.raises(ValueError, match="one list per query"):
        scoring.topk_served(q, items, 5, scales, None, None, per_query=True, query_excludes=[[]] * 8)
    with pytest.raises(ValueError, match="replaces exclude"):   # never one of the two silently ignored
        scoring.topk_served(q, items, 5, scales, [1], None, per_query=True, query_excludes=[[]] * 9)
    with pytest.raises(ValueError, match="per_query=True"):
        scoring.topk_served(q, items, 5, scales, None, None, query_excludes=[[]] * 9)
    assert scoring.topk_served(q[:0], items, 5, scales, None, None, per_query=True, query_excludes=[]) == []
    none = scoring.topk_served(q[:2], items, 5, scales, None, None, per_query=True, query_excludes=[None, [0]])
    np.testing.assert_array_equal(none[0][0], scoring.topk_served(q[0], items, 5, scales, None, None)[0])


@pytest.mark.skipif(scoring.BACKEND != "native", reason="the native kernel's own argument checks")
def test_native_rejects_bad_exclude_offsets():
    """The kernel's per-query exclusion lists (exclude + exclude_offsets) are checked, with a message."""
    from edge_runtime.scoring import _native
    rng = np.random.default_rng(2)
    items = rng.standard_normal((100, 8)).astype(np.float32)
    q = rng.standard_normal((2, 8)).astype(np.float32)
    ex = np.array([1, 5, 3, 4], dtype=np.int64)
    for off, msg in (([0, 2], "B \\+ 1"), ([0, 5, 4], "not decrease"), ([0, 2, 3], "end at len"),
                     ([1, 2, 4], "start at 0"), ([0, 1, 4], "sorted and unique")):
        with pytest.raises(ValueError, match=msg):
            _native.topk(q, items, 3, None, None, None, ex, 1, True, np.array(off, dtype=np.int64))
    with pytest.raises(ValueError, match="needs exclude"):
        _native.topk(q, items, 3, None, None, None, None, 1, True, np.array([0, 0, 0], dtype=np.int64))
    ids, sc, sizes = _native.topk(q, items[:3], 3, None, None, None, np.array([0, 1, 2], dtype=np.int64), 1, True,
                                  np.array([0, 0, 3], dtype=np.int64))
    assert sizes.tolist() == [3, 0] and ids[1].tolist() == [-1, -1, -1] and np.isneginf(sc[1]).all()
    empty = _native.topk(q[:0], items, 3, None, None, None, ex[:0], 1, True, np.array([0], dtype=np.int64))
    assert len(empty) == 3 and empty[0].shape == (0, 0) and empty[2].shape == (0,)   # B = 0: still three arrays
    # a wrong dtype is refused, not converted (float offsets were truncated, int32 lists and float64 scales cast)
    for bad in (np.array([0, 2.7, 4]), np.array([0, 2, 4], dtype=np.int32), np.array([0, 2, 4], dtype=">i8")):
        with pytest.raises(ValueError, match="exclude_offsets has the wrong dtype"):
            _native.topk(q, items, 3, None, None, None, ex, 1, True, bad)
    with pytest.raises(ValueError, match="exclude has the wrong dtype"):
        _native.topk(q, items, 3, None, None, None, ex.astype(np.int32))
    i8 = rng.integers(-127, 128, (100, 8)).astype(np.int8)
    with pytest.raises(ValueError, match="item_scales has the wrong dtype"):
        _native.topk(q, i8, 3, np.ones(100))
    with pytest.raises(ValueError, match="allow has the wrong dtype"):
        _native.topk(q, items, 3, None, None, np.full(13, 255, dtype=np.int16))


def test_topk_served_equals_topk():
    """The daemon's entry point returns what topk returns (exclusions as an unsorted list with repeats), and
    rejects an exclusion outside the catalog."""
    rng = np.random.default_rng(5)
    items, scales = scoring.quantize_rows(rng.standard_normal((5000, 64)).astype(np.float32))
    allow = scoring.pack_mask(rng.random(5000) < 0.7)
    for _ in range(20):
        q = rng.standard_normal(64).astype(np.float32)
        excl = rng.integers(0, 5000, 30).tolist()
        a = scoring.topk_served(q, items, 10, scales, excl + excl[:5], allow)
        b = scoring.topk(q, items, 10, item_scales=scales, exclude=excl, allow=allow)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="outside"):
        scoring.topk_served(q, items, 10, scales, [5000], None)
