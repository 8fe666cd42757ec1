"""Shipping a node's committed events upstream, to the trainer side's collector (``fleet/collector.py``), in order
and in batches, at-least-once: the node keeps its place in ``<state_dir>/upstream.json`` and the collector stores
each (node id, sequence number) once, so a batch sent twice (a reply lost, a restart between the collector's commit
and the node's note of it) is stored once.

What travels per event is only what training needs: ``[seq, user pseudonym, item, event, ts]`` plus the batch's
node id; never a raw shopper id, the client's event id or the pseudonym key's id. The event time sent is
``min(ts, received)``: a client-supplied time ahead of the node's clock cannot make the collector refuse the batch
forever.

The loop (``Shipper.run``, a task on the node's event loop; reading the log runs on a thread, so serving never
waits on it):

1. where to resume: the collector's ``ingest_cursor`` (the RPC transport; the collector is the authority), or the
   local ``upstream.json`` (NATS, where the stream's acknowledgement is the commit);
2. read up to ``batch_events`` rows after it from ``events.db`` (a connection of its own; WAL readers never block
   the writer);
3. send ``ingest {node, after, events, dropped}``; on its acknowledgement, note the new cursor (atomically, in
   ``upstream.json``) and go on at once while rows are pending, else look again every ``interval`` s;
4. a shopper's ``forget`` at the node is queued durably (in ``upstream.json``, before ``forget`` answers) and
   sent first (``ingest_forget``), so the collector erases that pseudonym's events too, also after an outage;
5. any failure (collector unreachable, refused batch, timeout) is logged once, shown in ``health``, and retried with
   exponential backoff from ``interval`` up to ``max_backoff`` s; a sequence mismatch re-reads the collector's
   cursor first. An outage of any length resumes from the last acknowledged sequence number: the node's log keeps
   the events meanwhile, up to its size cap; events the cap removes before they were shipped are counted
   (``dropped_unshipped`` in ``health`` and the metrics, and sent to the collector with each batch).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from .. import const
from ..errors import RpcError, SEQUENCE_MISMATCH
from ..events.log import EventLog
from ..events.pseudonym import is_pseudonym
from ..events.statefile import write_atomic
from ..rpc.client import AsyncClient, Credentials

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Where batches go. ``cursor(node)`` -> the last acknowledged seq, or None when the transport keeps no cursor
    (then the local one is used); ``send(batch)`` -> the acknowledged seq; ``forget(node, user)`` -> once the
    pseudonym's collected events are erased (or the erasure is durably queued upstream); all raise on any failure."""

    name: str

    def target(self) -> str | None: ...
    async def cursor(self, node: str) -> int | None: ...
    async def send(self, batch: dict) -> int: ...
    async def forget(self, node: str, user: str) -> None: ...
    async def close(self) -> None: ...


class RpcTransport:
    """MessagePack-RPC to the collector (the registry process): one connection, reopened after any failure.

    Args:
        address: returns (host, port) of the collector now (configured, or discovered with the registry), or None.
        timeout: s per round trip.
        credentials: TLS context and token for the collector (``rpc.client.Credentials``; None: plain, no auth).
    """

    name = "rpc"

    def __init__(self, address: Callable[[], tuple[str, int] | None],
                 timeout: float = const.SHIP_TIMEOUT_SECONDS, credentials: Credentials | None = None):
        self.address, self.timeout, self.credentials = address, timeout, credentials
        self._client: AsyncClient | None = None
        self._at: tuple[str, int] | None = None

    def target(self) -> str | None:
        a = self.address()
        return f"{a[0]}:{a[1]}" if a else None

    async def _connected(self) -> AsyncClient:
        addr = self.address()
        if addr is None:
            raise ConnectionError("no collector configured or discovered")
        if self._client is not None and self._at != addr:
            await self.close()
        if self._client is None:
            self._client = await AsyncClient.connect(addr[0], addr[1], self.timeout, self.credentials)
            self._at = addr
        return self._client

    async def _call(self, method: str, **params):
        client = await self._connected()
        try:
            return await client.call(method, **params)
        except RpcError:
            raise
        except BaseException:   # the connection's state is unknown: start over with a fresh one
            await self.close()
            raise

    async def cursor(self, node: str) -> int | None:
        return int((await self._call("ingest_cursor", node=node))["acked"])

    async def send(self, batch: dict) -> int:
        return int((await self._call("ingest", **batch))["acked"])

    async def forget(self, node: str, user: str) -> None:
        await self._call("ingest_forget", node=node, user=user)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


