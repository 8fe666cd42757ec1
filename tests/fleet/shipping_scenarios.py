"""Shipping scenarios over real processes, shared by every transport (``test_shipping.py``: the collector over
MessagePack-RPC; ``test_nats.py``: NATS JetStream).

A *rig* provides the upstream side:

* ``start_upstream()`` / ``kill_upstream()``: start it, or SIGKILL it (the collector process; for NATS the server
  and its consumer);
* ``upstream_port()``: the TCP port nodes connect to (a ``TcpRelay`` sits in front of it, so a test can cut the
  network);
* ``node_flags(proxy_port)``: the ``edgerec serve`` flags that ship to it;
* ``collected()``: rows ``(node, seq, user, item, event, ts)`` in the collector's SQLite file, in id order;
* ``close()``.

``Tracker`` sends events with client event ids, so an event whose reply was lost is retried without being stored
twice, and records which were acknowledged. Every scenario asserts that each acknowledged event reaches the collector
exactly once (lost = 0, duplicated = 0) and that no raw shopper id travels.
"""
from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
from pathlib import Path

from edge_runtime.client import Client, RpcError
from edgerec.process import TcpRelay as Proxy, free_port, start_daemon, stop_daemon

PSEUDONYM = re.compile(r"[0-9a-f]{32}\Z")
BASE_TS = 1_600_000_000   # event times in the past, distinct per event: they identify events at the collector


class Tracker:
    """Sends events to a node with event ids; ``acked`` holds the ts of every acknowledged one."""

    def __init__(self, items: list[str]):
        self.items = items
        self.sent = 0
        self.acked: set[int] = set()
        self.pending: list[dict] = []   # sent, reply lost: retried with the same event id

    def _event(self, i: int) -> dict:
        return {"user": f"shopper-{i % 17}", "item": self.items[i % len(self.items)],
                "event": ("view", "cart", "purchase")[i % 3], "ts": BASE_TS + i, "event_id": f"e{i}"}

    def send(self, port: int, n: int, batch: int = 10) -> None:
        """Send ``n`` new events (plus any pending retries) in batches; stops at the first connection failure."""
        new = [self._event(self.sent + j) for j in range(n)]
        self.sent += n
        todo, self.pending = self.pending + new, []
        i = 0
        try:
            with Client("127.0.0.1", port, timeout=10) as c:
                while i < len(todo):
                    chunk = todo[i:i + batch]
                    try:
                        c.call("track_batch", events=chunk)
                        self.acked.update(e["ts"] for e in chunk)
                    except RpcError:
                        self.pending += chunk
                    i += batch
        except OSError:   # connection lost: whatever was not acknowledged is retried next time
            self.pending += todo[i:]


def collected_rows(path: Path) -> list[tuple]:
    """Rows ``(node, seq, user, item, event, ts)`` of a collector's SQLite file in id order ([] before it exists)."""
    if not path.exists():
        return []
    c = sqlite3.connect(path, timeout=5)
    try:
        return c.execute("SELECT node, seq, user, item, event, ts FROM events ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        c.close()


def wait_collected(rig, want: set[int], timeout: float = 60.0, count: int = 0) -> list[tuple]:
    """Rows at the collector once every ts in ``want`` is there and at least ``count`` rows (several nodes may send
    the same timestamps), or once the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        rows = rig.collected()
        if (want <= {int(r[5]) for r in rows} and len(rows) >= count) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def check_exactly_once(rows: list[tuple], tracker: Tracker) -> None:
    stamps = [int(r[5]) for r in rows]
    got = set(stamps)
    lost = tracker.acked - got
    assert not lost, f"{len(lost)} acknowledged events never reached the collector: {sorted(lost)[:10]}"
    dup = len(stamps) - len(got)
    assert dup == 0, f"{dup} events stored twice at the collector"
    extra = got - {BASE_TS + i for i in range(tracker.sent)}
    assert not extra, f"events nobody sent: {sorted(extra)[:5]}"
    for node, seq, user, item, event, ts in rows:
        assert PSEUDONYM.match(user) and not user.startswith("shopper"), user
        assert event in ("view", "cart", "purchase")
    by_node: dict[str, list[int]] = {}
    for r in rows:
        by_node.setdefault(r[0], []).append(r[1])
    for seqs in by_node.values():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


class Node:
    """``edgerec serve`` shipping through ``proxy`` to the rig's upstream."""

    def __init__(self, rig, bundle: Path, state: Path, proxy: Proxy, tmp: Path, node_id: str = "node-a"):
        self.rig, self.bundle, self.state, self.proxy, self.node_id = rig, bundle, state, proxy, node_id
        self.config = tmp / f"{node_id}.toml"
        self.config.write_text("[events]\nship_interval_seconds = 0.1\nship_max_backoff = 0.5\nship_batch = 50\n")
        self.log = tmp / f"{node_id}.log"
        self.proc = None
        self.port = None

    def start(self) -> None:
        self.port = free_port()
        extra = ["--state-dir", str(self.state), "--no-discovery", "--node-id", self.node_id, "--config",
                 str(self.config)] + self.rig.node_flags(self.proxy.port)
        self.proc = start_daemon(self.bundle, self.port, extra, log_path=self.log)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_daemon(self.proc)

    def upstream(self) -> dict:
        with Client("127.0.0.1", self.port) as c:
            return c.call("health")["upstream"]


def _setup(rig, bundle: Path, tmp: Path, node_id: str = "node-a") -> tuple[Proxy, Node, Tracker]:
    rig.start_upstream()
    proxy = Proxy(rig.upstream_port())
    node = Node(rig, bundle, tmp / node_id, proxy, tmp, node_id)
    node.start()
    items = json.loads((bundle / "item_ids.json").read_text())[:200]
    return proxy, node, Tracker(items)


def scenario_ships_everything_once(rig, bundle: Path, tmp: Path) -> None:
    """Events tracked at a node reach the collector once each, in sequence order, pseudonymous, with what training
    needs; the node's health shows the cursor."""
    proxy, node, tr = _setup(rig, bundle, tmp)
    try:
        tr.send(node.port, 300)
        assert len(tr.acked) == 300
        rows = wait_collected(rig, tr.acked)
        check_exactly_once(rows, tr)
        assert len(rows) == 300
        users = {r[2] for r in rows}
        assert len(users) == 17   # one pseudonym per shopper
        first = next(r for r in rows if int(r[5]) == BASE_TS)
        assert first[3] == tr.items[0] and first[4] == "view"
        deadline = time.monotonic() + 10
        while (up := node.upstream())["pending"] != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert up["state"] == "ok" and up["acked"] == max(r[1] for r in rows) and up["shipped"] >= 300, up
        with Client("127.0.0.1", node.port) as c:
            st = c.call("stats")
        assert st["edgerec_upstream_shipped_events_total"] == up["shipped"] and st["edgerec_upstream_pending_events"] == 0
        assert {"state": "ok", "value": 1.0} in st["edgerec_upstream_state"], st["edgerec_upstream_state"]
    finally:
        node.stop()
        proxy.close()


def scenario_node_sigkill(rig, bundle: Path, tmp: Path, rounds: int = 3) -> None:
    """SIGKILL the node between and during shipping; after each restart it resumes from the last acknowledged
    sequence number: nothing lost, nothing stored twice."""
    proxy, node, tr = _setup(rig, bundle, tmp)
    try:
        for _ in range(rounds):
            tr.send(node.port, 120)
            time.sleep(0.15)   # part of it shipped, part pending
            node.kill()
            node.start()
        tr.send(node.port, 50)
        check_exactly_once(wait_collected(rig, tr.acked), tr)
    finally:
        node.stop()
        proxy.close()


def scenario_upstream_restart(rig, bundle: Path, tmp: Path) -> None:
    """SIGKILL the upstream side while events flow, track more while it is down, restart it: the node backs off,
    reports it, and ships everything once after it is back."""
    proxy, node, tr = _setup(rig, bundle, tmp)
    try:
        tr.send(node.port, 100)
        rig.kill_upstream()
        tr.send(node.port, 100)   # the node acknowledges: its own log stores them
        assert len(tr.acked) == 200
        deadline = time.monotonic() + 10
        while node.upstream()["state"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.upstream()["state"] in ("offline", "refused")
        rig.start_upstream()
        proxy.target_port = rig.upstream_port()
        tr.send(node.port, 50)
        check_exactly_once(wait_collected(rig, tr.acked), tr)
    finally:
        node.stop()
        proxy.close()


def scenario_network_cut(rig, bundle: Path, tmp: Path) -> None:
    """Cut the network between node and upstream (live connections reset, new ones refused) for a while: events
    keep being acknowledged by the node and reach the collector once the link is back."""
    proxy, node, tr = _setup(rig, bundle, tmp)
    try:
        tr.send(node.port, 100)
        proxy.cut()
        for _ in range(5):
            tr.send(node.port, 40)
            time.sleep(0.2)
        up = node.upstream()
        assert up["state"] in ("offline", "refused") and up["pending"] > 0, up
        proxy.heal()
        check_exactly_once(wait_collected(rig, tr.acked), tr)
        assert len(tr.acked) == 300
    finally:
        node.stop()
        proxy.close()


def scenario_forget_reaches_the_collector(rig, bundle: Path, tmp: Path) -> None:
    """A shopper's ``forget`` at the node erases the events already shipped too, also when the upstream side is
    down at that moment (the erasure is queued durably, survives a node SIGKILL, and is sent once it is back)."""
    proxy, node, tr = _setup(rig, bundle, tmp)
    try:
        tr.send(node.port, 170)   # shoppers 0..16, 10 events each
        rows = wait_collected(rig, tr.acked)
        assert len(rows) == 170
        with Client("127.0.0.1", node.port) as c:
            assert c.call("forget", user="shopper-3")["upstream"] == "queued"
        deadline = time.monotonic() + 30
        while len(rig.collected()) != 160 and time.monotonic() < deadline:
            time.sleep(0.2)
        left = rig.collected()
        assert len(left) == 160 and all((int(r[5]) - BASE_TS) % 17 != 3 for r in left)   # shopper-3: i % 17 == 3
        proxy.cut()
        with Client("127.0.0.1", node.port) as c:
            assert c.call("forget", user="shopper-4")["upstream"] == "queued"
        node.kill()                # the erasure is owed; it must survive the node's crash
        node.start()
        assert node.upstream()["forgets_pending"] == 1
        proxy.heal()
        deadline = time.monotonic() + 30
        while len(rig.collected()) != 150 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(rig.collected()) == 150 and node.upstream()["forgets_pending"] == 0
    finally:
        node.stop()
        proxy.close()


SCENARIOS = [scenario_ships_everything_once, scenario_node_sigkill, scenario_upstream_restart,
             scenario_network_cut, scenario_forget_reaches_the_collector]
