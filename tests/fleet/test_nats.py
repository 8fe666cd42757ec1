"""Shipping through NATS JetStream (``edge_runtime/fleet/nats_transport.py``) against a real ``nats-server`` (file
storage, ``sync_interval: always``; ``nats_server.py``) and a real collector SQLite file: the transport and the feed
in process (dedupe by Nats-Msg-Id and by the store, a server SIGKILL and restart, a feed restart on its durable
consumer, malformed and out-of-order messages, store failures), then real processes: ``edgerec serve`` nodes
shipping to the stream and ``edgerec collect`` storing it, through the same scenarios as the embedded transport
(``shipping_scenarios.py``, also run by ``test_shipping.py``)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
from nats_server import NatsServer, require_nats, start_collector
from shipping_scenarios import BASE_TS, PSEUDONYM, SCENARIOS, Tracker, collected_rows, wait_collected

from edge_runtime import const
from edge_runtime.fleet.collector import CollectorStore

try:
    import nats

    from edge_runtime.fleet.nats_transport import (NatsFeed, NatsTransport, msg_id, redact, split_batch,
                                                   subject_for, subject_token)
except ImportError:
    if os.environ.get("EDGEREC_REQUIRE_NATS"):
        raise
    pytest.skip("nats-py not installed (pip install '.[nats]')", allow_module_level=True)

NODE = "node-a"


def user(i: int) -> str:
    return f"{i % 7:032x}"   # a well-formed pseudonym (32 lowercase hex characters)


def batch(after: int, n: int, node: str = NODE, item: str = "i") -> dict:
    return {"node": node, "after": after, "dropped": 0,
            "events": [[after + j + 1, user(after + j), f"{item}{after + j + 1}",
                        ("view", "cart", "purchase")[(after + j) % 3], float(BASE_TS + after + j)] for j in range(n)]}


def rows(store: CollectorStore) -> list[tuple]:
    return collected_rows(store.path)


def run(coro, timeout: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(pred, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def started(feed: NatsFeed) -> NatsFeed:
    await feed.start()
    await asyncio.wait_for(feed.ready.wait(), 20)
    return feed


async def raw_publish(url: str, subject: str, payload: bytes, mid: str | None = None):
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().publish(subject, payload, headers={"Nats-Msg-Id": mid} if mid else None)
    finally:
        await nc.close()


async def stream_info(url: str):
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().stream_info(const.NATS_STREAM)
    finally:
        await nc.close()


@pytest.fixture
def server(tmp_path):
    require_nats()
    srv = NatsServer(tmp_path / "nats")
    srv.start()
    yield srv
    srv.kill()


# -- pure functions -------------------------------------------------------------------------------------------------
def test_subject_tokens_are_valid_and_distinct():
    assert subject_for("node-a") == "edgerec.events.node-a" and subject_token("Shop_7-b") == "Shop_7-b"
    ids = ["a.b", "a_b", "a b", "a*b", "a>b", "shop 7/a.b", "é", "x" * 65, "x" * 256, "x" * 255 + "y", "1"]
    tokens = [subject_token(i) for i in ids]
    assert len(set(tokens)) == len(ids)
    for t in tokens:
        assert all(c.isascii() and (c.isalnum() or c in "_-~") for c in t) and 1 <= len(t) <= 64, t
    assert subject_token("a.b").startswith("a_b~") and subject_token("a.b") != "a_b"
    assert subject_token(subject_token("a.b").replace("~", "-")) != subject_token("a.b")   # no id can pose as it
    assert msg_id("n:1", 5, [[6], [9]]) == "n:1:5:9" and msg_id("n", 5, []) == "n:5:5"
    assert redact("nats://u:secret@10.0.0.1:4222") == "nats://***@10.0.0.1:4222"
    assert redact("tls://tok3n@h:1") == "tls://***@h:1" and redact("nats://h:4222") == "nats://h:4222"
    assert NatsTransport("nats://u:secret@127.0.0.1:1").target() == "nats://***@127.0.0.1:1"


def test_split_batch_chains_parts_under_the_limit():
    b = batch(40, 100)
    whole = len(msgpack.packb(b))
    assert split_batch(b, whole) == [(b, msgpack.packb(b))]
    parts = split_batch(b, whole // 5)
    assert len(parts) >= 5
    after, events = 40, []
    for part, payload in parts:
        assert len(payload) <= whole // 5 and msgpack.unpackb(payload) == part
        assert part["after"] == after and part["events"][0][0] > after
        after = part["events"][-1][0]
        events += part["events"]
    assert events == b["events"]
    with pytest.raises(ValueError):
        split_batch(batch(0, 3), 20)


# -- transport and feed in process ---------------------------------------------------------------------------------
def test_server_fsyncs_before_acknowledging(server):
    """The fixture's server runs as the module docstring says a production one must."""
    js = server.varz()["jetstream"]["config"]
    assert js["sync_always"] is True, js


