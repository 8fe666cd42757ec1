"""Session ring, LRU bounds and the result cache."""
from edge_runtime.serving.session import ResultCache, SessionStore


def test_ring_and_lru_bounds():
    s = SessionStore(max_sessions=2, max_events=3)
    for i in range(5):
        s.track("a", str(i), "view")
    assert s.get("a").items() == ["2", "3", "4"] and s.get("a").version == 5
    s.track("b", "x", "view")
    s.track("a", "5", "view")         # a becomes most recent
    s.track("c", "y", "view")         # evicts b
    assert s.get("b") is None and s.get("a") is not None and len(s) == 2 and s.evicted == 1


def test_cache_versions_and_invalidation():
    c = ResultCache(max_entries=2)
    c.put("u", ("k", 10), 1, "m1", {"items": [1]})
    assert c.get("u", ("k", 10), 1, "m1") == {"items": [1]}
    assert c.get("u", ("k", 10), 2, "m1") is None      # session moved on
    assert c.get("u", ("k", 10), 1, "m2") is None      # model swapped
    c.put("u", ("k", 5), 1, "m1", {"items": [2]})
    assert c.invalidate("u") == 2 and len(c) == 0
    for i in range(3):
        c.put(f"u{i}", "p", 0, "m", {"i": i})
    assert len(c) == 2 and c.get("u0", "p", 0, "m") is None and c.get("u2", "p", 0, "m") == {"i": 2}
    assert c.hits >= 2 and c.misses >= 3


def test_versions_never_repeat_after_eviction():
    s = SessionStore(max_sessions=1, max_events=3)
    v1 = s.track("a", "1", "view").version
    s.track("b", "2", "view")            # evicts a
    v2 = s.track("a", "3", "view").version
    assert v2 != v1 and v2 > v1


def test_cache_weight_bound():
    c = ResultCache(max_entries=100, max_items=25)
    for i in range(5):
        c.put(f"u{i}", "p", 0, "m", {"items": list(range(10))})
    assert c.weight <= 25 and len(c) == 2
    c.invalidate("u4")
    assert c.weight == 11
