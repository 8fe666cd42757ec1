"""The collector (``fleet/collector.py``) on a real SQLite file: idempotent ingest, and every bad batch refused whole
with a clear error (nothing half-stored); plus the node-side pieces shipping relies on (the log's count of events
its cap drops before shipping, sequence numbers that never go back)."""
from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time

import pytest

from edge_runtime import const
from edge_runtime.client import Client, RpcError
from edge_runtime.errors import INVALID_PARAMS, SEQUENCE_MISMATCH, InvalidParams, SequenceMismatch
from edge_runtime.events.log import Event, EventLog
from edge_runtime.fleet.collector import CollectorStore
from edgerec.process import free_port, start_daemon, stop_daemon
from shipping_scenarios import collected_rows


def pseud(u: str) -> str:
    return hashlib.sha256(u.encode()).hexdigest()[:32]


def ev(seq: int, user: str = "a", item: str = "i1", event: str = "view", ts: float = 1.6e9) -> list:
    return [seq, pseud(user), item, event, ts + seq]


def batch(after: int, seqs, node: str = "n1", **kw) -> dict:
    return {"node": node, "after": after, "events": [ev(s) for s in seqs], **kw}


def rows(store: CollectorStore) -> list[tuple]:
    return collected_rows(store.path)


@pytest.fixture
def store(tmp_path):
    s = CollectorStore(tmp_path / "c" / const.COLLECTOR_DB, nodes=["n1", "n2"])
    yield s
    s.close()


def test_ingest_is_idempotent_and_survives_reopen(store, tmp_path):
    assert store.ingest(batch(0, [1, 2, 3])) == {"acked": 3, "stored": 3, "duplicates": 0}
    assert store.ingest(batch(0, [1, 2, 3])) == {"acked": 3, "stored": 0, "duplicates": 3}   # a re-sent batch
    assert store.ingest(batch(2, [3, 5, 9])) == {"acked": 9, "stored": 2, "duplicates": 1}   # overlap; gaps inside
    assert [r[1] for r in rows(store)] == [1, 2, 3, 5, 9]
    assert store.ingest(batch(0, [1, 2], node="n2"))["acked"] == 2                           # nodes are separate
    assert store.cursor("n1") == {"acked": 9, "events": 5, "dropped": 0}
    assert store.ingest(batch(9, [], dropped=4)) == {"acked": 9, "stored": 0, "duplicates": 0}
    store.close()
    again = CollectorStore(store.path, nodes=["n1", "n2"])
    try:
        assert again.cursor("n1") == {"acked": 9, "events": 5, "dropped": 4}
        assert again.count() == 7
        assert oct(again.path.stat().st_mode & 0o777) == "0o600"
    finally:
        again.close()


BAD = [
    ("not a map", [1, 2], InvalidParams, "params must be a map"),
    ("missing after", {"node": "n1", "events": []}, InvalidParams, "missing required parameter 'after'"),
    ("unknown key", dict(batch(0, [1]), extra=1), InvalidParams, "unknown parameter"),
    ("unknown node", batch(0, [1], node="intruder"), InvalidParams, "unknown node"),
    ("events not a list", {"node": "n1", "after": 0, "events": "x"}, InvalidParams, "must be an array"),
    ("event not a row", {"node": "n1", "after": 0, "events": [{"seq": 1}]}, InvalidParams, "events[0] must be"),
    ("seq not above after", batch(5, [5]), InvalidParams, "seq must be an integer above 5"),
    ("seq out of order", batch(0, [2, 1]), InvalidParams, "events[1]: seq must be an integer above 2"),
    ("seq a bool", {"node": "n1", "after": 0, "events": [[True, pseud("a"), "i", "view", 1.0]]}, InvalidParams,
     "seq must be"),
    ("raw shopper id", {"node": "n1", "after": 0, "events": [[1, "alice@example.com", "i", "view", 1.0]]},
     InvalidParams, "must be a pseudonym"),
    ("upper-case hex", {"node": "n1", "after": 0, "events": [[1, pseud("a").upper(), "i", "view", 1.0]]},
     InvalidParams, "must be a pseudonym"),
    ("bad event type", {"node": "n1", "after": 0, "events": [[1, pseud("a"), "i", "like", 1.0]]}, InvalidParams,
     "event must be one of"),
    ("empty item", {"node": "n1", "after": 0, "events": [[1, pseud("a"), "", "view", 1.0]]}, InvalidParams,
     "item"),
    ("nan time", {"node": "n1", "after": 0, "events": [[1, pseud("a"), "i", "view", float("nan")]]}, InvalidParams,
     "ts must be a unix time"),
    ("future time", {"node": "n1", "after": 0, "events": [[1, pseud("a"), "i", "view", time.time() + 3600]]},
     InvalidParams, "in the future"),
    ("too many", {"node": "n1", "after": 0, "events": [ev(s) for s in range(1, const.MAX_INGEST_EVENTS + 2)]},
     InvalidParams, "at most"),
]