def test_publish_and_feed_store_every_event_once(server, tmp_path):
    store = CollectorStore(tmp_path / "c" / const.COLLECTOR_DB)

    async def main():
        feed = await started(NatsFeed(store, server.url))
        t = NatsTransport(server.url)
        try:
            acked = [await t.send(batch(k * 200, 200)) for k in range(5)]
            assert acked == [200, 400, 600, 800, 1000]
            await until(lambda: store.count() == 1000, what="1,000 events stored")
            info = await stream_info(server.url)
            cfg = info.config
            assert cfg.storage == "file" and cfg.num_replicas == 1 and cfg.duplicate_window == 600
            assert cfg.subjects == ["edgerec.events.>"] and info.state.messages == 5

            # the same batch again: the stream's duplicate window drops it (Nats-Msg-Id node-a:400:600)
            assert await t.send(batch(400, 200)) == 600
            assert t.duplicates == 1 and t.published == 6
            assert (await stream_info(server.url)).state.messages == 5

            # an overlapping re-send (another msg id): stored in the stream, the collector stores only the new part
            assert await t.send(batch(800, 300)) == 1100
            assert (await stream_info(server.url)).state.messages == 6
            await until(lambda: store.count() == 1100, what="the new 100 events")
            h = feed.health()
            assert h["batches"] == 6 and h["stored"] == 1100 and h["duplicates"] == 200 and h["terminated"] == {}
        finally:
            await t.close()
            await feed.stop()

    run(main())
    got = rows(store)
    assert [r[1] for r in got] == list(range(1, 1101))
    want = batch(0, 1100)["events"]
    assert [(r[0], r[2], r[3], r[4], r[5]) for r in got] == [(NODE, u, i, e, ts) for _, u, i, e, ts in want]
    assert store.cursor(NODE) == {"acked": 1100, "events": 1100, "dropped": 0}
    store.close()


def test_server_sigkill_keeps_acknowledged_batches_and_transport_reconnects(server, tmp_path):
    store = CollectorStore(tmp_path / "c" / const.COLLECTOR_DB)

    async def main():
        t = NatsTransport(server.url)
        feed = await started(NatsFeed(store, server.url))   # creates the stream
        await feed.stop()   # and is away: acknowledged batches wait in the stream only
        try:
            for k in range(10):
                assert await t.send(batch(k * 500, 500)) == (k + 1) * 500
            server.kill()   # right after the last PubAck
            t0 = time.monotonic()
            with pytest.raises(Exception):
                await t.send(batch(5000, 500))
            assert time.monotonic() - t0 < 5   # fails fast while the server is away: the shipper backs off
            server.start()   # same port, same store directory
            deadline, sent = time.monotonic() + 15, None
            while sent is None:
                try:
                    sent = await t.send(batch(5000, 500))
                except Exception:
                    assert time.monotonic() < deadline, "the transport did not reconnect"
                    await asyncio.sleep(0.2)
            assert sent == 5500
            assert (await stream_info(server.url)).state.messages == 11
            feed2 = await started(NatsFeed(store, server.url))
            try:
                await until(lambda: store.count() == 5500, what="every acknowledged event")
            finally:
                await feed2.stop()
        finally:
            await t.close()

    run(main())
    assert [r[1] for r in rows(store)] == list(range(1, 5501))
    store.close()


def test_feed_restart_resumes_from_its_durable_consumer(server, tmp_path):
    store = CollectorStore(tmp_path / "c" / const.COLLECTOR_DB)

    async def main():
        t = NatsTransport(server.url)
        feed = await started(NatsFeed(store, server.url))
        for k in range(4):
            await t.send(batch(k * 100, 100))
        await until(lambda: store.count() == 400, what="the first 400")
        await feed.stop()
        for k in range(4, 8):   # published while no feed runs
            await t.send(batch(k * 100, 100))
        await asyncio.sleep(0.3)
        assert store.count() == 400
        feed2 = await started(NatsFeed(store, server.url))
        try:
            await until(lambda: store.count() == 800, what="the next 400")
            await asyncio.sleep(0.5)   # nothing else arrives
            h = feed2.health()
            # it resumed after the last acknowledged message: nothing re-read, nothing lost
            assert h["messages"] == 4 and h["batches"] == 4 and h["duplicates"] == 0 and h["stored"] == 400, h
        finally:
            await feed2.stop()
            await t.close()

    run(main())
    assert [r[1] for r in rows(store)] == list(range(1, 801))
    store.close()


def test_malformed_messages_are_terminated_and_counted(server, tmp_path):
    store = CollectorStore(tmp_path / "c" / const.COLLECTOR_DB, nodes=[NODE, "shop 7/a.b"])

    async def main():
        feed = await started(NatsFeed(store, server.url))
        t = NatsTransport(server.url)
        subj = subject_for(NODE)
        try:
            await t.send(batch(0, 10))
            await raw_publish(server.url, subj, b"\xc1 not msgpack")
            await raw_publish(server.url, subj, msgpack.packb([1, 2, 3]))
            bad = batch(10, 5)
            bad["events"][2][1] = "shopper-17"   # a raw shopper id: never collected
            await raw_publish(server.url, subj, msgpack.packb(bad))
            await raw_publish(server.url, subject_for("intruder"), msgpack.packb(batch(0, 5, node="intruder")))
            await raw_publish(server.url, subject_for("shop 7/a.b"), msgpack.packb(batch(10, 5)))  # node-a elsewhere
            changed = batch(0, 10, item="other")   # seqs 1..10 again with other items: a renumbered log
            await raw_publish(server.url, subj, msgpack.packb(changed), "renumbered")
            assert await t.send(batch(10, 5)) == 15   # the feed keeps going
            assert await t.send(batch(0, 20, node="shop 7/a.b")) == 20   # a sanitized subject
            await until(lambda: store.count() == 35, what="the good batches")
            await asyncio.sleep(0.3)
            h = feed.health()
            assert h["terminated"] == {"undecodable": 2, "invalid": 1, "unknown_node": 1, "subject": 1,
                                       "conflict": 1}, h
            assert h["state"] == "ok" and h["batches"] == 3 and "stream seq 7" in h["last_terminated"]
            nc = await nats.connect(server.url)
            ci = await nc.jetstream().consumer_info(const.NATS_STREAM, "edgerec-collector")
            await nc.close()
            assert ci.num_pending == 0 and ci.num_ack_pending == 0   # terminated: never redelivered
        finally:
            await t.close()
            await feed.stop()

    run(main())
    got = rows(store)
    assert sorted((r[0], r[1]) for r in got) == sorted([(NODE, s) for s in range(1, 16)]
                                                      + [("shop 7/a.b", s) for s in range(1, 21)])
    assert all(PSEUDONYM.match(r[2]) for r in got) and "other1" not in {r[3] for r in got}
    store.close()


def test_sequence_gaps_wait_for_late_messages_then_are_counted(server, tmp_path):
    store = CollectorStore(tmp_path / "c" / const.COLLECTOR_DB)

    async def main():
        feed = await started(NatsFeed(store, server.url, gap_deliveries=3, gap_delay=1.0, ack_wait=1.5))
        subj = subject_for(NODE)
        try:
            # out of order in the stream: 101..200 first, 1..100 later: the later one is waited for, nothing lost
            await raw_publish(server.url, subj, msgpack.packb(batch(100, 100)))
            await until(lambda: feed.health()["gap_naks"] >= 1, what="a gap nak")
            await raw_publish(server.url, subj, msgpack.packb(batch(0, 100)))
            await until(lambda: store.count() == 200, what="both batches")
            assert feed.health()["gaps"] == 0 and [r[1] for r in rows(store)] == list(range(1, 201))

            # 201..300 never arrives: after 3 deliveries the batch is stored from the collector's cursor, counted
            await raw_publish(server.url, subj, msgpack.packb(batch(300, 50)))
            await until(lambda: store.count() == 250, what="the batch after the gap")
            h = feed.health()
            assert h["gaps"] == 1 and h["gap_events"] == 100 and h["gap_naks"] >= 3, h
            assert store.cursor(NODE)["acked"] == 350
            await raw_publish(server.url, subj, msgpack.packb(batch(350, 10)))   # and the node goes on
            await until(lambda: store.count() == 260, what="the next batch")
        finally:
            await feed.stop()

    run(main())
    assert [r[1] for r in rows(store)] == list(range(1, 201)) + list(range(301, 361))
    store.close()


class FlakyStore(CollectorStore):
    """A collector whose first ``fail`` ingest calls fail as a full disk would."""

    fail = 2

    def ingest(self, p, now=None):
        if self.fail:
            self.fail -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().ingest(p, now)