MAX_SEQ = (1 << 63) - 1


class ShipRefused(RuntimeError):
    """Shipping cannot go on without an operator (the message says what to do); the node keeps serving."""


def read_upstream_state(state_dir: str | os.PathLike, set_aside: bool = False) -> dict:
    """``upstream.json`` of a state directory: ``{node, acked, transport, dropped, forget}`` ({} when absent).
    A damaged file gives {}; with ``set_aside`` it is also renamed ``upstream.json.bad-<unix time>`` and logged
    (the erasures it held are then owed by hand: the log names the file)."""
    path = Path(state_dir) / const.UPSTREAM_STATE
    try:
        with open(path, encoding="utf-8") as f:
            st = json.load(f)
        if isinstance(st, dict) and isinstance(st.get("acked"), int) and not isinstance(st["acked"], bool) \
                and 0 <= st["acked"] <= MAX_SEQ and isinstance(st.get("forget", []), list):
            return st
        why = "not a shipping state"
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        why = str(exc)
    if set_aside:
        aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
        try:
            os.replace(path, aside)
        except OSError:
            aside = path
        log.error("shipping state %s is damaged (%s): set aside as %s; shipping resumes from the collector's cursor, "
                  "and any erasures queued in it must be repeated (forget)", path, why[:200], aside)
    return {}


