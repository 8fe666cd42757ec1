"""The node's durable event log: SQLite in WAL mode (the standard library's ``sqlite3``), one database file in the
state directory, written by one thread with group commit.

* ``append(events)`` (a coroutine) returns only after the events are committed: the request handler awaits it, so
  ``track`` is acknowledged only for stored events. Requests that arrive together share one transaction, committed
  by the writer thread, so the event loop never waits on the disk (group commit, as in PostgreSQL's
  ``commit_delay`` and InnoDB's binlog group commit).
* ``synchronous = FULL`` (default): every commit is fsynced, so an acknowledged event survives power loss.
  ``NORMAL``: WAL commits are not fsynced (only checkpoints are), so an acknowledged event survives a process
  crash (``kill -9``) but the last transactions may be lost on power loss (sqlite.org/pragma.html#pragma_synchronous).
* Rows: ``seq`` (node-local, monotonic across restarts: ``AUTOINCREMENT`` never reuses a number), ``user`` (the
  pseudonym, never the raw id), ``key_id`` (of the pseudonym key), ``item``, ``event``, ``ts`` (event time, unix s),
  ``received`` (unix s), ``event_id`` (the pseudonym of the client's event id, optional: a repeated (user,
  event_id) is acknowledged and not stored twice, so retries are safe).
* One index: (user, event_id) for the rows that carry an event id (the retry check); rows without one cost an
  append to the table only. ``forget`` therefore scans the table (rare; about a second per million rows).
* Erasure: ``forget`` deletes a shopper's rows with ``secure_delete`` on (the freed pages are zeroed) and truncates
  the WAL, so no copy of them stays in the files.
* Bounded: rows older than the retention TTL are erased, and when the live rows exceed ``max_bytes`` the oldest
  ``COMPACT_FRACTION`` are dropped (checked every ``COMPACT_EVERY_SECONDS`` and every ``COMPACT_EVERY_ROWS`` rows).
  With shipping on (``fleet/shipper.py`` sets ``upstream_acked``), the rows removed before they were shipped are
  counted in ``status["dropped_unshipped"]``.
* Faults: a commit that fails (disk full, read-only or vanished state directory, I/O error) fails its requests
  with ``EventLogUnavailable`` (nothing of them is stored or acknowledged), counts the events as refused, marks the
  log ``degraded``, and is retried with the next request (at most every ``REOPEN_SECONDS`` a reopen), so the node
  recovers by itself when the disk does. A database that fails SQLite's ``quick_check`` at boot is moved aside
  (``events.db.corrupt-<unix time>``), the rows that can still be read are copied into a fresh one, and ``health``
  says so.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from .. import const
from ..errors import EventLogUnavailable

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    key_id TEXT NOT NULL,
    item TEXT NOT NULL,
    event TEXT NOT NULL,
    ts REAL NOT NULL,
    received REAL NOT NULL,
    event_id TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (user, event_id) WHERE event_id IS NOT NULL;
"""
COLUMNS = "seq, user, key_id, item, event, ts, received, event_id"
SYNCHRONOUS = ("FULL", "NORMAL")


class Event(NamedTuple):
    """One event as logged: ``user`` is the pseudonym; ``ts`` unix s; ``event_id`` the client's or None."""

    user: str
    item: str
    event: str
    ts: float
    event_id: str | None = None


Done = Callable[[object, "BaseException | None"], None]   # (result, error): run on the event loop


class _Append(NamedTuple):
    events: list[Event]
    done: Done


class _Forget(NamedTuple):
    user: str
    done: Done


