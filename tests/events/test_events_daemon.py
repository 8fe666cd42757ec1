"""The event log through real daemons: sessions survive SIGTERM and SIGKILL, the SIGKILL test loses and duplicates
nothing, forget / compaction / restarts never write a raw shopper id anywhere, and the faults of a full, read-only
or corrupt state directory answer clearly, keep recommend serving, show in health and the counter, and recover."""
from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import fill, tmpfs  # noqa: F401,F811  (tmpfs: the fixture the tests take)

from edge_runtime import const
from edge_runtime.client import Client, RpcError
from edge_runtime.errors import EVENT_LOG_UNAVAILABLE
from edgerec.process import free_port, start_daemon, stop_daemon

BENCH = Path(__file__).resolve().parents[2] / "bench"


def serve(bundle: Path, state: Path, log_path: Path | None = None, config: Path | None = None):
    port = free_port()
    extra = ["--state-dir", str(state), "--no-discovery"] + (["--config", str(config)] if config else [])
    return start_daemon(bundle, port, extra, log_path=log_path), port


def test_sessions_survive_sigterm_and_sigkill(tiny_bundle, tiny_manifest, tmp_path):
    items = json.loads((tiny_bundle / "item_ids.json").read_text())[:6]
    state = tmp_path / "state"
    proc, port = serve(tiny_bundle, state)
    with Client("127.0.0.1", port) as c:
        for it in items[:4]:
            assert c.call("track", user="shopper-a", item=it, event="view") == {"ok": True}
        assert c.call("track_batch", events=[{"user": "shopper-b", "item": items[4], "event": "cart",
                                              "event_id": "b-1"}]) == {"ok": True, "count": 1}
        before = c.call("recommend", user="shopper-a", k=5)
        h = c.call("health")["events"]
        assert h["state"] == "ok" and h["committed"] == 5 and h["synchronous"] == "FULL"
    stop_daemon(proc)                     # SIGTERM
    proc, port = serve(tiny_bundle, state)
    with Client("127.0.0.1", port) as c:
        assert [e["item"] for e in c.call("session", user="shopper-a")["events"]] == items[:4]
        assert c.call("recommend", user="shopper-a", k=5)["items"] == before["items"]
        assert c.call("health")["sessions"] == 2
        c.call("track", user="shopper-a", item=items[5], event="purchase")
        # a retry of an event already stored: acknowledged, not stored or applied twice
        c.call("track", user="shopper-b", item=items[4], event="cart", event_id="b-1")
        assert len(c.call("session", user="shopper-b")["events"]) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc, port = serve(tiny_bundle, state)
    with Client("127.0.0.1", port) as c:
        got = c.call("session", user="shopper-a")["events"]
        assert [e["item"] for e in got] == items[:4] + [items[5]] and got[-1]["event"] == "purchase"
        assert c.call("recommend", user="shopper-a", k=5)["source"] == "model"
        assert c.call("health")["events"]["duplicates"] == 0
    stop_daemon(proc)


