"""edge_runtime.scoring.topk against a brute-force NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edge_runtime import scoring


def reference(q, items, k, exclude=(), allow=None):
    """Full sort of the float32 scores: score descending, then index ascending."""
    s = scoring.dense_scores(q, items)
    ok = ~np.isnan(s)
    if allow is not None:
        ok &= allow
    ok[list(exclude)] = False
    idx = np.flatnonzero(ok)
    order = np.lexsort((idx, -s[idx]))[:k]
    return idx[order], s[idx][order]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), d=st.sampled_from([1, 3, 17, 64]), k=st.integers(1, 320), seed=st.integers(0, 10**6),
       n_excl=st.integers(0, 20), dup=st.booleans())
def test_topk_matches_reference(n, d, k, seed, n_excl, dup):
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n, d)).astype(np.float32)
    if dup:                       # duplicate rows: ties broken by the lower index
        items[n // 2:] = items[: n - n // 2]
    q = rng.standard_normal(d).astype(np.float32)
    excl = rng.choice(n, min(n_excl, n), replace=False)
    ids, sc = scoring.topk(q, items, k, exclude=excl)
    rid, rsc = reference(q, items, k, exclude=excl)
    assert ids.dtype == np.int64 and sc.dtype == np.float32
    assert len(ids) == min(k, n - len(excl))
    np.testing.assert_array_equal(ids, rid)
    np.testing.assert_array_equal(sc, rsc)
    exact = items[ids].astype(np.float64) @ q.astype(np.float64)
    np.testing.assert_allclose(sc, exact, rtol=1e-4, atol=1e-4)


def test_ties_lower_index_first():
    items = np.ones((10, 4), dtype=np.float32)
    ids, sc = scoring.topk(np.ones(4, np.float32), items, 3)
    assert ids.tolist() == [0, 1, 2] and sc.tolist() == [4.0, 4.0, 4.0]
    ids, _ = scoring.topk(np.ones(4, np.float32), items, 3, exclude=np.array([1]))
    assert ids.tolist() == [0, 2, 3]


def test_nan_never_returned_and_inf_ordering():
    items = np.array([[1.0], [np.nan], [np.inf], [-np.inf], [2.0]], dtype=np.float32)
    ids, sc = scoring.topk(np.ones(1, np.float32), items, 10)
    assert ids.tolist() == [2, 4, 0, 3]
    assert np.isinf(sc[0]) and np.isneginf(sc[-1])


def test_filters_allow_and_exclude_fewer_than_k():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((100, 8)).astype(np.float32)
    allow = np.zeros(100, bool)
    allow[[3, 50, 99]] = True
    ids, _ = scoring.topk(rng.standard_normal(8).astype(np.float32), items, 10, allow=scoring.pack_mask(allow),
                          exclude=np.array([50]))
    assert sorted(ids.tolist()) == [3, 99]
    ids, _ = scoring.topk(np.ones(8, np.float32), items, 5, exclude=np.arange(100))
    assert len(ids) == 0


def test_int8_matches_dequantized_float():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    q, scales = scoring.quantize_rows(x)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    np.testing.assert_allclose(q * scales[:, None], x, atol=scales.max() / 2 + 1e-7)
    query = rng.standard_normal(64).astype(np.float32)
    ids, sc = scoring.topk(query, q, 20, item_scales=scales)
    rid, rsc = scoring.topk(query, (q.astype(np.float32) * scales[:, None]).astype(np.float32), 20)
    assert ids.tolist() == rid.tolist()
    np.testing.assert_allclose(sc, rsc, rtol=1e-5)


def test_batch_queries():
    rng = np.random.default_rng(2)
    items = rng.standard_normal((200, 16)).astype(np.float32)
    qs = rng.standard_normal((5, 16)).astype(np.float32)
    ids, sc = scoring.topk(qs, items, 7)
    assert ids.shape == (5, 7)
    for b in range(5):
        assert ids[b].tolist() == scoring.topk(qs[b], items, 7)[0].tolist()


@pytest.mark.parametrize("call, words", [
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float64), 1), "float32 or int8"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.int8), 1), "item_scales"),
    (lambda: scoring.topk(np.ones(5, np.float32), np.ones((3, 4), np.float32), 1), "dimension"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float32), 0), "positive integer"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float32), 1, exclude=[7]), "outside"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones(4, np.float32), 1), "2-D"),
    (lambda: scoring.topk(np.ones(4, np.float32), np.ones((3, 4), np.float32), 1, allow=np.ones(3, bool)),
     "packed uint8"),
])
def test_bad_input_value_errors(call, words):
    with pytest.raises(ValueError, match=words):
        call()