def test_store_failure_is_retried_in_order(server, tmp_path):
    """A failing store holds the feed on that message: nothing behind it (here an erasure) is applied before it."""
    store = FlakyStore(tmp_path / "c" / const.COLLECTOR_DB)

    async def main():
        t = NatsTransport(server.url)
        feed = await started(NatsFeed(store, server.url))
        await feed.stop()   # publish first, so the failing batch and what follows it arrive in one fetch
        for k in range(3):
            await t.send(batch(k * 100, 100))
        await t.forget(NODE, user(0))
        await t.send(batch(300, 100))
        feed = await started(NatsFeed(store, server.url))
        try:
            await until(lambda: store.count() == 400 and feed.health()["forgets"] == 1, what="all of it", timeout=30)
            h = feed.health()
            assert h["store_errors"] == 2 and h["gaps"] == 0 and h["terminated"] == {} and h["state"] == "ok", h
            assert h["forgotten"] == 300 // 7 + 1   # user(0)'s events among seqs 1..300
        finally:
            await t.close()
            await feed.stop()

    run(main())
    got = rows(store)
    assert [r[1] for r in got if r[2] != user(0)] == [s for s in range(1, 401) if (s - 1) % 7]
    assert [r[1] for r in got if r[2] == user(0)] == [s for s in range(301, 401) if (s - 1) % 7 == 0]
    store.close()


def test_forget_waits_for_every_earlier_message(server, tmp_path):
    store = CollectorStore(tmp_path / "c" / const.COLLECTOR_DB)

    async def main():
        feed = await started(NatsFeed(store, server.url, gap_deliveries=4, gap_delay=0.5, ack_wait=1.0))
        t = NatsTransport(server.url)
        try:
            await raw_publish(server.url, subject_for("node-b"), msgpack.packb(batch(50, 10, node="node-b")))  # a gap
            await t.send(batch(0, 70))
            await t.forget(NODE, user(3))
            await until(lambda: feed.health()["forgets"] == 1, what="the erasure", timeout=20)
            h = feed.health()
            assert h["forget_waits"] >= 1 and h["gaps"] == 1, h   # it waited until node-b's batch was stored:
            assert h["forgotten"] == 10 + 2                        # user(3)'s events there (seqs 54, 61) went too
        finally:
            await t.close()
            await feed.stop()

    run(main())
    got = rows(store)
    assert len(got) == 80 - 12 and user(3) not in {r[2] for r in got}
    store.close()


class StallingStore(CollectorStore):
    """Stalls (then fails) on the batch continuing after ``stall_after``: the feed dies holding it."""

    stall_after = None

    def ingest(self, p, now=None):
        if p.get("after") == self.stall_after:
            self.stall_after = None
            time.sleep(0.5)
            raise sqlite3.OperationalError("the feed died here")
        return super().ingest(p, now)


def test_feed_crash_holding_messages_loses_nothing(server, tmp_path):
    """A feed killed while it holds unacknowledged messages: the next feed sees later batches first (a gap) and
    waits until the server redelivers the held ones (after the ack wait); nothing lost, nothing twice."""
    store = StallingStore(tmp_path / "c" / const.COLLECTOR_DB)
    opts = dict(gap_deliveries=8, gap_delay=0.5, ack_wait=2.0)

    async def main():
        t = NatsTransport(server.url)
        feed = await started(NatsFeed(store, server.url, **opts))
        for k in range(3):
            await t.send(batch(k * 100, 100))
        await until(lambda: store.count() == 300, what="the first 300")
        store.stall_after = 300
        await t.send(batch(300, 100))
        await until(lambda: store.stall_after is None, what="the stall")
        feed._task.cancel()   # the crash: no ack, no nak, the connection just goes
        await asyncio.gather(feed._task, return_exceptions=True)
        await feed._nc.close()
        feed2 = await started(NatsFeed(store, server.url, **opts))
        try:
            await t.send(batch(400, 100))
            await until(lambda: store.count() == 500, what="all 500", timeout=30)
            h = feed2.health()
            assert h["gaps"] == 0 and h["gap_naks"] >= 1 and h["duplicates"] == 0, h
        finally:
            await t.close()
            await feed2.stop()

    run(main())
    assert [r[1] for r in rows(store)] == list(range(1, 501))
    store.close()


def test_feed_refuses_a_stream_that_loses_acknowledged_batches(server, tmp_path):
    from nats.js.api import StorageType, StreamConfig

    from edge_runtime.errors import ConfigError

    store = CollectorStore(tmp_path / "c" / const.COLLECTOR_DB)

    async def main():
        nc = await nats.connect(server.url)
        await nc.jetstream().add_stream(StreamConfig(name=const.NATS_STREAM, subjects=["edgerec.events.>"],
                                                     storage=StorageType.MEMORY))
        await nc.close()
        feed = NatsFeed(store, server.url)
        await feed.start()
        with pytest.raises(ConfigError, match="memory"):
            await feed.wait()
        await feed.stop()

    run(main())
    store.close()