def test_sigkill_under_load_loses_and_duplicates_nothing(tiny_bundle, tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_events
    finally:
        sys.path.remove(str(BENCH))
    res = bench_events.kill_trials(tiny_bundle, tmp_path / "kill", trials=20, seed=1)
    assert res["acknowledged"] > 20 * 100, res
    assert res["lost"] == 0 and res["duplicated"] == 0, res["failures"]
    assert res["found_in_log"] == res["found_in_session"] == res["acknowledged"]


def _scan(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p}: {n!r}" for n in needles if n in data]
    return hits


def test_no_raw_shopper_id_reaches_the_disk_or_the_logs(tiny_bundle, tmp_path):
    items = json.loads((tiny_bundle / "item_ids.json").read_text())[:3]
    raw = ["raw-shopper-QX7ZK2", "raw-shopper-WV93LM", "raw-shopper-forget-P0D4"]
    state = tmp_path / "state"
    cfg = tmp_path / "edgerec.toml"
    cfg.write_text("[events]\nretention_seconds = 3.0\n")
    logs = [tmp_path / f"daemon-{i}.log" for i in range(3)]
    proc, port = serve(tiny_bundle, state, logs[0], cfg)
    with Client("127.0.0.1", port) as c:
        for user in raw:
            c.call("track_batch", events=[{"user": user, "item": it, "event": "view", "event_id": f"{user}-{i}"}
                                          for i, it in enumerate(items)])
        c.call("recommend", user=raw[0], k=3)
        res = c.call("forget", user=raw[2])
        assert res == {"ok": True, "removed": 3, "session_events": 3}
        assert c.call("session", user=raw[2]) == {"events": []}
        assert c.call("forget", user=raw[2])["removed"] == 0
    stop_daemon(proc)
    with sqlite3.connect(state / const.EVENT_DB) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 6
    proc, port = serve(tiny_bundle, state, logs[1], cfg)     # restored, then nothing older than 3 s survives
    with Client("127.0.0.1", port) as c:
        assert len(c.call("session", user=raw[0])["events"]) == 3
    stop_daemon(proc)
    time.sleep(3.5)
    proc, port = serve(tiny_bundle, state, logs[2], cfg)     # compaction at start: the TTL passed
    with Client("127.0.0.1", port) as c:
        assert c.call("session", user=raw[0]) == {"events": []}
        deadline = time.monotonic() + 10
        while c.call("health")["events"]["rows"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.call("health")["events"]["rows"] == 0 and c.call("health")["events"]["compacted"] == 6
    stop_daemon(proc)
    needles = [r.encode() for r in raw]
    assert _scan(state, needles) == [] and _scan(tmp_path, needles) == []
    assert (state / const.PSEUDONYM_KEY_FILE).stat().st_mode & 0o077 == 0
    assert (state / const.EVENT_DB).stat().st_mode & 0o077 == 0


def _refused(c: Client) -> float:
    return c.call("stats")["edgerec_events_refused_total"]


def test_full_disk_refuses_clearly_keeps_serving_and_recovers(tiny_bundle, tmpfs):
    items = json.loads((tiny_bundle / "item_ids.json").read_text())[:3]
    proc, port = serve(tiny_bundle, tmpfs / "state")
    try:
        with Client("127.0.0.1", port) as c:
            c.call("track", user="u", item=items[0], event="view")
            filler = fill(tmpfs)
            big = [{"user": f"user-{i}", "item": f"{'x' * 200}-{i}", "event": "view"} for i in range(2000)]
            err = None
            for _ in range(20):
                try:
                    c.call("track_batch", events=big)
                except RpcError as exc:
                    err = exc
                    break
            assert err is not None and err.code == EVENT_LOG_UNAVAILABLE and err.name == "EventLogUnavailable"
            assert "not stored" in err.message
            h = c.call("health")
            assert h["status"] == "ok" and h["events"]["state"] == "degraded"
            assert _refused(c) >= 2000
            with pytest.raises(RpcError) as again:
                c.call("track", user="u", item=items[1], event="view")
            assert again.value.code == EVENT_LOG_UNAVAILABLE
            assert [e["item"] for e in c.call("session", user="u")["events"]] == [items[0]]   # nothing half-applied
            assert len(c.call("recommend", user="u", k=5)["items"]) == 5                       # still serving
            filler.unlink()
            time.sleep(const.REOPEN_SECONDS + 0.2)
            assert c.call("track", user="u", item=items[2], event="view") == {"ok": True}
            assert c.call("health")["events"]["state"] == "ok"
            assert [e["item"] for e in c.call("session", user="u")["events"]] == [items[0], items[2]]
    finally:
        stop_daemon(proc)


def test_read_only_state_directory_serves_and_recovers(tiny_bundle, tmpfs):
    items = json.loads((tiny_bundle / "item_ids.json").read_text())[:2]
    state = tmpfs / "state"
    proc, port = serve(tiny_bundle, state)
    with Client("127.0.0.1", port) as c:
        c.call("track", user="u", item=items[0], event="view")
    stop_daemon(proc)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        proc, port = serve(tiny_bundle, state)
        with Client("127.0.0.1", port) as c:
            assert c.call("health")["events"]["state"] == "degraded"
            with pytest.raises(RpcError) as e:
                c.call("track", user="u", item=items[1], event="view")
            assert e.value.code == EVENT_LOG_UNAVAILABLE and "not writable" in e.value.message
            assert _refused(c) == 1
            assert len(c.call("recommend", user="u", k=3)["items"]) == 3
            subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
            time.sleep(const.REOPEN_SECONDS + 0.2)
            assert c.call("track", user="u", item=items[1], event="view") == {"ok": True}
            assert c.call("health")["events"]["state"] == "ok"
        stop_daemon(proc)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], capture_output=True)


def test_corrupt_log_at_boot_is_moved_aside_and_reported(tiny_bundle, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / const.EVENT_DB).write_bytes(b"\x00garbage, not a database" * 500)
    log_path = tmp_path / "d.log"
    proc, port = serve(tiny_bundle, state, log_path)
    try:
        with Client("127.0.0.1", port) as c:
            rec = c.call("health")["events"]["recovered"]
            assert rec is not None and rec["salvaged_rows"] == 0 and Path(rec["moved_to"]).is_file()
            assert c.call("track", user="u", item="1", event="view") == {"ok": True}
    finally:
        stop_daemon(proc)
    assert "failed its integrity check" in log_path.read_text()
    shutil.rmtree(state)