@pytest.mark.parametrize("name,params,err,text", BAD, ids=[b[0] for b in BAD])
def test_bad_batch_is_refused_whole(store, name, params, err, text):
    store.ingest(batch(0, [1, 2]))
    before = rows(store)
    with pytest.raises(err) as exc:
        store.ingest(params)
    assert text in str(exc.value)
    assert rows(store) == before and store.cursor("n1")["acked"] == 2


def test_a_bad_event_after_good_ones_stores_none_of_them(store):
    bad = {"node": "n1", "after": 0, "events": [ev(1), ev(2), [3, "raw shopper", "i", "view", 1.0]]}
    with pytest.raises(InvalidParams, match=r"events\[2\]: user must be a pseudonym"):
        store.ingest(bad)
    assert rows(store) == [] and store.cursor("n1")["acked"] == 0


def test_gap_and_conflicting_resend_are_sequence_mismatches(store):
    store.ingest(batch(0, [1, 2, 3]))
    with pytest.raises(SequenceMismatch, match="sequence gap: the collector holds this node up to seq 3"):
        store.ingest(batch(7, [8, 9]))
    other = {"node": "n1", "after": 0, "events": [ev(1, user="b"), ev(2), ev(4)]}   # seq 1 now another event
    with pytest.raises(SequenceMismatch, match="seq 1 was stored with another event"):
        store.ingest(other)
    assert [r[1] for r in rows(store)] == [1, 2, 3] and store.status["refused"] == 2


def test_ingest_over_a_registry_process(tmp_path):
    port = free_port()
    proc = start_daemon(None, port, ["--bundles", str(tmp_path / "b"), "--collect", str(tmp_path / "c"),
                                     "--node", "n1", "--no-discovery"], command="registry")
    try:
        with Client("127.0.0.1", port) as c:
            assert c.call("ingest_cursor", node="n1") == {"acked": 0, "events": 0, "dropped": 0}
            assert c.call("ingest", **batch(0, [1, 2])) == {"acked": 2, "stored": 2, "duplicates": 0}
            with pytest.raises(RpcError) as e:
                c.call("ingest", **batch(0, [1], node="n9"))
            assert e.value.code == INVALID_PARAMS and "unknown node" in e.value.message
            with pytest.raises(RpcError) as e:
                c.call("ingest", **batch(5, [6]))
            assert e.value.code == SEQUENCE_MISMATCH
            with pytest.raises(RpcError):
                c.call("ingest", node="n1", after=2, events=[[3, "raw-id", "i", "view", 1.0]])
            h = c.call("health")["collector"]
            assert h["events"] == 2 and h["nodes"]["n1"]["acked"] == 2 and h["refused"] == 1
            assert c.call("ingest", **batch(2, [3]))["acked"] == 3   # still answering after refusals
    finally:
        stop_daemon(proc)


def test_log_counts_events_its_cap_drops_before_shipping(tmp_path):
    log = EventLog(tmp_path / "events.db", "k1", max_bytes=1 << 16)
    log.open()
    loop = asyncio.new_event_loop()
    try:
        log.start(loop)
        loop.run_until_complete(log.append([Event(pseud(str(i % 7)), f"item-{i}" * 8, "view", 1.6e9 + i)
                                            for i in range(3000)]))
        log.upstream_acked = 100   # the collector has acknowledged seqs 1..100
        rows_before = log.status["rows"]
        log.compact()
        removed = rows_before - log.status["rows"]
        assert removed > 100, removed   # the cap removed shipped and unshipped rows
        assert log.status["dropped_unshipped"] == removed - 100
    finally:
        log.close()
        loop.close()


def test_sequence_numbers_continue_after_what_was_shipped(tmp_path):
    log = EventLog(tmp_path / "events.db", "k1")
    log.open()
    log.ensure_seq_above(500)   # the log was rebuilt, the collector holds this node up to 500
    loop = asyncio.new_event_loop()
    try:
        log.start(loop)
        loop.run_until_complete(log.append([Event(pseud("a"), "i", "view", 1.6e9)]))
    finally:
        log.close()
        loop.close()
    c = sqlite3.connect(tmp_path / "events.db")
    assert c.execute("SELECT seq FROM events").fetchall() == [(501,)]
    c.close()
