"""events/log.py on real SQLite files: commit and reopen, sequence numbers monotonic across restarts, idempotent
event ids, restore for sessions, forget, retention and size compaction, a corrupt database salvaged at boot, and a
real full / read-only filesystem (tmpfs, when this process may mount one) refused and recovered from."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from faults import fill, tmpfs  # noqa: F401,F811  (tmpfs: the fixture the tests take)

from edge_runtime import const
from edge_runtime.errors import EventLogUnavailable
from edge_runtime.events.log import Event, EventLog
from edge_runtime.events.pseudonym import Pseudonymizer, create_key, load_key


def run_with(log: EventLog, coro_fn):
    async def go():
        log.start(asyncio.get_running_loop())
        try:
            return await coro_fn()
        finally:
            await asyncio.get_running_loop().run_in_executor(None, log.close)
    return asyncio.run(go())


def rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT seq, user, item, event, event_id FROM events ORDER BY seq").fetchall()


def test_commit_reopen_monotonic_seq_and_idempotent_ids(tmp_path):
    db = tmp_path / "events.db"
    log = EventLog(db, "k1")
    log.open()

    async def first():
        a = await log.append([Event("u1", "i1", "view", 1.0), Event("u1", "i2", "cart", 2.0, "e-2")])
        b, c = await asyncio.gather(log.append([Event("u1", "i2", "cart", 2.0, "e-2")]),      # a retry
                                    log.append([Event("u2", "i3", "view", 3.0, "e-2"),        # same id, other user
                                                Event("u2", "i3", "view", 3.0, "e-2")]))      # twice in one call
        return a, b, c

    a, b, c = run_with(log, first)
    assert a == [True, True] and b == [False] and c == [True, False]
    got = rows(db)
    assert [r[1:] for r in got] == [("u1", "i1", "view", None), ("u1", "i2", "cart", "e-2"),
                                    ("u2", "i3", "view", "e-2")]
    assert log.status["committed"] == 3 and log.status["duplicates"] == 2
    with sqlite3.connect(db) as conn:   # journal mode persists in the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    log2 = EventLog(db, "k1")
    log2.open()
    assert log2.status["rows"] == 3

    async def second():
        assert await log2.forget("u2") == 1
        await log2.append([Event("u3", "i9", "purchase", 4.0)])

    run_with(log2, second)
    seqs = [r[0] for r in rows(db)]
    # AUTOINCREMENT: strictly increasing, and the forgotten seq 3 is never handed out again
    assert seqs[:2] == [1, 2] and seqs[-1] > 3 and len(set(seqs)) == len(seqs)


def test_restore_is_oldest_first_within_the_ttl_and_under_the_current_key(tmp_path):
    db = tmp_path / "events.db"
    log = EventLog(db, "new")
    log.open()
    now = time.time()
    with sqlite3.connect(db) as c:
        c.executemany("INSERT INTO events (user, key_id, item, event, ts, received) VALUES (?,?,?,?,?,?)",
                      [("u", "new", "old", "view", 1, now - 10_000), ("u", "old-key", "x", "view", 2, now - 5),
                       ("u", "new", "a", "view", 3, now - 3), ("v", "new", "b", "cart", 4, now - 2),
                       ("u", "new", "c", "purchase", 5, now - 1)])
    got = list(log.restore(now - 100))
    assert got == [("u", "a", "view", 3.0), ("v", "b", "cart", 4.0), ("u", "c", "purchase", 5.0)]
    log.close()


def test_retention_and_size_compaction_drop_the_oldest(tmp_path):
    db = tmp_path / "events.db"
    log = EventLog(db, "k", max_bytes=1 << 30, retention_seconds=3600)
    log.open()
    now = time.time()
    with sqlite3.connect(db) as c:
        c.executemany("INSERT INTO events (user, key_id, item, event, ts, received) VALUES (?,?,?,?,?,?)",
                      [(f"u{i}", "k", f"item-{i}", "view", 0, now - 7200 + (i if i < 100 else 3700))
                       for i in range(5000)])
    log._count_rows()
    log.compact()
    assert log.status["rows"] == 4900 and rows(db)[0][1] == "u100"      # the 100 rows past the TTL are gone
    log.max_bytes = log.status["bytes"] // 3
    log.compact()
    left = rows(db)
    assert log.status["bytes"] <= log.max_bytes and 0 < len(left) < 4900 / 2
    assert left[-1][1] == "u4999" and [r[0] for r in left] == sorted(r[0] for r in left)   # newest kept
    log.close()


def test_a_corrupt_database_is_moved_aside_and_salvaged(tmp_path):
    db = tmp_path / "events.db"
    log = EventLog(db, "k")
    log.open()
    run_with(log, lambda: log.append([Event(f"u{i}", "i", "view", float(i)) for i in range(3000)]))
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db.stat().st_size
    with open(db, "r+b") as f:   # damage pages at the end of the file (the newest rows)
        f.seek(size - 3 * 4096)
        f.write(os.urandom(3 * 4096))
    log2 = EventLog(db, "k")
    log2.open()
    rec = log2.health()["recovered"]
    assert rec is not None and Path(rec["moved_to"]).is_file() and 0 < rec["salvaged_rows"] < 3000
    assert log2.health()["state"] == "ok" and log2.status["rows"] == rec["salvaged_rows"]
    run_with(log2, lambda: log2.append([Event("new", "i", "view", 1.0)]))
    assert rows(db)[-1][1] == "new"

    garbage = tmp_path / "g.db"
    garbage.write_bytes(b"this is not a database" * 100)
    log3 = EventLog(garbage, "k")
    log3.open()
    assert log3.health()["recovered"]["salvaged_rows"] == 0 and log3.health()["state"] == "ok"
    log3.close()


def test_pseudonym_keys(tmp_path):
    p = create_key(tmp_path / "k")
    assert (p.stat().st_mode & 0o777) == 0o600
    ps = load_key(p)
    a, b = ps("shopper-1"), ps("shopper-1")
    assert a == b and len(a) == const.PSEUDONYM_HEX_CHARS and "shopper" not in a
    assert Pseudonymizer(os.urandom(32))("shopper-1") != a and len(ps.key_id) == 8
    with pytest.raises(FileExistsError):
        create_key(p)
    os.chmod(p, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_key(p)


def test_full_and_read_only_disk_refuse_then_recover(tmpfs):
    db = tmpfs / "events.db"
    log = EventLog(db, "k", synchronous="FULL")
    log.open()

    async def go():
        await log.append([Event("u", "i", "view", 1.0)])
        filler = fill(tmpfs)               # take every free byte
        big = [Event(f"user-{i:06d}" * 4, f"item-{i}" * 8, "view", float(i)) for i in range(5000)]
        with pytest.raises(EventLogUnavailable):
            for _ in range(20):
                await log.append(big)
        h = log.health()
        assert h["state"] == "degraded" and h["refused"] >= 5000 and "full" in h["last_error"].lower()
        filler.unlink()                    # space returns
        await asyncio.sleep(const.REOPEN_SECONDS + 0.1)
        assert await log.append([Event("u", "after-full", "view", 2.0)]) == [True]
        assert log.health()["state"] == "ok"
    run_with(log, go)
    # a read-only state directory (the kernel refuses a read-only remount while the log has files open for
    # writing, so the log is reopened on it, as at a boot on a read-only disk)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    ro = EventLog(db, "k")
    try:
        ro.open()

        async def read_only():
            with pytest.raises(EventLogUnavailable):
                await ro.append([Event("u", "read-only", "view", 3.0)])
            h = ro.health()
            assert h["state"] == "degraded" and h["refused"] == 1 and "not writable" in h["last_error"]
            subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
            await asyncio.sleep(const.REOPEN_SECONDS + 0.1)
            assert await ro.append([Event("u", "after-ro", "view", 4.0)]) == [True]
            assert ro.health()["state"] == "ok"

        run_with(ro, read_only)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], capture_output=True)
    items = [r[2] for r in rows(db)]
    assert "after-full" in items and "after-ro" in items and "read-only" not in items


def test_keygen_pseudonym_command(tmp_path):
    import sys

    from edgerec.process import PACKAGE_ROOT

    out = tmp_path / "ps.key"
    cmd = [sys.executable, "-m", "edgerec", "keygen", "--pseudonym", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=PACKAGE_ROOT, timeout=120)
    assert r.returncode == 0 and str(out) in r.stdout
    assert (out.stat().st_mode & 0o777) == 0o600 and len(load_key(out)("x")) == const.PSEUDONYM_HEX_CHARS
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=PACKAGE_ROOT, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr
