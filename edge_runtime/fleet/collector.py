"""The collector: the trainer side's durable store of the events nodes ship (``fleet/shipper.py``), served as
MessagePack-RPC methods by the registry process (``edgerec registry --collect DIR``) and fed from NATS JetStream
by ``fleet/nats_transport.py`` when that transport is used. The trainer reads the same file
(``trainer/finetune.py``).

One SQLite file in WAL mode, ``synchronous = FULL`` (an acknowledged batch survives power loss), mode 0600
(pseudonymous, still personal data)::

    events(id INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order at the collector (the loop's cursor)
           node TEXT, seq INTEGER,                 -- the node's id and its log's sequence number
           user TEXT, item TEXT, event TEXT, ts REAL, received REAL, UNIQUE(node, seq))
    nodes(node TEXT PRIMARY KEY, acked INTEGER, batches INTEGER, events INTEGER, duplicates INTEGER,
          dropped INTEGER, first_seen REAL, last_seen REAL)

Delivery is at-least-once from the node and idempotent here, keyed by (node id, sequence): a re-sent batch, or
the overlapping part of one, is acknowledged and not stored twice.

Methods (params: one map):

* ``ingest {node, after, events: [[seq, user, item, event, ts], ...], dropped?}`` -> ``{acked, stored,
  duplicates}``, answered only after the commit. ``after`` is the last sequence number the node had acknowledged
  when it cut the batch; sequence numbers inside a batch increase strictly and exceed ``after`` (gaps inside a batch
  are rows the node erased or compacted away, not losses here). ``dropped`` is the node's running count of events
  its size cap removed before they were shipped.
* ``ingest_cursor {node}`` -> ``{acked, events, dropped}``: where a node resumes.
* ``ingest_forget {node, user}`` -> ``{removed}``: erase every collected event of the pseudonym ``user`` (a
  shopper's ``forget`` at a node reaches the trainer side this way); freed pages are zeroed (``secure_delete``) and
  the WAL truncated, so no copy stays in the files. Models already trained on them are not retrained.

A batch is checked whole before anything is stored, and refused whole (``InvalidParams``, or ``SequenceMismatch``
for a gap or a conflicting re-send): malformed, an unknown node (not in the configured list), a sequence number out
of order, a shopper id that is not a pseudonym (32 lowercase hex characters, ``events/pseudonym.py``: the collector
never stores a raw shopper id), an event type not in view / cart / purchase, an event time in the future (beyond
``MAX_FUTURE_SKEW_SECONDS``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from .. import const
from ..errors import InvalidParams, SequenceMismatch
from ..events.pseudonym import is_pseudonym
from ..rpc.methods import MethodTable, as_id, as_int, check_keys, short, type_name
from ..serving.session import EVENTS

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user TEXT NOT NULL,
    item TEXT NOT NULL,
    event TEXT NOT NULL,
    ts REAL NOT NULL,
    received REAL NOT NULL,
    UNIQUE (node, seq)
);
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    acked INTEGER NOT NULL,
    batches INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""
MAX_SEQ = (1 << 63) - 1


def check_batch(p: Any, nodes: frozenset[str] | None, now: float | None = None) -> tuple[str, int, list[tuple], int | None]:
    """Validate an ``ingest`` batch whole -> (node, after, rows [(seq, user, item, event, ts)], dropped or None).

    Args:
        p: the request's parameter map.
        nodes: the node ids allowed to ship, or None to accept any well-formed id.
        now: the collector's clock (unix s; default ``time.time()``), for the future-time check.

    Raises:
        InvalidParams: anything malformed; the message names the event (``events[i]``) and the field.
    """
    if not isinstance(p, dict):
        raise InvalidParams(f"ingest: params must be a map, got {type_name(p)}")
    check_keys(p, ("node", "after", "events", "dropped"), ("node", "after", "events"), "ingest")
    node = as_id(p["node"], "node")
    if nodes is not None and node not in nodes:
        raise InvalidParams(f"ingest: unknown node {short(node)}: not in the collector's node list")
    after = as_int(p["after"], "after", 0, MAX_SEQ)
    dropped = as_int(p["dropped"], "dropped", 0, MAX_SEQ) if p.get("dropped") is not None else None
    events = p["events"]
    if not isinstance(events, list):
        raise InvalidParams(f"ingest: 'events' must be an array of [seq, user, item, event, ts], got "
                            f"{type_name(events)}")
    if len(events) > const.MAX_INGEST_EVENTS:
        raise InvalidParams(f"ingest: {len(events)} events; at most {const.MAX_INGEST_EVENTS} per batch")
    horizon = (time.time() if now is None else now) + const.MAX_FUTURE_SKEW_SECONDS
    rows, last = [], after
    for i, e in enumerate(events):
        where = f"events[{i}]"
        if not isinstance(e, (list, tuple)) or len(e) != 5:
            raise InvalidParams(f"ingest: {where} must be [seq, user, item, event, ts], got {short(e)}")
        seq, user, item, event, ts = e
        if not isinstance(seq, int) or isinstance(seq, bool) or not last < seq <= MAX_SEQ:
            raise InvalidParams(f"ingest: {where}: seq must be an integer above {last} (sequence numbers increase "
                                f"strictly and exceed 'after'), got {short(seq)}")
        if not is_pseudonym(user):
            raise InvalidParams(f"ingest: {where}: user must be a pseudonym ({const.PSEUDONYM_HEX_CHARS} lowercase "
                                "hex characters); raw shopper ids are never collected")
        item = as_id(item, f"{where}.item")
        if event not in EVENTS:
            raise InvalidParams(f"ingest: {where}: event must be one of {list(EVENTS)}, got {short(event)}")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts) or ts < 0:
            raise InvalidParams(f"ingest: {where}: ts must be a unix time in seconds, got {short(ts)}")
        if ts > horizon:
            raise InvalidParams(f"ingest: {where}: ts {ts:.0f} lies {ts - horizon + const.MAX_FUTURE_SKEW_SECONDS:.0f}"
                                f" s in the future (at most {const.MAX_FUTURE_SKEW_SECONDS:.0f} s of clock skew)")
        rows.append((seq, user, item, event, float(ts)))
        last = seq
    return node, after, rows, dropped


class CollectorStore:
    """The collected events (see the module docstring). Commits run on one thread of their own, so the event loop
    never waits on the disk.

    Args:
        path: the SQLite file (created, mode 0600, with its directory).
        nodes: node ids allowed to ship (None: any well-formed id).
        retention_seconds: rows received longer ago than this are erased (checked at most every 10 minutes).

    Raises:
        sqlite3.DatabaseError / OSError: the file cannot be opened as a database.
    """

    def __init__(self, path: str | os.PathLike, nodes: Iterable[str] | None = None,
                 retention_seconds: float = const.COLLECTOR_RETENTION_SECONDS):
        self.path = Path(path)
        self.nodes = frozenset(nodes) if nodes is not None else None
        self.retention_seconds = retention_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA secure_delete=ON")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()   # one writer: the commit thread (and direct callers in tests / NATS feed)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="collector")
        self._last_retention = 0.0
        self.status = {"path": str(self.path), "batches": 0, "stored": 0, "duplicates": 0, "refused": 0,
                       "forgotten": 0, "last_error": None}

    def close(self) -> None:
        """Finish the commit in progress and close the file (idempotent)."""
        self._pool.shutdown(wait=True)
        with self._lock:
            self._conn.close()

    # -- the methods -----------------------------------------------------------------------------------------
    def methods(self) -> MethodTable:
        """``ingest`` (answered after its commit, on the collector's thread) and ``ingest_cursor``."""
        async def ingest(p: dict) -> dict:
            batch = check_batch(p, self.nodes)   # on the loop: a bad batch costs no thread hop
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._store_counted, batch)

        def cursor(p: dict) -> dict:
            check_keys(p, ("node",), ("node",), "ingest_cursor")
            node = as_id(p["node"], "node")
            if self.nodes is not None and node not in self.nodes:
                raise InvalidParams(f"ingest_cursor: unknown node {short(node)}: not in the collector's node list")
            return self.cursor(node)

        async def forget(p: dict) -> dict:
            check_keys(p, ("node", "user"), ("node", "user"), "ingest_forget")
            node = as_id(p["node"], "node")
            if self.nodes is not None and node not in self.nodes:
                raise InvalidParams(f"ingest_forget: unknown node {short(node)}: not in the collector's node list")
            user = p["user"]
            if not is_pseudonym(user):
                raise InvalidParams(f"ingest_forget: user must be a pseudonym ({const.PSEUDONYM_HEX_CHARS} lowercase "
                                    "hex characters)")
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.forget, user)

        return MethodTable({"ingest": (ingest, True), "ingest_cursor": (cursor, False),
                            "ingest_forget": (forget, True)})

    def forget(self, user: str) -> dict:
        """Erase every event of the pseudonym ``user`` (blocking) -> ``{removed}``.

        Raises:
            sqlite3.Error: the deletion failed (nothing removed).
        """
        with self._lock:
            n = self._conn.execute("DELETE FROM events WHERE user = ?", (user,)).rowcount
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.status["forgotten"] += n
        return {"removed": n}

    def ingest(self, p: dict, now: float | None = None) -> dict:
        """Check and store one batch (blocking; what the RPC method and the NATS feed run).

        Returns:
            ``{acked, stored, duplicates}``.
        Raises:
            InvalidParams: malformed batch or unknown node; SequenceMismatch: a gap or a conflicting re-send
            (nothing stored); sqlite3.Error: the commit failed (nothing stored).
        """
        return self._store_counted(check_batch(p, self.nodes, now))

    def _store_counted(self, batch: tuple[str, int, list[tuple], int | None]) -> dict:
        try:
            out = self._store(*batch)
        except (SequenceMismatch, sqlite3.Error) as exc:
            self.status["refused"] += 1
            self.status["last_error"] = str(exc)[:const.MAX_ERROR_CHARS]
            raise
        self.status["batches"] += 1
        self.status["stored"] += out["stored"]
        self.status["duplicates"] += out["duplicates"]
        return out

    def _store(self, node: str, after: int, rows: list[tuple], dropped: int | None) -> dict:
        now = time.time()
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                got = c.execute("SELECT acked FROM nodes WHERE node = ?", (node,)).fetchone()
                acked = got[0] if got is not None else 0
                if after > acked:
                    raise SequenceMismatch(
                        f"ingest: node {node!r}: sequence gap: the collector holds this node up to seq {acked}, the "
                        f"batch continues after {after}; resend from ingest_cursor")
                old = [r for r in rows if r[0] <= acked]
                if old:
                    self._check_same(c, node, old)
                new = [r for r in rows if r[0] > acked]
                stored = 0
                if new:
                    c.executemany("INSERT INTO events (node, seq, user, item, event, ts, received) "
                                  "VALUES (?,?,?,?,?,?,?)", [(node, *r, now) for r in new])
                    stored = len(new)
                top = max(acked, rows[-1][0]) if rows else acked
                if got is None:
                    c.execute("INSERT INTO nodes (node, acked, batches, events, duplicates, dropped, first_seen, "
                              "last_seen) VALUES (?,?,1,?,?,?,?,?)", (node, top, stored, len(old), dropped or 0,
                                                                       now, now))
                else:
                    c.execute("UPDATE nodes SET acked = ?, batches = batches + 1, events = events + ?, "
                              "duplicates = duplicates + ?, dropped = max(dropped, ?), last_seen = ? WHERE node = ?",
                              (top, stored, len(old), dropped or 0, now, node))
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            self._maybe_retention(now)
        return {"acked": top, "stored": stored, "duplicates": len(old)}

    @staticmethod
    def _check_same(c: sqlite3.Connection, node: str, old: list[tuple]) -> None:
        """A re-sent event must be the one stored under its (node, seq); another one there means the node's log
        numbered from 1 again (a wiped state directory) and would silently lose its new events."""
        have = {}
        for i in range(0, len(old), 500):
            part = [r[0] for r in old[i:i + 500]]
            have.update((s, (u, it, ev, ts)) for s, u, it, ev, ts in c.execute(
                f"SELECT seq, user, item, event, ts FROM events WHERE node = ? AND seq IN ({','.join('?' * len(part))})",
                (node, *part)))
        for seq, user, item, event, ts in old:
            h = have.get(seq)
            if h is not None and h != (user, item, event, ts):
                raise SequenceMismatch(
                    f"ingest: node {node!r}: seq {seq} was stored with another event: this node's log restarted its "
                    "sequence numbers (wiped state directory?); give the node a new sync.node_id")

    def _maybe_retention(self, now: float) -> None:
        if now - self._last_retention < 600:
            return
        self._last_retention = now
        n = self._conn.execute("DELETE FROM events WHERE received < ?", (now - self.retention_seconds,)).rowcount
        if n:
            log.info("collector: erased %d events older than %.0f days", n, self.retention_seconds / 86400)

    def cursor(self, node: str) -> dict:
        """``{acked, events, dropped}`` of ``node`` (zeros for a node never seen)."""
        with self._lock:
            got = self._conn.execute("SELECT acked, events, dropped FROM nodes WHERE node = ?", (node,)).fetchone()
        acked, events, dropped = got if got is not None else (0, 0, 0)
        return {"acked": acked, "events": events, "dropped": dropped}

    def count(self) -> int:
        """The highest event id (events ever stored here; the loop's "N new events" counter)."""
        with self._lock:
            return self._conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]

    def health(self) -> dict:
        with self._lock:
            nodes = {n: {"acked": a, "events": e, "duplicates": d, "dropped": dr, "last_seen": ls}
                     for n, a, e, d, dr, ls in self._conn.execute(
                         "SELECT node, acked, events, duplicates, dropped, last_seen FROM nodes ORDER BY node")}
        return dict(self.status, events=self.count(), nodes=nodes)
