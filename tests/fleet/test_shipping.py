"""Shipping over the embedded transport: nodes -> MessagePack-RPC -> the collector in ``edgerec registry
--collect`` (real processes, a real SQLite file, SIGKILL, a network cut through a TCP relay). The scenarios are in
``shipping_scenarios.py``; ``test_nats.py`` runs the same ones through NATS JetStream."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from shipping_scenarios import SCENARIOS, collected_rows

from edge_runtime import const
from edgerec.process import free_port, start_daemon, stop_daemon


class RpcRig:
    """The collector inside a registry process (``edgerec registry --collect DIR``)."""

    name = "rpc"

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.dir = tmp / "collector"
        self.port = free_port()
        self.proc = None

    def start_upstream(self) -> None:
        self.proc = start_daemon(None, self.port, ["--bundles", str(self.tmp / "bundles"), "--collect", str(self.dir),
                                                   "--no-discovery"], command="registry",
                                 log_path=self.tmp / "registry.log")

    def kill_upstream(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def upstream_port(self) -> int:
        return self.port

    def node_flags(self, port: int) -> list[str]:
        return ["--upstream", f"127.0.0.1:{port}"]

    def collected(self) -> list[tuple]:
        return collected_rows(self.dir / const.COLLECTOR_DB)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_daemon(self.proc)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.removeprefix("scenario_"))
def test_shipping_rpc(scenario, tiny_bundle, tmp_path):
    rig = RpcRig(tmp_path)
    try:
        scenario(rig, tiny_bundle, tmp_path)
    finally:
        rig.close()


def _wait(cond, timeout: float = 30.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_node_never_ships_under_an_id_or_cursor_that_is_not_its_own(tiny_bundle, tmp_path):
    """A wiped state directory that keeps its node id, and a node id changed under a log already shipped, are
    refused with a message saying what to do: nothing is skipped, nothing stored twice."""
    from shipping_scenarios import Node, Tracker, wait_collected

    from edgerec.process import TcpRelay

    rig = RpcRig(tmp_path)
    rig.start_upstream()
    relay = TcpRelay(rig.port)
    items = json.loads((tiny_bundle / "item_ids.json").read_text())[:50]
    try:
        a = Node(rig, tiny_bundle, tmp_path / "a", relay, tmp_path, "node-a")
        a.start()
        tr = Tracker(items)
        tr.send(a.port, 30)
        wait_collected(rig, tr.acked)
        a.stop()
        wiped = Node(rig, tiny_bundle, tmp_path / "wiped", relay, tmp_path, "node-a")   # same id, empty log
        wiped.start()
        Tracker(items).send(wiped.port, 5)
        _wait(lambda: wiped.upstream()["state"] == "refused")
        up = wiped.upstream()
        assert up["state"] == "refused" and "beyond this node's log" in up["last_error"], up
        wiped.stop()
        renamed = Node(rig, tiny_bundle, tmp_path / "a", relay, tmp_path, "node-b")      # same log, new id
        renamed.start()
        _wait(lambda: renamed.upstream()["state"] == "refused")
        assert "shipped as node 'node-a'" in renamed.upstream()["last_error"]
        renamed.stop()
        assert len(rig.collected()) == 30 and {r[0] for r in rig.collected()} == {"node-a"}
    finally:
        relay.close()
        rig.close()


def test_long_item_ids_are_shipped_in_batches_that_fit_a_frame(tiny_bundle, tmp_path):
    """1,000 events whose item ids are 256 four-byte characters (1 KiB each) exceed one 1 MiB frame: the shipper
    cuts the batch by bytes, and everything arrives."""
    from shipping_scenarios import Node

    from edgerec.process import TcpRelay
    from edge_runtime.client import Client

    rig = RpcRig(tmp_path)
    rig.start_upstream()
    relay = TcpRelay(rig.port)
    try:
        node = Node(rig, tiny_bundle, tmp_path / "n", relay, tmp_path)
        node.config.write_text("[events]\nship_interval_seconds = 0.1\nship_batch = 1000\n")
        node.start()
        with Client("127.0.0.1", node.port) as c:
            for k in range(4):
                c.call("track_batch", events=[{"user": f"u{j}", "item": "\U0001F600" * 251 + f"{k:02d}{j:03d}",
                                               "event": "view"} for j in range(250)])
        _wait(lambda: len(rig.collected()) == 1000)
        assert len(rig.collected()) == 1000 and node.upstream()["state"] == "ok"
        assert node.upstream()["batches"] >= 2
        node.stop()
    finally:
        relay.close()
        rig.close()


def test_a_damaged_shipping_state_is_set_aside(tiny_bundle, tmp_path):
    from shipping_scenarios import Node, Tracker, wait_collected

    from edgerec.process import TcpRelay

    rig = RpcRig(tmp_path)
    rig.start_upstream()
    relay = TcpRelay(rig.port)
    items = json.loads((tiny_bundle / "item_ids.json").read_text())[:50]
    try:
        node = Node(rig, tiny_bundle, tmp_path / "n", relay, tmp_path)
        node.start()
        tr = Tracker(items)
        tr.send(node.port, 20)
        wait_collected(rig, tr.acked)
        node.kill()
        (tmp_path / "n" / const.UPSTREAM_STATE).write_text('{"node": "node-a", "acked": 1')
        node.start()
        tr.send(node.port, 10)
        rows = wait_collected(rig, tr.acked)
        assert len(rows) == 30 and node.upstream()["state"] == "ok"   # resumed from the collector's cursor
        assert list((tmp_path / "n").glob(const.UPSTREAM_STATE + ".bad-*"))
        assert oct((tmp_path / "n" / const.UPSTREAM_STATE).stat().st_mode & 0o777) == "0o600"
        node.stop()
    finally:
        relay.close()
        rig.close()