# -- real processes: edgerec serve -> nats-server -> edgerec collect -----------------------------------------------
class NatsRig:
    """The upstream side for ``shipping_scenarios``: a nats-server (one store directory, one port) and an
    ``edgerec collect`` process; ``kill_upstream`` SIGKILLs both."""

    name = "nats"

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.server = NatsServer(tmp / "nats")
        self.dir = tmp / "collector"
        self.proc: subprocess.Popen | None = None

    def start_upstream(self) -> None:
        self.server.start()
        self.proc = start_collector(self.server.url, self.dir, self.tmp / "collect.log")

    def kill_upstream(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.server.kill()

    def upstream_port(self) -> int:
        return self.server.port

    def node_flags(self, port: int) -> list[str]:
        return ["--upstream-transport", "nats", "--nats-url", f"nats://127.0.0.1:{port}"]

    def collected(self) -> list[tuple]:
        return collected_rows(self.dir / const.COLLECTOR_DB)

    def close(self) -> int | None:
        """Stop the collector (SIGTERM; returns its exit status) and the server."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.server.kill()
        return code


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.removeprefix("scenario_"))
def test_shipping_nats(scenario, tiny_bundle, tmp_path):
    require_nats()
    rig = NatsRig(tmp_path)
    try:
        scenario(rig, tiny_bundle, tmp_path)
    finally:
        code = rig.close()
    assert code == 0, (tmp_path / "collect.log").read_text()[-3000:]


def test_nodes_to_collector_end_to_end(tiny_bundle, tmp_path):
    """Two ``edgerec serve`` nodes (one id that needs a sanitized subject) ship through JetStream to ``edgerec collect
    --node ...``: the collector holds exactly the tracked events, pseudonymous, in each node's order; a node not on
    the list is terminated, not stored; SIGTERM ends the collector with 0."""
    from edge_runtime.client import Client
    from edgerec.process import free_port, start_daemon, stop_daemon

    require_nats()
    rig = NatsRig(tmp_path)
    nodes, procs = {"node-a": None, "shop 7/a.b": None}, []
    items = json.loads((tiny_bundle / "item_ids.json").read_text())[:100]
    try:
        rig.server.start()
        rig.proc = start_collector(rig.server.url, rig.dir, tmp_path / "collect.log",
                                   ["--node", "node-a", "--node", "shop 7/a.b"])
        cfg = tmp_path / "ship.toml"
        cfg.write_text("[events]\nship_interval_seconds = 0.1\nship_batch = 64\n")
        for k, node in enumerate(nodes):
            port = free_port()
            procs.append(start_daemon(tiny_bundle, port, ["--state-dir", str(tmp_path / f"state{k}"), "--no-discovery",
                                                          "--node-id", node, "--config", str(cfg)]
                                      + rig.node_flags(rig.server.port), log_path=tmp_path / f"node{k}.log"))
            nodes[node] = port
        sent = {}
        for k, (node, port) in enumerate(nodes.items()):
            tr = Tracker(items)
            tr.send(port, 150 + 100 * k, batch=25)
            assert len(tr.acked) == 150 + 100 * k
            sent[node] = [tr._event(i) for i in range(tr.sent)]
        run(raw_publish(rig.server.url, subject_for("rogue"), msgpack.packb(batch(0, 5, node="rogue"))))
        got = wait_collected(rig, {e["ts"] for evs in sent.values() for e in evs},
                             count=sum(len(evs) for evs in sent.values()))   # both nodes send the same stamps
        with Client("127.0.0.1", nodes["shop 7/a.b"]) as c:
            up = c.call("health")["upstream"]
        assert up["transport"] == "nats" and up["state"] == "ok", up
    finally:
        for p in procs:
            stop_daemon(p)
        code = rig.close()
    log = (tmp_path / "collect.log").read_text()
    assert code == 0, log[-3000:]
    assert "terminated stream message" in log and "unknown_node" in log and "rogue" in log
    assert len(got) == 400
    for node, events in sent.items():
        mine = [r for r in got if r[0] == node]
        assert [r[1] for r in mine] == list(range(1, len(events) + 1))   # the node's log order, each once
        assert [(r[3], r[4], int(r[5])) for r in mine] == [(e["item"], e["event"], e["ts"]) for e in events]
        pseudonyms = {r[2] for r in mine}
        assert len(pseudonyms) == 17 and all(PSEUDONYM.match(u) for u in pseudonyms)