class Shipper:
    """See the module docstring.

    Args:
        events: the node's (open) event log.
        node_id: this node's id at the collector (``sync.node_id``).
        state_dir: where ``upstream.json`` lives.
        transport: ``RpcTransport`` or ``fleet.nats_transport.NatsTransport``.
        batch_events: events per batch (at most ``const.MAX_INGEST_EVENTS``).
        interval: s between looks at the log when all is shipped; also the first retry delay.
        max_backoff: s, the longest retry delay.
    """

    def __init__(self, events: EventLog, node_id: str, state_dir: str | os.PathLike, transport: Transport,
                 batch_events: int = const.SHIP_BATCH_EVENTS, interval: float = const.SHIP_INTERVAL_SECONDS,
                 max_backoff: float = const.SHIP_MAX_BACKOFF_SECONDS):
        self.events, self.node_id, self.transport = events, node_id, transport
        self.state_path = Path(state_dir) / const.UPSTREAM_STATE
        self._save_lock = threading.Lock()   # _save runs on the loop (forget) and on threads (acks)
        self.batch_events = max(1, min(batch_events, const.MAX_INGEST_EVENTS))
        self.interval, self.max_backoff = interval, max(interval, max_backoff)
        saved = read_upstream_state(state_dir, set_aside=True)
        self.acked: int = saved.get("acked", 0) if saved.get("node") == node_id else 0
        # erasures are owed whatever the node is called now; entries that are not pseudonyms are dropped (logged)
        self.forgets: list[str] = [u for u in saved.get("forget", []) if is_pseudonym(u)]
        if len(self.forgets) != len(saved.get("forget", [])):
            log.error("shipping state %s: %d queued erasures are not pseudonyms; dropped", self.state_path,
                      len(saved["forget"]) - len(self.forgets))
        self.blocked: str | None = None
        if saved.get("node") not in (None, node_id):
            self.blocked = (f"this node's event log was shipped as node {saved['node']!r}, and sync.node_id is now "
                            f"{node_id!r}: shipping under the new id would store every event twice. Set "
                            f"sync.node_id back to {saved['node']!r}, or move {self.state_path} aside to ship the whole "
                            "log again under the new id")
            self.acked = saved["acked"]
        self._last_contact = 0.0
        self._need_cursor = True
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._conn: sqlite3.Connection | None = None
        self.events.upstream_acked = self.acked   # the log counts what its size cap drops before shipping
        if saved.get("node") == node_id and isinstance(saved.get("dropped"), int):
            events.status["dropped_unshipped"] = max(events.status.get("dropped_unshipped", 0), saved["dropped"])
        self.status = {"enabled": True, "transport": transport.name, "target": None, "node_id": node_id,
                       "state": "starting", "acked": self.acked, "pending": None, "shipped": 0, "batches": 0,
                       "forgets_pending": len(self.forgets), "forgets_sent": 0,
                       "dropped_unshipped": 0, "last_error": None, "last_shipped_at": None, "offline_since": None}

    # -- lifecycle (a Daemon component) ----------------------------------------------------------------------
    async def start(self, server=None) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self.run(), name="shipper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.transport.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def forget(self, user: str) -> None:
        """Queue the erasure of the pseudonym ``user`` at the collector; durable (``upstream.json`` is rewritten and
        fsynced) when this returns, so it survives a crash before it is sent."""
        if user not in self.forgets:
            self.forgets.append(user)
            self._save()
        self.status["forgets_pending"] = len(self.forgets)
        self.wake()

    def wake(self) -> None:
        """Look at the log now (``forget`` calls it; new events are looked for every ``interval`` s)."""
        if self._wake is not None:
            self._wake.set()

    # -- the loop ----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        delay = self.interval
        while True:
            try:
                more = await self.ship_once()
                delay = self.interval
                if more:
                    continue
                wait = self.interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # never let the loop die; every failure is retried
                try:
                    self._failed(exc)
                except Exception:
                    log.exception("shipping: failed while reporting %r", exc)
                wait, delay = delay, min(delay * 2, self.max_backoff)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait * random.uniform(0.9, 1.1))
            except asyncio.TimeoutError:
                pass

    async def ship_once(self) -> bool:
        """Send one batch if rows are pending. Returns True when more rows wait (ship again at once).

        Raises:
            whatever the transport raises (OSError, asyncio.TimeoutError, RpcError), or sqlite3.Error.
        """
        self.status["target"] = self.transport.target()
        top = await asyncio.to_thread(self._top)
        self.status["pending"] = max(0, top - self.acked)
        self.status["dropped_unshipped"] = self.events.status.get("dropped_unshipped", 0)
        while self.forgets:   # erasures first: they are rare, and owed
            await self.transport.forget(self.node_id, self.forgets[0])
            self._last_contact = time.monotonic()
            self.forgets.pop(0)
            self.status["forgets_sent"] += 1
            self.status["forgets_pending"] = len(self.forgets)
            await asyncio.to_thread(self._save)
        if self.blocked:
            raise ShipRefused(self.blocked)
        if self._need_cursor:
            remote = await self.transport.cursor(self.node_id)
            self._last_contact = time.monotonic()
            if remote is not None and (not isinstance(remote, int) or isinstance(remote, bool)
                                       or not 0 <= remote <= MAX_SEQ):
                raise ShipRefused(f"the collector answered ingest_cursor with {str(remote)[:40]!r}: not a sequence "
                                  "number")
            if remote is not None and remote > top:
                raise ShipRefused(
                    f"the collector holds node {self.node_id!r} up to seq {remote}, beyond this node's log (it has "
                    f"numbered up to {top}): another node ships under the same id, or this state directory was "
                    "wiped; give this node its own sync.node_id (nothing is shipped meanwhile, nothing is lost)")
            if remote is not None and remote != self.acked:
                if remote < self.acked:
                    log.warning("shipping: the collector holds node %s up to seq %d, below this node's %d; "
                                "resending from %d", self.node_id, remote, self.acked, remote)
                self._note_acked(remote)
            self._need_cursor = False
        rows, top = await asyncio.to_thread(self._read, self.acked)
        self.status["pending"] = max(0, top - self.acked) if rows else 0   # (the last rows may have been erased)
        if not rows:
            if time.monotonic() - self._last_contact >= const.SHIP_HEARTBEAT_SECONDS:
                remote = await self.transport.cursor(self.node_id)   # is the collector still there? (RPC)
                self._last_contact = time.monotonic()
                if remote is not None and remote != self.acked:
                    self._need_cursor = True
            self._ok()
            return False
        batch = {"node": self.node_id, "after": self.acked, "events": rows,
                 "dropped": self.status["dropped_unshipped"]}
        acked = await self.transport.send(batch)
        self._last_contact = time.monotonic()
        if acked != rows[-1][0]:
            self._need_cursor = True
            raise ShipRefused(f"the collector acknowledged seq {str(acked)[:40]} for a batch ending at {rows[-1][0]}")
        self.status["shipped"] += len(rows)
        self.status["batches"] += 1
        self.status["last_shipped_at"] = time.time()
        await asyncio.to_thread(self._note_acked, acked)
        self.status["pending"] = max(0, top - self.acked)
        self._ok()
        return top > self.acked

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(self.events.path, isolation_level=None, check_same_thread=False,
                                         timeout=5)
        return self._conn

    def _top(self) -> int:
        """The highest sequence number this log ever gave out (rows since erased included)."""
        got = self._db().execute("SELECT max(coalesce((SELECT max(seq) FROM events), 0), coalesce((SELECT seq FROM "
                                 "sqlite_sequence WHERE name = 'events'), 0))").fetchone()[0]
        return int(got or 0)

    def _read(self, after: int) -> tuple[list[list], int]:
        """Up to ``batch_events`` rows after ``after``, cut so that their fields stay under
        ``SHIP_MAX_BATCH_BYTES`` (long item ids: a batch must fit in one MessagePack-RPC frame)."""
        c = self._db()
        rows, size = [], 0
        for s, u, i, e, t, r in c.execute(
                "SELECT seq, user, item, event, ts, received FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, self.batch_events)):
            size += len(i.encode("utf-8", "surrogatepass")) + 64
            if rows and size > const.SHIP_MAX_BATCH_BYTES:
                break
            rows.append([s, u, i, e, min(t, r)])
        return rows, self._top()

    def _note_acked(self, acked: int) -> None:
        self.acked = acked
        self.events.upstream_acked = acked
        self.status["acked"] = acked
        self._save()

    def _save(self) -> None:
        """Rewrite ``upstream.json`` atomically (``events.statefile.write_atomic``); mode 0600: it holds the pseudonyms owed
        an erasure. Writers are serialized and each takes its snapshot under the lock, so the file on disk is
        always the newest state (never an older snapshot renamed over a newer one)."""
        with self._save_lock:
            write_atomic(self.state_path, json.dumps({"node": self.node_id, "acked": self.acked,
                                                      "transport": self.transport.name,
                                                      "dropped": self.events.status.get("dropped_unshipped", 0),
                                                      "forget": list(self.forgets)}), mode=0o600)

    def _ok(self) -> None:
        if self.status["state"] in ("offline", "refused"):
            log.info("shipping to %s resumed after %.0f s", self.status["target"],
                     time.time() - (self.status["offline_since"] or time.time()))
        self.status.update(state="ok", last_error=None, offline_since=None)

    def _failed(self, exc: BaseException) -> None:
        refused = isinstance(exc, (RpcError, ShipRefused))
        if refused and getattr(exc, "code", None) == SEQUENCE_MISMATCH:
            self._need_cursor = True
        elif not refused or isinstance(exc, ShipRefused):
            self._need_cursor = True   # after an outage the collector may have been restored from a backup
        msg = f"{type(exc).__name__}: {exc}"[:const.MAX_ERROR_CHARS]
        state = "refused" if refused else "offline"
        if self.status["state"] != state or self.status["last_error"] != msg:
            log.warning("shipping to %s %s: %s; retrying with backoff", self.status["target"], state, msg)
        if self.status["offline_since"] is None:
            self.status["offline_since"] = time.time()
        self.status.update(state=state, last_error=msg)

    def health(self) -> dict:
        return dict(self.status)
