"""Shipping through NATS JetStream, the scale-out transport: nodes publish their batches to a stream
(``NatsTransport``, the node side of ``fleet/shipper.py``'s ``Transport``), and the trainer side reads the stream
with one durable consumer into the collector's SQLite file (``NatsFeed``, run by ``edgerec collect``).

**Wire.** One message per batch: the ``ingest`` parameter map of the RPC path, MessagePack-encoded (``{node, after,
events: [[seq, user, item, event, ts], ...], dropped}``), published to ``edgerec.events.<node token>`` with the
header ``Nats-Msg-Id: <node>:<after>:<last seq>``, so JetStream's duplicate window drops a batch re-sent unchanged
(a batch above the server's ``max_payload`` goes as several messages, each continuing after the one before). A
shopper's erasure is ``{node, forget: <pseudonym>}`` on the same subject, so it sits behind the node's earlier
batches. The node token is the node id when it is 1 to 64 characters of ``[A-Za-z0-9_-]`` (a NATS subject token
needs no ``.``, ``*``, ``>`` or white space); any other id is sanitized (``subject_token``: each other character
becomes ``_``, cut to 48, plus ``~`` and 12 hex characters of its SHA-256: ``~`` never appears in an id used
as it is, and the hash keeps sanitized ids apart, so two ids share a subject only by a 48-bit hash collision). The
payload's ``node`` is the identity the collector stores; the feed terminates a message whose subject is not the
token of its ``node``, so with per-node publish permissions on ``edgerec.events.<token>`` a node cannot ship as
another.

**Durability.** A batch counts as shipped when the stream's PubAck arrives: the node notes its cursor in
``upstream.json`` only then (``cursor()`` is None: the stream keeps no per-node cursor). The PubAck means "on disk"
only when the server fsyncs before acknowledging: ``sync_interval: always`` in the server's ``jetstream {}`` block
(a server setting; the default, 2 min, acknowledges before the fsync, so a power cut loses acknowledged messages:
Jepsen's NATS 2.12.1 report, nats-server issue #7564), and a stream with **file** storage and, in a cluster,
``num_replicas`` 3 (the PubAck then waits for a quorum). The stream must not use ``persist_mode: async`` (2.12+),
which acknowledges before the write; ``NatsFeed`` refuses such a stream, and one with memory storage.

**The feed** (``NatsFeed``): ensures the stream (subjects ``edgerec.events.>``, file storage, ``num_replicas``,
``duplicate_window``, ``max_age``), pull-subscribes with a durable consumer (explicit acks, no redelivery limit),
and takes the messages one at a time, in stream order: decodes and stores each with ``CollectorStore.ingest`` on a
thread of its own, then acks. The store is idempotent on (node, seq), so a redelivery (an ack lost, the feed killed
between its commit and its ack) stores nothing twice. What each outcome does:

* stored (or all duplicates): ``ack``;
* undecodable, malformed (``InvalidParams``), an unknown node, a subject that is not its node's, or a conflicting
  re-send (a node's log that numbered from 1 again): ``term`` (never redelivered), counted by reason in
  ``health()["terminated"]`` and logged with the reason;
* a sequence gap (the batch continues after a seq the collector does not hold for that node). A node publishes
  one message at a time, each after the previous one's PubAck, so its messages are in order in the stream; a gap
  is either an earlier message still out (delivered to a feed that died without acking it: the server redelivers it
  only after ``ACK_WAIT_SECONDS``) or one missing from the stream (lost by a server without ``sync_interval:
  always``, aged out by ``max_age`` while the collector was away, terminated above). The message is nak'ed with a
  delay of ``gap_delay`` s, up to ``gap_deliveries`` deliveries: longer than the ack wait, so an earlier message
  still out arrives and is stored first. After that the gap counts as permanent: the batch is stored from the
  collector's cursor, the missing range counted (``gaps``, ``gap_events``: an upper bound, the node's own log may
  have erased some of those seqs) and logged. Terminating it instead would refuse every later batch of that node;
* an erasure (``forget``): applied (``CollectorStore.forget``) only once every earlier message of the stream is
  acknowledged (the consumer's ack floor), so no batch from before it can bring the shopper's events back
  afterwards; until then nak'ed with ``gap_delay``, without a bound (an erasure is never dropped);
* the store failed (``sqlite3.Error`` / ``OSError``: disk full, I/O error): the message is retried in place (with
  ``in_progress`` so its ack wait does not run out), 0.5 s doubling to 10 s, until it works; the rest of the fetched
  messages are nak'ed at once, so they come back after it: nothing behind a failing message is stored before it.

Limit: an ack the server had not yet written when it was killed is lost with it; the message comes back, and
stores nothing twice, but a batch that comes back after an erasure that followed it brings the erased events back.
Run one feed per durable consumer: two would split the stream between them and see each other's messages as gaps.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import re
import time
import urllib.parse
from typing import Any

import msgpack
import nats
import nats.errors
import nats.js.errors
from nats.js.api import (AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType,
                         StreamConfig)

from .. import const
from ..errors import ConfigError, InvalidParams, SequenceMismatch
from ..events.pseudonym import is_pseudonym
from .collector import CollectorStore

log = logging.getLogger(__name__)

DEFAULT_DURABLE = "edgerec-collector"   # the collector's durable consumer
DUPLICATE_WINDOW_SECONDS = 600.0   # s the stream remembers a Nats-Msg-Id: many shipper backoffs (60 s) and a node
#                                    restart; past it the collector's (node, seq) check still stores a re-send once
MAX_AGE_SECONDS = 7 * 86400.0      # s the stream keeps a batch: a collector away this long misses nothing, and one
#                                    restored from a backup can be replayed from the stream by a new consumer
PUBLISH_TIMEOUT_SECONDS = 10.0     # s for one PubAck (one fsync with sync_interval: always; cluster: a quorum)
CONNECT_TIMEOUT_SECONDS = 2.0      # s for one TCP + NATS handshake; a connection that drops is not reconnected by
#                                    the client (that would hold a connect for several attempts, a publish behind
#                                    an outage): it closes, and is rebuilt on next use, under the shipper's / the
#                                    feed's backoff
PAYLOAD_MARGIN_BYTES = 1024        # room left under the server's max_payload for the headers
SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
FETCH_BATCH = 32                   # messages per pull request (x 1,000 events: one fetch is ~2 MB)
FETCH_WAIT_SECONDS = 1.0           # s an idle feed's pull request (of one message) waits; bounds stop()'s wait
FETCH_BUSY_SECONDS = 0.05          # s a pull request of FETCH_BATCH waits while messages flow: such a request
#                                    returns only when the batch is full or it expires, so an idle feed asks for
#                                    one message (returned as soon as it arrives) and a busy one for many, briefly
ACK_WAIT_SECONDS = 30.0            # s before an unacknowledged message is redelivered: far above a fetched batch's
#                                    commits (32 x ~10 ms), so a slow disk does not cause redeliveries; messages
#                                    a feed held when it died come back to the next one after this long
MAX_ACK_PENDING = 4 * FETCH_BATCH  # messages out without an ack (bounds those held by a feed that died)
GAP_DELAY_SECONDS = 5.0            # s between deliveries of a message that continues after a gap, and
GAP_DELIVERIES = 9                 # how many before the gap is taken as lost: 8 x 5 s = 40 s > ACK_WAIT_SECONDS,
#                                    so what a dead feed held has been redelivered (and stored) by then
RETRY_SECONDS = 0.5                # first delay after a failure (connect, fetch, store); doubles up to
MAX_RETRY_SECONDS = 30.0
STORE_RETRY_MAX_SECONDS = 10.0     # the longest wait between retries of a failed store (in place, with in_progress)


def subject_token(node: str) -> str:
    """The subject token of a node id (see the module docstring): the id itself when it is 1 to 64 characters of
    ``[A-Za-z0-9_-]``, else a sanitized form with a hash of the id."""
    if SUBJECT_TOKEN.match(node):
        return node
    return re.sub(r"[^A-Za-z0-9_-]", "_", node)[:48] + "~" + hashlib.sha256(node.encode()).hexdigest()[:12]


def redact(url: str) -> str:
    """``url`` without its credentials (``user:password@`` or ``token@``): what health and logs show."""
    try:
        p = urllib.parse.urlsplit(url)
        if "@" not in p.netloc:
            return url
        return urllib.parse.urlunsplit((p.scheme, "***@" + p.netloc.rsplit("@", 1)[1], p.path, p.query, p.fragment))
    except ValueError:
        return "(unparsable URL)"


def subject_for(node: str) -> str:
    """``edgerec.events.<token>``: the subject a node's batches are published on."""
    return f"{const.NATS_SUBJECT_PREFIX}.{subject_token(node)}"