def settle(fut: asyncio.Future, value, exc: "BaseException | None") -> None:
    """Resolve ``fut`` with ``value``, or with ``exc`` when given; nothing when it is already done (a request
    cancelled at shutdown)."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _future_done(fut: asyncio.Future) -> Done:
    return lambda value, exc: settle(fut, value, exc)


_STOP = object()


class EventLog:
    """See the module docstring.

    Args:
        path: the database file (created with its directory).
        key_id: the pseudonym key's id, stored with each row.
        synchronous: "FULL" or "NORMAL".
        max_bytes: live-row bytes before oldest-first compaction.
        retention_seconds: rows older than this (by receive time) are erased.
    """

    def __init__(self, path: str | os.PathLike, key_id: str, synchronous: str = "FULL",
                 max_bytes: int = const.EVENT_LOG_MAX_BYTES,
                 retention_seconds: float = const.EVENT_RETENTION_SECONDS):
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {synchronous!r}")
        self.path = Path(path)
        self.key_id = key_id
        self.synchronous = synchronous
        self.max_bytes = max_bytes
        self.retention_seconds = retention_seconds
        self._conn: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch: list = []
        self._last_open_try = 0.0
        self._since_compact = 0
        self._last_compact = time.monotonic()
        self.status = {"state": "closed", "path": str(self.path), "synchronous": synchronous, "last_error": None,
                       "committed": 0, "duplicates": 0, "refused": 0, "commits": 0, "compacted": 0,
                       "forgotten": 0, "rows": 0, "bytes": 0, "recovered": None, "dropped_unshipped": 0}
        self.upstream_acked: int | None = None   # set by the shipper: the last seq the collector acknowledged

    # -- boot (before the event loop serves) -----------------------------------------------------------------
    def open(self) -> None:
        """Open (or create) the database; a damaged one is moved aside and salvaged (see the module docstring).
        A log that cannot be opened at all (read-only or full disk) starts ``degraded`` and keeps retrying; this
        never raises for a disk fault."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._connect(check=True)
        except sqlite3.DatabaseError as exc:
            if not self._is_corrupt(exc):
                self._fail(exc)
                return
            self._salvage(exc)
        except OSError as exc:
            self._fail(exc)
            return
        self.status["state"] = "ok"
        self._count_rows()

    @staticmethod
    def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
        text = str(exc).lower()
        return not isinstance(exc, sqlite3.OperationalError) or "malformed" in text or "not a database" in text \
            or "quick_check" in text

    def _connect(self, check: bool = False) -> sqlite3.Connection:
        if not self.path.exists():   # pseudonymous, still personal data: readable by the node's user only
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA secure_delete=ON")   # erased rows are zeroed on disk, not left in free pages
            # checkpoints run in their own thread (_checkpoints), not inside the commits that hit the threshold:
            # copying WAL frames and fsyncing the database there would stall every waiting track by milliseconds
            conn.execute("PRAGMA wal_autocheckpoint=0")
            if check:
                res = conn.execute("PRAGMA quick_check").fetchone()[0]
                if res != "ok":
                    raise sqlite3.DatabaseError(f"quick_check: {res}")
            conn.executescript(SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _salvage(self, exc: sqlite3.DatabaseError) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        self._conn = self._connect()
        salvaged = 0
        try:
            old = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
            try:
                salvaged = self._copy_readable(old)
            finally:
                old.close()
        except sqlite3.DatabaseError:
            pass
        finally:
            if self._conn.in_transaction:
                self._conn.execute("COMMIT")
        self.status["recovered"] = {"error": str(exc)[:const.MAX_ERROR_CHARS], "moved_to": str(aside),
                                    "salvaged_rows": salvaged, "at": time.time()}
        log.error("event log %s failed its integrity check (%s): moved to %s, %d rows salvaged into a new log",
                  self.path, exc, aside, salvaged)

    def _copy_readable(self, old: sqlite3.Connection) -> int:
        """Copy every row of ``old`` that can still be read into the open log: seq ranges are read whole, and a
        range that fails is split until the unreadable pages are isolated and skipped."""
        top = None
        for sql in ("SELECT max(seq) FROM events", "SELECT seq FROM sqlite_sequence WHERE name = 'events'"):
            try:
                top = old.execute(sql).fetchone()[0]
            except sqlite3.DatabaseError:
                continue
            if top is not None:
                break
        if top is None:
            return 0
        insert = f"INSERT OR IGNORE INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"
        copied = 0
        ranges = [(1, int(top))]
        self._conn.execute("BEGIN")
        while ranges:
            lo, hi = ranges.pop()
            try:
                got = old.execute(f"SELECT {COLUMNS} FROM events WHERE seq BETWEEN ? AND ?", (lo, hi)).fetchall()
            except sqlite3.DatabaseError:
                if hi - lo >= 16:   # split; a range of at most 16 seqs that fails is lost
                    mid = (lo + hi) // 2
                    ranges += [(mid + 1, hi), (lo, mid)]
                continue
            self._conn.executemany(insert, got)
            copied += len(got)
        self._conn.execute("COMMIT")
        return copied

    def ensure_seq_above(self, seq: int) -> None:
        """Make the next sequence number exceed ``seq`` (before ``start``): a log rebuilt after damage must not hand
        out numbers the collector already holds for this node. No-op when it already does or the log is closed."""
        if self._conn is None or seq <= 0:
            return
        top = self._conn.execute("SELECT max(coalesce((SELECT max(seq) FROM events), 0), coalesce((SELECT seq FROM "
                                 "sqlite_sequence WHERE name = 'events'), 0))").fetchone()[0]
        if top >= seq:
            return
        self._conn.execute("BEGIN")
        if self._conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'", (seq,)).rowcount == 0:
            self._conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (seq,))
        self._conn.execute("COMMIT")
        log.warning("event log %s: sequence numbers continue after %d (the last one shipped upstream), not %d",
                    self.path, seq, top)

    def restore(self, since: float) -> Iterator[tuple[str, str, str, float]]:
        """(user pseudonym, item, event, ts) of the rows received at or after ``since`` under the current key,
        oldest first (for the sessions at boot). Yields nothing when the log is not open."""
        if self._conn is None:
            return
        first = self._first_seq_received_at_or_after(since)
        if first is None:
            return
        cur = self._conn.execute("SELECT user, item, event, ts FROM events WHERE seq >= ? AND key_id = ? "
                                 "ORDER BY seq", (first, self.key_id))
        while rows := cur.fetchmany(10_000):
            yield from rows

    # -- the writer thread -----------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer thread (and the checkpointer); results are delivered on ``loop``."""
        self._loop = loop
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self._thread.start()
        self._ckpt = threading.Thread(target=self._checkpoints, name="event-log-checkpoint", daemon=True)
        self._ckpt.start()

    def _checkpoints(self) -> None:
        """Copy committed WAL frames into the database every ``CHECKPOINT_SECONDS`` on a connection of its own
        (``PASSIVE``: never blocks the writer; the WAL restarts from its start once it is fully copied)."""
        conn = None
        while not self._stopping.wait(const.CHECKPOINT_SECONDS):
            try:
                if conn is None:
                    conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=1)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:   # a degraded log: the writer reports it; retry at the next tick
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the database."""
        if self._thread is not None:
            if self._batch:   # submitted in the loop's last turn (normally drained already)
                self._queue.put(self._batch)
                self._batch = []
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
            self._stopping.set()
            self._ckpt.join()
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        self.status["state"] = "closed"

    def submit(self, events: list[Event], done: Done) -> None:
        """Queue ``events`` for the next commit; ``done(stored, error)`` runs on the event loop afterwards: ``stored``
        holds per event True when it was stored now, False when its (user, event_id) was already stored (a retry:
        acknowledged, not stored twice); ``error`` is an ``EventLogUnavailable`` when the commit failed (then none
        of ``events`` is stored). The request path's entry: no coroutine, no task per request; what is submitted
        during one turn of the event loop reaches the writer as one hand-off (one wake-up of the thread, not one per
        request)."""
        self._enqueue(_Append(events, done))

    def _enqueue(self, req: "_Append | _Forget") -> None:
        """Every request, in arrival order (a forget after a track in the same turn commits after it)."""
        self._batch.append(req)
        if len(self._batch) == 1:
            self._loop.call_soon(self._hand_off)

    def _hand_off(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self._queue.put(batch)

    async def append(self, events: list[Event]) -> list[bool]:
        """``submit`` as a coroutine: returns ``stored``.

        Raises:
            EventLogUnavailable: the commit failed; none of ``events`` is stored.
        """
        fut = asyncio.get_running_loop().create_future()
        self._enqueue(_Append(events, _future_done(fut)))
        return await fut

    async def forget(self, user: str) -> int:
        """Erase every event of the pseudonym ``user``; returns how many rows were removed.

        Raises:
            EventLogUnavailable: the deletion failed (nothing was removed).
        """
        fut = asyncio.get_running_loop().create_future()
        self._enqueue(_Forget(user, _future_done(fut)))
        return await fut

    def _run(self) -> None:
        self._maybe_compact(force=True)   # the retention TTL applies across downtime too
        stop = False
        while not stop:
            try:
                item = self._queue.get(timeout=const.COMPACT_EVERY_SECONDS)
            except queue.Empty:   # idle: the retention TTL still runs
                self._maybe_compact()
                continue
            if item is _STOP:
                break
            group = item if isinstance(item, list) else [item]
            n = sum(len(r.events) for r in group if isinstance(r, _Append))
            while n < const.MAX_WRITE_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                more = nxt if isinstance(nxt, list) else [nxt]
                group += more
                n += sum(len(r.events) for r in more if isinstance(r, _Append))
            out: list[tuple[Done, object, BaseException | None]] = []
            appends: list[_Append] = []
            for req in group:   # in arrival order; a forget commits what came before it first
                if isinstance(req, _Append):
                    appends.append(req)
                    continue
                out += self._commit(appends)
                appends = []
                out.append(self._forget(req))
            out += self._commit(appends)
            self._loop.call_soon_threadsafe(_deliver, out)
            self._maybe_compact()

    def _ensure_open(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        now = time.monotonic()
        if now - self._last_open_try < const.REOPEN_SECONDS:
            raise EventLogUnavailable(f"event log unavailable: {self.status['last_error']}")
        self._last_open_try = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise EventLogUnavailable(f"event log unavailable: {exc}") from None
        self._count_rows()
        return self._conn

    def _fail(self, exc: BaseException) -> EventLogUnavailable:
        """Mark the log degraded and drop the connection (reopened on the next request, at most every
        REOPEN_SECONDS)."""
        msg = f"{type(exc).__name__}: {exc}"
        if not os.access(self.path.parent, os.W_OK):
            msg += f" (the state directory {self.path.parent} is not writable: read-only filesystem or permissions)"
        msg = msg[:const.MAX_ERROR_CHARS]
        if self.status["state"] != "degraded":
            log.error("event log %s degraded: %s; events are refused until it recovers", self.path, msg)
        self.status.update(state="degraded", last_error=msg)
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        self._last_open_try = time.monotonic()
        return EventLogUnavailable(f"event log unavailable ({msg}); the events were not stored")

    def _recovered(self) -> None:
        if self.status["state"] == "degraded":
            log.warning("event log %s recovered", self.path)
        self.status["state"] = "ok"

    def _commit(self, appends: list[_Append]) -> list[tuple[Done, object, BaseException | None]]:
        if not appends:
            return []
        events = sum(len(a.events) for a in appends)
        try:
            conn = self._ensure_open()
        except EventLogUnavailable as exc:
            self.status["refused"] += events
            return [(a.done, None, exc) for a in appends]
        received = time.time()
        try:
            conn.execute("BEGIN")
            results = []
            plain: list[tuple] = []   # consecutive rows without an event id are inserted together, in order
            for a in appends:
                if all(e.event_id is None for e in a.events):
                    plain += [(e.user, self.key_id, e.item, e.event, e.ts, received, None) for e in a.events]
                    results.append([True] * len(a.events))
                    continue
                if plain:
                    self._insert(conn, plain)
                    plain = []
                results.append(self._insert_ids(conn, a.events, received))
            if plain:
                self._insert(conn, plain)
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            try:
                if self._conn is not None and self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            err = self._fail(exc)
            self.status["refused"] += events
            return [(a.done, None, err) for a in appends]
        self._recovered()
        stored = sum(sum(r) for r in results)
        self.status["committed"] += stored
        self.status["duplicates"] += events - stored
        self.status["commits"] += 1
        self.status["rows"] += stored
        self._since_compact += stored
        return [(a.done, r, None) for a, r in zip(appends, results)]

    _INSERT = "INSERT OR IGNORE INTO events (user, key_id, item, event, ts, received, event_id) VALUES "

    @classmethod
    def _sql(cls, n: int, returning: bool = False) -> str:
        return cls._INSERT + ",".join(["(?,?,?,?,?,?,?)"] * n) + (" RETURNING user, event_id" if returning else "")

    @classmethod
    def _chunks(cls, rows: list[tuple]):
        """Multi-row statements of 256 / 64 / 16 / 4 / 1 rows (few distinct statements for sqlite3's cache): one
        ``execute`` per chunk releases and retakes the GIL once, not once per row, so the event loop is not held
        up by the writer."""
        i = 0
        while i < len(rows):
            left = len(rows) - i
            n = next(b for b in (256, 64, 16, 4, 1) if left >= b)
            yield n, [v for r in rows[i:i + n] for v in r]
            i += n

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        for n, values in self._chunks(rows):
            conn.execute(self._sql(n), values)

    def _insert_ids(self, conn: sqlite3.Connection, events: list[Event], received: float) -> list[bool]:
        """Insert events that may carry event ids; per event True when stored now. A (user, event_id) seen before
        (stored earlier, or earlier in this call) is not stored again."""
        flags, rows, seen = [], [], set()
        for e in events:
            if e.event_id is not None:
                k = (e.user, e.event_id)
                if k in seen:
                    flags.append(None)   # a repeat within the call: never stored twice
                    continue
                seen.add(k)
            flags.append(k if e.event_id is not None else True)
            rows.append((e.user, self.key_id, e.item, e.event, e.ts, received, e.event_id))
        stored: set = set()
        for n, values in self._chunks(rows):
            stored.update(conn.execute(self._sql(n, returning=True), values).fetchall())
        return [f if isinstance(f, bool) else (f is not None and f in stored) for f in flags]

    def _forget(self, req: _Forget) -> tuple[Done, object, BaseException | None]:
        try:
            conn = self._ensure_open()
            n = conn.execute("DELETE FROM events WHERE user = ?", (req.user,)).rowcount
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # no older copy of the erased pages stays in the WAL
        except EventLogUnavailable as exc:
            return req.done, None, exc
        except (sqlite3.Error, OSError) as exc:
            return req.done, None, self._fail(exc)
        self.status["forgotten"] += n
        self.status["rows"] = max(0, self.status["rows"] - n)
        return req.done, n, None

    # -- compaction ------------------------------------------------------------------------------------------
    def _first_seq_received_at_or_after(self, t: float) -> int | None:
        """Binary search over seq (receive times grow with seq; no index needed)."""
        row = self._conn.execute("SELECT min(seq), max(seq) FROM events").fetchone()
        if row[0] is None:
            return None
        lo, hi = row
        first = None
        while lo <= hi:
            mid = (lo + hi) // 2
            r = self._conn.execute("SELECT seq, received FROM events WHERE seq >= ? ORDER BY seq LIMIT 1",
                                   (mid,)).fetchone()
            if r is None:
                hi = mid - 1
            elif r[1] >= t:
                first, hi = r[0], mid - 1
            else:
                lo = r[0] + 1
        return first

    def _maybe_compact(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._since_compact < const.COMPACT_EVERY_ROWS \
                and now - self._last_compact < const.COMPACT_EVERY_SECONDS:
            return
        self._since_compact, self._last_compact = 0, now
        if self._conn is None:
            return
        try:
            removed = 0
            first = self._first_seq_received_at_or_after(time.time() - self.retention_seconds)
            if first is None:   # everything is older than the TTL (or the log is empty)
                removed += self._delete("DELETE FROM events", ())
            else:
                removed += self._delete("DELETE FROM events WHERE seq < ?", (first,))
            self._refresh_bytes()
            while self.status["bytes"] > self.max_bytes and self.status["rows"] > 0:
                drop = max(1, int(self.status["rows"] * const.COMPACT_FRACTION))
                cut = self._conn.execute("SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET ?",
                                         (drop,)).fetchone()
                if cut is None:
                    removed += self._delete("DELETE FROM events", ())
                else:
                    removed += self._delete("DELETE FROM events WHERE seq < ?", (cut[0],))
                self._refresh_bytes()
            if removed:
                self.status["compacted"] += removed
                log.info("event log: compacted %d rows (retention %g s, cap %d bytes)", removed,
                         self.retention_seconds, self.max_bytes)
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)

    def compact(self) -> None:
        """Run the retention and size compaction now (tests, operators); normally periodic."""
        self._maybe_compact(force=True)

    def _delete(self, sql: str, args: tuple) -> int:
        """Run a compaction delete (``... WHERE seq < ?`` or the whole table), counting unshipped rows it drops."""
        acked = self.upstream_acked
        if acked is not None:
            where = "seq > ?" + (" AND seq < ?" if args else "")
            unshipped = self._conn.execute(f"SELECT count(*) FROM events WHERE {where}", (acked, *args)).fetchone()[0]
            if unshipped:
                self.status["dropped_unshipped"] += unshipped
                log.warning("event log: the size cap or retention removed %d events not yet shipped upstream",
                            unshipped)
        n = self._conn.execute(sql, args).rowcount
        self.status["rows"] = max(0, self.status["rows"] - n)
        return n

    def _count_rows(self) -> None:
        """Rows and bytes at open (a full count once; kept up to date incrementally afterwards)."""
        self.status["rows"] = self._conn.execute("SELECT count(*) FROM events").fetchone()[0]
        self._refresh_bytes()

    def _refresh_bytes(self) -> None:
        """Bytes of live pages (page_count - freelist_count): freed pages are reused, so the file stays near the
        cap instead of growing."""
        c = self._conn
        page = c.execute("PRAGMA page_size").fetchone()[0]
        used = c.execute("PRAGMA page_count").fetchone()[0] - c.execute("PRAGMA freelist_count").fetchone()[0]
        self.status["bytes"] = used * page

    def health(self) -> dict:
        return dict(self.status)


def _deliver(results: list[tuple[Done, object, BaseException | None]]) -> None:
    for done, value, exc in results:
        try:
            done(value, exc)
        except Exception:  # a callback's bug must not drop the other results of the group
            log.exception("event log: a completion callback failed")
