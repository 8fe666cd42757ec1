"""events/analytics.py: rates by type over the last minute, distinct shoppers (HyperLogLog, 5 min / 1 h windows),
the hour's top items (Misra-Gries), all bounded; and the figures reach stats and the Prometheus text."""
from __future__ import annotations

import secrets
import urllib.request

from edge_runtime import const
from edge_runtime.client import Client
from edge_runtime.events.analytics import Analytics
from edgerec.process import free_port, start_daemon, stop_daemon


def test_rates_distinct_shoppers_and_top_items():
    a = Analytics(("view", "cart", "purchase"))
    t0 = 1_800_000_000.0
    shoppers = [secrets.token_hex(16) for _ in range(30_000)]
    for i, s in enumerate(shoppers):                     # 30,000 shoppers 50 minutes ago
        a.observe(s, f"item-{i % 100}", "view", t0 - 3000)
    for i in range(1200):                                # the last minute: 20 views/s, 1 purchase/s, 3 shoppers
        a.observe(shoppers[i % 3], "hot" if i % 2 else "warm", "view", t0 - 60 + i * 0.05)
    for i in range(60):
        a.observe(shoppers[0], "bought", "purchase", t0 - 60 + i)
    snap = a.snapshot(t0)
    assert abs(snap["events_per_second"]["view"] - 20.0) < 0.5
    assert abs(snap["events_per_second"]["purchase"] - 1.0) < 0.1 and snap["events_per_second"]["cart"] == 0
    assert snap["active_shoppers"]["5m"] == 3
    assert abs(snap["active_shoppers"]["1h"] - 30_000) < 30_000 * 0.05       # HLL, ~1.6 % standard error
    top = snap["top_items_1h"]
    assert top["view"][0][0] in ("hot", "warm") and top["view"][0][1] == 600
    assert top["purchase"] == [["bought", 60]] and len(top["view"]) == const.ANALYTICS_TOP_ITEMS
    later = a.snapshot(t0 + 3 * 3600)                                         # everything aged out
    assert later["active_shoppers"] == {"5m": 0, "1h": 0} and later["events_per_second"]["view"] == 0


def test_memory_is_bounded_by_minutes_and_counters():
    a = Analytics(("view", "cart", "purchase"))
    t0 = 1_800_000_000.0
    for i in range(200_000):   # 200,000 distinct items in one minute: the summary keeps at most its bound
        a.observe(f"{i:032x}", f"item-{i}", "cart", t0 + i * 1e-4)
    assert all(len(b.items["cart"]) <= const.ANALYTICS_ITEMS_PER_MINUTE for b in a._minutes.values())
    for m in range(200):
        a.observe("0" * 32, "x", "view", t0 + 60 * m)
    assert len(a._minutes) <= const.ANALYTICS_MINUTES


def test_stats_and_metrics_carry_the_analysis(tiny_bundle, tmp_path):
    port, mport = free_port(), free_port()
    proc = start_daemon(tiny_bundle, port, ["--state-dir", str(tmp_path / "s"), "--no-discovery",
                                            "--metrics-port", str(mport)])
    try:
        with Client("127.0.0.1", port) as c:
            c.call("track_batch", events=[{"user": f"u{i % 4}", "item": "1", "event": "cart"} for i in range(40)])
            an = c.call("stats")["analytics"]
            assert an["active_shoppers"]["5m"] == 4 and an["top_items_1h"]["cart"] == [["1", 40]]
            assert an["events_per_second"]["cart"] > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        assert 'edgerec_active_shoppers{window="5m"} 4.0' in text
        assert 'edgerec_top_item_events_1h{event="cart",item="1",rank="1"} 40.0' in text
        assert "edgerec_events_committed_total 40.0" in text and "edgerec_events_refused_total 0.0" in text
    finally:
        stop_daemon(proc)