def msg_id(node: str, after: int, events: list) -> str:
    """``<node>:<after>:<last seq>``: the batch's ``Nats-Msg-Id`` (the last seq is ``after`` for no events)."""
    return f"{node}:{after}:{events[-1][0] if events else after}"


def split_batch(batch: dict, limit: int) -> list[tuple[dict, bytes]]:
    """The batch as (part, MessagePack payload) pairs of at most ``limit`` bytes each: the batch itself when it
    fits, else halves (the second continuing after the first's last seq), recursively.

    Raises:
        ValueError: one event alone does not fit (a server ``max_payload`` below an event's size).
    """
    payload = msgpack.packb(batch, use_bin_type=True)
    if len(payload) <= limit:
        return [(batch, payload)]
    events = batch["events"]
    if len(events) < 2:
        raise ValueError(f"one event packs to {len(payload)} bytes, above the NATS server's max_payload ({limit})")
    half = len(events) // 2
    first = dict(batch, events=events[:half])
    second = dict(batch, after=events[half - 1][0], events=events[half:])
    return split_batch(first, limit) + split_batch(second, limit)


async def _quiet(exc: Exception) -> None:
    # nats-py reports every failed (re)connect attempt here; the shipper and the feed log failures once themselves
    log.debug("nats: %s: %s", type(exc).__name__, exc)


async def _connect(url: str, name: str, disconnected_cb=None) -> nats.aio.client.Client:
    """A NATS connection that closes when it drops (the caller rebuilds it on next use).

    Raises:
        OSError / asyncio.TimeoutError / nats.errors.Error: the server cannot be reached (one attempt).
    """
    return await nats.connect(servers=[url], name=name, allow_reconnect=False, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                              error_cb=_quiet, disconnected_cb=disconnected_cb)


async def _close(nc: nats.aio.client.Client | None) -> None:
    if nc is None or nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.close(), CONNECT_TIMEOUT_SECONDS)
    except Exception as exc:   # closing a broken connection: nothing more to do with it
        log.debug("nats: closing: %s", exc)


class NatsTransport:
    """The node side: publishes batches to JetStream (see the module docstring). One connection, opened on first
    use and rebuilt after it closed or a PubAck timed out; every call runs on the event loop without blocking it
    (nats-py is asyncio; packing a batch of 1,000 events takes well under a millisecond).

    Args:
        url: the NATS server (``nats://HOST:PORT``; ``tls://`` and credentials in the URL as nats-py takes them).
        stream: the stream batches must land in (sent as ``Nats-Expected-Stream``: a PubAck from any other stream
            capturing the subject is refused).
        timeout: s to wait for one PubAck.
    """

    name = "nats"

    def __init__(self, url: str, stream: str = const.NATS_STREAM, timeout: float = PUBLISH_TIMEOUT_SECONDS):
        if not url:
            raise ConfigError("the NATS transport needs a server URL (events.nats_url / --nats-url)")
        self.url, self.stream, self.timeout = url, stream, timeout
        self._nc: nats.aio.client.Client | None = None
        self._js = None
        self._lock: asyncio.Lock | None = None
        self._lost: asyncio.Event | None = None   # set when the connection drops (fails the PubAck wait at once)
        self.published = 0    # messages acknowledged by the stream
        self.duplicates = 0   # of which the stream had already stored (Nats-Msg-Id within the duplicate window)

    def target(self) -> str | None:
        return redact(self.url)

    async def cursor(self, node: str) -> int | None:
        """None: the stream keeps no per-node cursor; the shipper resumes from its ``upstream.json``."""
        return None

    async def _connected(self, node: str):
        if self._nc is not None and self._nc.is_closed:
            self._nc = self._js = None
        if self._nc is None:
            lost = self._lost = asyncio.Event()

            async def disconnected() -> None:
                lost.set()

            self._nc = await _connect(self.url, f"edgerec-node-{node}", disconnected)
            self._js = self._nc.jetstream(timeout=self.timeout)
        if not self._nc.is_connected:   # dropping: fail now rather than queue behind the outage
            await self._drop()
            raise ConnectionError(f"not connected to {redact(self.url)}")
        self._lost.clear()
        return self._nc, self._js

    async def _publish(self, js, subject: str, payload: bytes, mid: str | None):
        """One publish and its PubAck; a connection that drops meanwhile fails it at once (the PubAck will not come
        on this connection; a re-send is dropped by the duplicate window if the stream did store it)."""
        pub = asyncio.ensure_future(js.publish(subject, payload, timeout=self.timeout, stream=self.stream,
                                               headers={"Nats-Msg-Id": mid} if mid else None))
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({pub, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not pub.done():
                pub.cancel()
        if pub.cancelled() or not pub.done():
            raise ConnectionError(f"connection to {redact(self.url)} lost before the PubAck")
        return pub.result()

    async def send(self, batch: dict) -> int:
        """Publish ``batch`` (split into parts when it exceeds the server's ``max_payload``) and wait for each
        part's PubAck.

        Returns:
            the batch's last seq (``after`` when it has no events), once every part is acknowledged.
        Raises:
            ConnectionError / OSError / nats.errors.Error: the server cannot be reached, or the connection dropped;
            asyncio.TimeoutError (nats.errors.TimeoutError): no PubAck in ``timeout`` s (the connection is rebuilt
            on the next call); nats.js.errors.NoStreamResponseError: no stream captures the subject (the collector
            has not created it yet); nats.js.errors.APIError: the stream refused the message.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            node = batch["node"]
            nc, js = await self._connected(node)
            subject = subject_for(node)
            last = batch["after"]
            for part, payload in split_batch(batch, nc.max_payload - PAYLOAD_MARGIN_BYTES):
                mid = msg_id(node, part["after"], part["events"])
                try:
                    ack = await self._publish(js, subject, payload, mid)
                except (asyncio.TimeoutError, nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError):
                    await self._drop()   # the connection's state is unknown: start over with a fresh one
                    raise
                self.published += 1
                self.duplicates += bool(ack.duplicate)
                last = part["events"][-1][0] if part["events"] else part["after"]
            return last

    async def forget(self, node: str, user: str) -> None:
        """Publish the erasure of the pseudonym ``user`` (``{node, forget: user}`` on the node's subject) and wait
        for its PubAck: it is then durably queued upstream, behind the node's earlier batches; the feed erases once
        those are stored. No ``Nats-Msg-Id``: erasing twice is harmless, a deduplicated second ``forget`` of the same
        shopper (after new events) would not be.

        Raises:
            what ``send`` raises.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            nc, js = await self._connected(node)
            try:
                await self._publish(js, subject_for(node), msgpack.packb({"node": node, "forget": user}), None)
            except (asyncio.TimeoutError, nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError):
                await self._drop()
                raise

    async def _drop(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        await _close(nc)

    async def close(self) -> None:
        await self._drop()


class NatsFeed:
    """The trainer side: the stream, read by one durable consumer, into a ``CollectorStore`` (see the module
    docstring). ``start()`` / ``stop()``; ``health()``; ``ready`` is set once subscribed.

    Args:
        store: the collector's store (its ``ingest`` runs on a thread of this feed's own).
        url: the NATS server.
        stream: the stream to ensure and read.
        durable: the durable consumer's name (the position survives feed and server restarts).
        replicas: the stream's ``num_replicas`` (3 in a cluster: the PubAck then waits for a quorum).
        duplicate_window / max_age: s, the stream's settings (see the constants).
        gap_deliveries / gap_delay: how long a sequence gap is waited out (deliveries, s between them); keep
            ``(gap_deliveries - 1) * gap_delay`` above ``ack_wait``.
        ack_wait: s before a message delivered and not acked is redelivered (set when the consumer is created).
        fetch_batch: messages per pull request while messages flow.
    """

    def __init__(self, store: CollectorStore, url: str, stream: str = const.NATS_STREAM,
                 durable: str = DEFAULT_DURABLE, *, replicas: int = 1,
                 duplicate_window: float = DUPLICATE_WINDOW_SECONDS, max_age: float = MAX_AGE_SECONDS,
                 gap_deliveries: int = GAP_DELIVERIES, gap_delay: float = GAP_DELAY_SECONDS,
                 ack_wait: float = ACK_WAIT_SECONDS, fetch_batch: int = FETCH_BATCH):
        if not url:
            raise ConfigError("the NATS feed needs a server URL")
        self.store, self.url, self.stream, self.durable = store, url, stream, durable
        self.replicas, self.duplicate_window, self.max_age = replicas, duplicate_window, max_age
        self.gap_deliveries, self.gap_delay, self.fetch_batch = max(1, gap_deliveries), gap_delay, fetch_batch
        self.ack_wait = ack_wait
        if (self.gap_deliveries - 1) * gap_delay <= ack_wait:
            log.warning("nats feed: a gap is waited out for %.0f s, not longer than the ack wait (%.0f s): a batch "
                        "still held by a feed that died may be skipped", (self.gap_deliveries - 1) * gap_delay,
                        ack_wait)
        self.subjects = [f"{const.NATS_SUBJECT_PREFIX}.>"]
        self._nc: nats.aio.client.Client | None = None
        self._js = None
        self._sub = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nats-feed")
        self.ready: asyncio.Event | None = None
        self.status: dict[str, Any] = {
            "state": "starting", "url": redact(url), "stream": stream, "durable": durable, "messages": 0, "batches": 0,
            "stored": 0, "duplicates": 0, "terminated": {}, "gap_naks": 0, "gaps": 0, "gap_events": 0,
            "forgets": 0, "forgotten": 0, "forget_waits": 0, "store_errors": 0, "last_error": None,
            "last_terminated": None, "last_stored_at": None}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self, server=None) -> None:
        """Start the loop (connecting, and retrying while the server is away, happen inside it)."""
        self.ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="nats-feed")

    async def wait(self) -> None:
        """Until the loop ends: never, unless it hit a setup error.

        Raises:
            ConfigError: the stream exists with settings that break durability (memory storage, async persistence)
            or without the node subjects.
        """
        await self._task

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish the message in hand (its commit and ack), flush the acks, close; at most ``timeout`` s, then
        cancel (a message stored but not acked is redelivered and stored nothing twice)."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()   # cut a backoff wait short
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except (asyncio.CancelledError, Exception):
                    pass
            except Exception:   # a setup error, already reported by wait()
                pass
            self._task = None
        await self._disconnect(flush=True)
        self._pool.shutdown(wait=True)
        self.status["state"] = "stopped"

    def health(self) -> dict:
        return dict(self.status, terminated=dict(self.status["terminated"]))

    # -- connection, stream and consumer ---------------------------------------------------------------------
    async def _disconnect(self, flush: bool = False) -> None:
        nc, self._nc, self._js, self._sub = self._nc, None, None, None
        if nc is not None and flush and nc.is_connected:
            try:
                await nc.flush(CONNECT_TIMEOUT_SECONDS)   # the acks just sent
            except Exception as exc:
                log.debug("nats feed: flush: %s", exc)
        await _close(nc)

    async def _subscribe(self) -> None:
        nc = await _connect(self.url, f"edgerec-collector-{self.durable}")
        try:
            js = nc.jetstream(timeout=PUBLISH_TIMEOUT_SECONDS)
            await self._ensure_stream(js)
            cfg = ConsumerConfig(durable_name=self.durable, deliver_policy=DeliverPolicy.ALL,
                                 ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait, max_deliver=-1,
                                 max_ack_pending=MAX_ACK_PENDING, filter_subject=self.subjects[0])
            self._sub = await js.pull_subscribe(self.subjects[0], durable=self.durable, stream=self.stream, config=cfg)
        except BaseException:
            await _close(nc)
            raise
        self._nc, self._js = nc, js
        log.info("collecting from %s: stream %s, consumer %s, into %s", redact(self.url), self.stream, self.durable,
                 self.store.path)

    async def _ensure_stream(self, js) -> None:
        want = StreamConfig(name=self.stream, subjects=self.subjects, retention=RetentionPolicy.LIMITS,
                            storage=StorageType.FILE, num_replicas=self.replicas, discard=DiscardPolicy.OLD,
                            duplicate_window=self.duplicate_window, max_age=self.max_age)
        try:
            have = (await js.stream_info(self.stream)).config
        except nats.js.errors.NotFoundError:
            await js.add_stream(want)
            log.info("created stream %s: subjects %s, file storage, %d replica(s), duplicate window %.0f s, "
                     "max age %.0f s", self.stream, self.subjects, self.replicas, self.duplicate_window, self.max_age)
            return
        if have.storage != StorageType.FILE:
            raise ConfigError(f"stream {self.stream} uses {getattr(have.storage, 'value', have.storage)} storage: "
                              "acknowledged batches would not "
                              "survive a server restart; recreate it with file storage")
        if str(getattr(have, "persist_mode", None) or "").lower().endswith("async"):
            raise ConfigError(f"stream {self.stream} has persist_mode async: the server acknowledges before "
                              "writing; recreate it without")
        if not set(self.subjects) <= set(have.subjects or []):
            raise ConfigError(f"stream {self.stream} captures {have.subjects}, not {self.subjects}")
        changed = {k: (getattr(have, k), getattr(want, k)) for k in ("num_replicas", "duplicate_window", "max_age")
                   if getattr(have, k) != getattr(want, k)}
        if changed:
            for k, (_, new) in changed.items():
                setattr(have, k, new)
            await js.update_stream(have)
            log.info("stream %s updated: %s", self.stream,
                     ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))

    # -- the loop ----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay, busy = RETRY_SECONDS, False
        while not self._stopping:
            try:
                if self._sub is None or self._nc is None or self._nc.is_closed:
                    await self._disconnect()
                    await self._subscribe()
                    self.ready.set()
                if not self._nc.is_connected:   # dropped: closed, rebuilt on the next pass
                    raise ConnectionError(f"connection to {redact(self.url)} lost")
                try:
                    msgs = await (self._sub.fetch(self.fetch_batch, timeout=FETCH_BUSY_SECONDS) if busy
                                  else self._sub.fetch(1, timeout=FETCH_WAIT_SECONDS))
                except asyncio.TimeoutError:   # nothing new (nats.errors.TimeoutError)
                    msgs = []
                busy = bool(msgs)
                self._ok()
                await self._handle(msgs)
                delay = RETRY_SECONDS
                continue
            except asyncio.CancelledError:
                raise
            except ConfigError as exc:
                self._failed(exc)
                log.error("nats feed: %s", exc)
                raise
            except Exception as exc:   # server away, consumer gone, ...: rebuild the connection, with backoff
                self._failed(exc)
                await self._disconnect()
                wait = delay
            delay = min(delay * 2, MAX_RETRY_SECONDS)
            await self._sleep(wait)

    async def _handle(self, msgs: list) -> None:
        """Process fetched messages in order (see the module docstring for what each outcome does)."""
        for i, msg in enumerate(msgs):
            self.status["messages"] += 1
            try:
                meta = msg.metadata
                delivered, stream_seq = meta.num_delivered, meta.sequence.stream
            except Exception:   # not a JetStream message: cannot be acked at all
                continue
            delay, rest_back = RETRY_SECONDS, False
            while True:
                try:
                    verdict, detail = await self._one(msg, delivered, stream_seq)
                    break
                except Exception as exc:   # the store failed: retry this message in place, in order
                    self.status["store_errors"] += 1
                    self._failed(exc, "store_failed")
                    if not rest_back:   # the rest come back, in order, after this one
                        rest_back = True
                        for m in msgs[i + 1:]:
                            await m.nak()
                    if self._stopping:
                        await msg.nak()
                        return
                    await msg.in_progress()   # keeps its ack_wait from running out meanwhile
                    await self._sleep(delay)
                    delay = min(delay * 2, STORE_RETRY_MAX_SECONDS)
            if verdict == "ack":
                self._stored()
                await msg.ack()
            elif verdict == "nak":
                await msg.nak(delay=self.gap_delay)
            else:
                term = self.status["terminated"]
                term[verdict] = term.get(verdict, 0) + 1
                self.status["last_terminated"] = f"stream seq {stream_seq}: {detail}"[:const.MAX_ERROR_CHARS]
                log.warning("nats feed: terminated stream message %d (%s): %s", stream_seq, verdict, detail)
                await msg.term()
            if rest_back:
                return
            if self._stopping:   # stop() waits for the message in hand only
                for m in msgs[i + 1:]:
                    await m.nak()
                return

    async def _one(self, msg, delivered: int, stream_seq: int) -> tuple[str, str]:
        """One message -> (verdict, detail): ``ack``, ``nak`` (wait: a gap, or a forget with earlier messages
        unacknowledged), or the reason to terminate it.

        Raises:
            sqlite3.Error / OSError: the store failed (nothing stored or erased).
        """
        loop = asyncio.get_running_loop()
        verdict, detail, p = await loop.run_in_executor(self._pool, self._process, msg.subject, msg.data, delivered,
                                                        stream_seq)
        if verdict != "forget":
            return verdict, detail
        # an erasure applies to what the node shipped before it: wait until every earlier message is stored
        await self._nc.flush(CONNECT_TIMEOUT_SECONDS)   # the acks sent so far reach the server first
        floor = (await self._js.consumer_info(self.stream, self.durable)).ack_floor
        if floor is None or floor.stream_seq < stream_seq - 1:
            self.status["forget_waits"] += 1
            return "nak", f"earlier messages not yet stored (ack floor {floor.stream_seq if floor else 0})"
        out = await loop.run_in_executor(self._pool, self.store.forget, p["forget"])
        self.status["forgets"] += 1
        self.status["forgotten"] += out["removed"]
        log.info("nats feed: node %r: erased %d events of a forgotten pseudonym", p["node"], out["removed"])
        return "ack", ""

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _process(self, subject: str, data: bytes, delivered: int, stream_seq: int) -> tuple[str, str, dict | None]:
        """On the feed's thread: decode, check, store a batch. Returns (verdict, detail, map): ``ack``, ``nak`` (a
        gap waited out), ``forget`` (a valid erasure, left to ``_one``), or the reason to terminate (``undecodable``,
        ``invalid``, ``unknown_node``, ``subject``, ``conflict``).

        Raises:
            sqlite3.Error / OSError: the store failed (nothing stored; the message is retried).
        """
        try:
            p = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:   # msgpack raises several types for bad input
            return "undecodable", f"not MessagePack: {type(exc).__name__}: {exc}", None
        if not isinstance(p, dict):
            return "undecodable", f"not a map: {type(p).__name__}", None
        node = p.get("node")
        if isinstance(node, int) and not isinstance(node, bool):
            node = str(node)
        if isinstance(node, str) and node and subject != subject_for(node):
            return "subject", f"published on {subject!r}, but node {node[:64]!r} ships on {subject_for(node)!r}", None
        if "forget" in p:
            return self._check_forget(p)
        try:
            out = self.store.ingest(p)
        except InvalidParams as exc:
            unknown = self.store.nodes is not None and isinstance(node, str) and node not in self.store.nodes
            return ("unknown_node" if unknown else "invalid"), str(exc), None
        except SequenceMismatch as exc:
            held = self.store.cursor(node)["acked"]
            if p["after"] <= held:   # a re-send that differs from what is stored: a renumbered log
                return "conflict", str(exc), None
            if delivered < self.gap_deliveries:
                self.status["gap_naks"] += 1
                return "nak", str(exc), None
            out = self.store.ingest(dict(p, after=held))
            self.status["gaps"] += 1
            self.status["gap_events"] += p["after"] - held
            log.warning("nats feed: node %r: seqs %d..%d never arrived (stream message %d continues after %d, "
                        "%d deliveries); stored it from %d", node, held + 1, p["after"], stream_seq, p["after"],
                        delivered, held)
        self.status["batches"] += 1
        self.status["stored"] += out["stored"]
        self.status["duplicates"] += out["duplicates"]
        self.status["last_stored_at"] = time.time()
        return "ack", "", None

    def _check_forget(self, p: dict) -> tuple[str, str, dict | None]:
        if set(p) != {"node", "forget"}:
            return "invalid", f"forget: keys must be node and forget, got {sorted(map(str, p))}", None
        node, user = p["node"], p["forget"]
        if not isinstance(node, str) or not node:
            return "invalid", "forget: node must be a non-empty string", None
        if self.store.nodes is not None and node not in self.store.nodes:
            return "unknown_node", f"forget: unknown node {node[:64]!r}: not in the collector's node list", None
        if not is_pseudonym(user):
            return "invalid", f"forget: user must be a pseudonym ({const.PSEUDONYM_HEX_CHARS} lowercase hex)", None
        return "forget", "", p

    def _ok(self) -> None:
        if self.status["state"] == "offline":
            log.info("nats feed: connected to %s again", redact(self.url))
        if self.status["state"] != "ok" and self.status["state"] != "store_failed":
            self.status.update(state="ok", last_error=None)

    def _stored(self) -> None:
        if self.status["state"] == "store_failed":
            log.info("nats feed: storing works again")
        self.status.update(state="ok", last_error=None)

    def _failed(self, exc: BaseException, state: str = "offline") -> None:
        msg = f"{type(exc).__name__}: {exc}"[:const.MAX_ERROR_CHARS]
        if self.status["last_error"] != msg:
            log.warning("nats feed: %s; retrying with backoff", msg)
        self.status.update(state=state, last_error=msg)
