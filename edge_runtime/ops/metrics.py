"""Prometheus metrics (the ``prometheus_client`` library; text exposition format 0.0.4) and the ``stats`` RPC.

Request counts and latency histograms are updated on the request path (plain counters, ``_RequestCollector``: a dict
lookup, a bisect and three adds; the status page's ring of the last minutes, ``ops/status.py``, a few more);
everything else is read from the service when scraped (``_ServiceCollector``), so an idle daemon does no metrics
work. The same HTTP server answers ``/`` (the status page) and ``/status.json`` (``Metrics.serve_http``). Families:

==========================================  =====================================================================
``edgerec_requests_total{method}``           requests received, by method
``edgerec_request_duration_seconds{method}`` histogram of handler time (s), from the frame decoded to the reply
``edgerec_errors_total{code}``               error replies by msgpack-rpc error code (-32602 bad params, ...)
``edgerec_cache_hits_total`` / ``_misses``   recommend result cache lookups; ``edgerec_cache_hit_ratio`` (0..1)
``edgerec_cache_entries`` / ``_items``       cached results and the item ids they hold; ``..._max`` the bounds
``edgerec_events_tracked_total``             events applied (track / track_batch)
``edgerec_sessions`` / ``_max``              active shopper sessions and the bound; ``edgerec_session_events_max``
``edgerec_sessions_evicted_total``           sessions evicted by the LRU bound
``edgerec_model_info{version,precision}``    1 for the model served; ``edgerec_model_age_seconds`` since its
                                             ``created_at``; ``edgerec_model_items``
``edgerec_sync_state{state}``                1 for the sync state (idle, downloading, warming, offline, ...);
                                             ``edgerec_sync_registry_reachable``; ``edgerec_sync_errors_total``
``edgerec_scoring_info{path}``               1 for the scoring path in use (``native-avx512_vnni``, ``numba``, ...)
``edgerec_events_committed_total``           events committed to the event log; ``..._duplicate_total`` retries
``edgerec_events_refused_total``             events the log could not store (disk full, read-only): not acknowledged
``edgerec_event_log_degraded``               1 while the log cannot commit; ``edgerec_event_log_rows`` / ``_bytes``
``edgerec_events_per_second{event}``         events/s over the last 60 s, by type (``events/analytics.py``)
``edgerec_active_shoppers{window}``          distinct shoppers in the last 5m / 1h (HyperLogLog)
``edgerec_top_item_events_1h{event,rank,``   events of the hour's most viewed / carted / purchased items
``item}``
``edgerec_upstream_state{state}``            with shipping on: 1 for the state (starting, ok, offline, refused);
                                             ``edgerec_upstream_pending_events``, ``..._shipped_events_total``,
                                             ``..._dropped_unshipped_events_total``, ``..._forgets_pending``
``edgerec_auth_failures_total``              ``auth`` calls with a token that is not valid here
``edgerec_connections_closed_total{reason}`` connections closed by a bound: ``address_cap`` / ``connection_cap``
                                             (an idle one closed to admit a new one), ``refused``,
                                             ``auth_deadline``, ``auth_failures``
``process_resident_memory_bytes``            RSS (bytes), with the other ``process_*`` families of
                                             prometheus_client's ProcessCollector (Linux)
==========================================  =====================================================================
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from bisect import bisect_left as _bisect_left

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .. import const, scoring
from ..rpc.methods import MethodTable, check_keys
from . import status as status_page
from .status import RequestRing, created_ts

log = logging.getLogger("edgerec")

BUCKETS = const.LATENCY_BUCKETS
SYNC_STATES = ("starting", "idle", "downloading", "warming", "offline")
UPSTREAM_STATES = ("starting", "ok", "offline", "refused")
MAX_HTTP_CONNECTIONS = const.MAX_HTTP_CONNECTIONS
HTTP_TIMEOUT_S = const.HTTP_TIMEOUT_SECONDS
_TEXT = b"text/plain; charset=utf-8"


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """An HTTP request head up to its blank line, lines ending in CRLF or in a bare LF (RFC 9112 2.2 lets a server
    accept either). Raises ValueError past ``const.HTTP_HEAD_BYTES``, IncompleteReadError when the peer closes first."""
    head = bytearray()
    while True:
        line = await reader.readuntil(b"\n")   # at most the stream limit (8 KiB) per line, else LimitOverrunError
        head += line
        if len(head) > const.HTTP_HEAD_BYTES:
            raise ValueError("request head too large")
        if line in (b"\r\n", b"\n"):
            return bytes(head)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A lingering close (RFC 9112 9.6): after an error reply to a head that was not read to its end, send EOF and
    read and discard what the client still sends, for up to ``const.LINGER_SECONDS`` and
    ``const.HTTP_LINGER_BYTES``, so the client reads the reply instead of a connection reset (closing a socket with
    unread bytes makes the kernel send RST, which can destroy the reply in flight)."""
    if not writer.can_write_eof():
        return
    writer.write_eof()

    async def discard() -> None:
        left = const.HTTP_LINGER_BYTES
        while left > 0 and (chunk := await reader.read(min(left, 65536))):
            left -= len(chunk)

    try:
        await asyncio.wait_for(discard(), const.LINGER_SECONDS)
    except (asyncio.TimeoutError, ConnectionError):
        pass


class _ServiceCollector:
    def __init__(self, service, sync=None):
        self.service, self.sync = service, sync

    def collect(self):
        s = self.service
        g = GaugeMetricFamily
        cache, sessions = s.cache, s.sessions
        yield CounterMetricFamily("edgerec_cache_hits", "recommend result cache hits", value=cache.hits)
        yield CounterMetricFamily("edgerec_cache_misses", "recommend result cache misses", value=cache.misses)
        looked = cache.hits + cache.misses
        yield g("edgerec_cache_hit_ratio", "cache hits / lookups since start (0 before any lookup)",
                value=cache.hits / looked if looked else 0.0)
        yield g("edgerec_cache_entries", "cached recommend results", value=len(cache))
        yield g("edgerec_cache_entries_max", "bound on cached results (limits.cache_entries)", value=cache.max_entries)
        yield g("edgerec_cache_items", "item ids held by cached results", value=cache.weight)
        yield g("edgerec_cache_items_max", "bound on item ids held by the cache (limits.cache_items)",
                value=cache.max_items)
        yield CounterMetricFamily("edgerec_events_tracked", "events applied to sessions",
                                  value=sessions.events_tracked)
        yield g("edgerec_sessions", "active shopper sessions", value=len(sessions))
        yield g("edgerec_sessions_max", "bound on sessions (limits.max_sessions)", value=sessions.max_sessions)
        yield g("edgerec_session_events_max", "events kept per session (limits.session_events)",
                value=sessions.max_events)
        yield CounterMetricFamily("edgerec_sessions_evicted", "sessions evicted by the LRU bound",
                                  value=sessions.evicted)
        m = s.model
        info = g("edgerec_model_info", "the model served (1)", labels=["version", "precision"])
        if m is not None:
            info.add_metric([m.version, m.precision], 1.0)
        yield info
        if m is not None:
            created = created_ts(m.manifest)
            if created is not None:
                yield g("edgerec_model_age_seconds", "seconds since the served model was created",
                        value=max(0.0, time.time() - created))
            yield g("edgerec_model_items", "items in the served catalog", value=m.num_items)
            provider = g("edgerec_model_provider_info", "ONNX Runtime execution provider of the served encoder (1)",
                         labels=["provider"])
            provider.add_metric([m.provider], 1.0)
            yield provider
        path = g("edgerec_scoring_info", "scoring path in use (1)", labels=["path"])
        path.add_metric([scoring.IMPLEMENTATION], 1.0)
        yield path
        events = s.events
        if events is not None:
            st = events.status
            yield CounterMetricFamily("edgerec_events_committed", "events committed to the event log",
                                      value=st["committed"])
            yield CounterMetricFamily("edgerec_events_duplicate", "events acknowledged as retries (event_id seen)",
                                      value=st["duplicates"])
            yield CounterMetricFamily("edgerec_events_refused", "events refused: the log could not store them",
                                      value=st["refused"])
            yield g("edgerec_event_log_degraded", "1 while the event log cannot commit",
                    value=1.0 if st["state"] == "degraded" else 0.0)
            yield g("edgerec_event_log_rows", "rows in the event log", value=st["rows"])
            yield g("edgerec_event_log_bytes", "bytes of live pages in the event log", value=st["bytes"])
        snap = s.analytics.snapshot()
        rate = g("edgerec_events_per_second", "events per second over the last 60 s", labels=["event"])
        for t, v in snap["events_per_second"].items():
            rate.add_metric([t], v)
        yield rate
        active = g("edgerec_active_shoppers", "distinct shoppers with an event in the window (HyperLogLog)",
                   labels=["window"])
        for w, v in snap["active_shoppers"].items():
            active.add_metric([w], v)
        yield active
        top = g("edgerec_top_item_events_1h", "events of the most active items in the last hour",
                labels=["event", "rank", "item"])
        for t, rows in snap["top_items_1h"].items():
            for rank, (item, count) in enumerate(rows, 1):
                top.add_metric([t, str(rank), item], count)
        yield top
        up = getattr(s, "upstream", None)
        if up is not None:
            st = up.status
            state = g("edgerec_upstream_state", "event shipping state (1 for the current one)", labels=["state"])
            for name in UPSTREAM_STATES:
                state.add_metric([name], 1.0 if st["state"] == name else 0.0)
            yield state
            yield g("edgerec_upstream_pending_events", "committed events not yet acknowledged by the collector",
                    value=float(st["pending"] or 0))
            yield CounterMetricFamily("edgerec_upstream_shipped_events", "events acknowledged by the collector",
                                      value=st["shipped"])
            yield CounterMetricFamily("edgerec_upstream_dropped_unshipped_events",
                                      "events the log's size cap or retention removed before they were shipped",
                                      value=st["dropped_unshipped"])
            yield g("edgerec_upstream_forgets_pending", "erasures owed to the collector",
                    value=float(st["forgets_pending"]))
        sync = self.sync
        if sync is not None:
            st = g("edgerec_sync_state", "model sync state (1 for the current one)", labels=["state"])
            for name in SYNC_STATES:
                st.add_metric([name], 1.0 if sync.status["state"] == name else 0.0)
            yield st
            yield g("edgerec_sync_registry_reachable", "1 if the last registry call succeeded",
                    value=1.0 if sync.status["registry_reachable"] else 0.0)
            yield CounterMetricFamily("edgerec_sync_errors", "model sync failures", value=sync.status["errors"])


class _RequestCollector:
    """``edgerec_requests_total{method}`` and ``edgerec_request_duration_seconds{method}`` from plain counters: per
    method a list [count, sum of seconds, one count per bucket of ``BUCKETS`` + the +Inf one], added to on the
    request path (a dict lookup, a bisect and three adds: prometheus_client's Counter and Histogram, with a lock
    each, cost the 100 µs request about 6 µs) and turned into the two families when scraped (same names, labels
    and buckets as a Counter and a Histogram; no ``_created`` series)."""

    def __init__(self):
        self.by_method: dict[str, list] = {}

    def series(self, name: str) -> list:
        acc = self.by_method.get(name)
        if acc is None:
            acc = self.by_method[name] = [0, 0.0] + [0] * (len(BUCKETS) + 1)
        return acc

    def collect(self):
        req = CounterMetricFamily("edgerec_requests", "requests received", labels=["method"])
        lat = HistogramMetricFamily("edgerec_request_duration_seconds", "handler time per request (s)",
                                    labels=["method"])
        for name, acc in list(self.by_method.items()):
            counts = acc[2:]
            total, cumulative = 0, []
            for bound, c in zip([*map(floatToGoString, BUCKETS), "+Inf"], counts):
                total += c
                cumulative.append((bound, total))
            req.add_metric([name], acc[0])
            lat.add_metric([name], cumulative, sum_value=acc[1])
        yield req
        yield lat


class Metrics:
    """The node's Prometheus registry (one per service: tests run several in a process); the RPC server's observer
    (``rpc.server.Observer``).

    Args:
        service: the node's ``serving.service.Service`` (sessions, cache, model are read when scraped).
        methods: the method table; requests for other names are counted under ``method="other"``.
        sync: the node's ``fleet.sync.SyncManager``, or None.
    """

    def __init__(self, service, methods: MethodTable, sync=None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = _RequestCollector()
        self.registry.register(self.requests)
        self.errors = Counter("edgerec_errors", "error replies by msgpack-rpc code", ["code"],
                              registry=self.registry)
        self.auth_failures = Counter("edgerec_auth_failures", "auth calls with a token not valid here (or none)",
                                     registry=self.registry)
        self.closed = Counter("edgerec_connections_closed", "connections closed or refused by a bound, by reason",
                              ["reason"], registry=self.registry)
        ProcessCollector(registry=self.registry)
        self.registry.register(_ServiceCollector(service, sync))
        self._service, self._sync = service, sync
        self._known = methods   # live: methods added later count too
        # the status page's last minutes (ops/status.py), with the cache counters at each bucket's start
        self.ring = RequestRing(marks=lambda: (service.cache.hits, service.cache.misses))
        self.http = None

    def declare_methods(self) -> None:
        """Create every known method's request and latency series now (at 0), once the method table is complete:
        the first request of a method then does not pay for creating them (measured ~60 µs), and a scrape shows
        them before any traffic."""
        for name in self._known:
            self.requests.series(name)

    def observe(self, method, seconds: float, code: int | None) -> None:
        # unknown method names are folded into one label value: a client cannot grow the label set
        name = method if isinstance(method, str) and method in self._known else "other"
        acc = self.requests.by_method.get(name) or self.requests.series(name)
        acc[0] += 1
        acc[1] += seconds
        acc[2 + _bisect_left(BUCKETS, seconds)] += 1   # the first bucket whose upper bound (le) holds it
        self.ring.add(name, seconds, code)
        if code is not None:
            self.errors.labels(str(code)).inc()

    def count_error(self, code: int) -> None:
        """An error that closed a connection before any request could be read (parse error, oversized frame)."""
        self.errors.labels(str(code)).inc()
        self.ring.count_code(code)

    def count_auth_failure(self) -> None:
        self.auth_failures.inc()

    def count_closed(self, reason: str) -> None:
        """A connection closed by a bound: address_cap / connection_cap (an idle one closed to admit a new one),
        refused, auth_deadline, auth_failures."""
        self.closed.labels(reason).inc()

    def rpc_stats(self, p: dict) -> dict:
        """The ``stats {}`` method: ``stats()`` plus ``analytics`` (``events.analytics.Analytics.snapshot``) and
        ``scoring`` (``Service.scoring_stats``: encoder and scan time, batches)."""
        check_keys(p, (), (), "stats")
        return dict(self.stats(), analytics=self._service.analytics.snapshot(),
                    scoring=self._service.scoring_stats())

    async def serve_http(self, host: str, port: int) -> None:
        """HTTP on host:port, served by the daemon's event loop: ``GET /metrics``, the Prometheus text exposition
        (prometheus_client renders it: ``generate_latest``); ``GET /``, the status page (HTML, ``ops/status.py``);
        ``GET /status.json[?window=SECONDS]``, its figures (``status.status``). At most ``MAX_HTTP_CONNECTIONS``
        at once (at the cap, the one that has waited longest for its request head is closed for the newcomer),
        5 s to send a request head of at most 8 KiB (CRLF or LF lines), one response per connection; HEAD too. Other
        methods get 405, other paths 404, a bad query 400, a head over 8 KiB or not sent in time a closed
        connection."""
        self._http_active = 0
        self._http_waiting: dict[asyncio.StreamWriter, None] = {}   # connections still sending their head, oldest first
        self.http = await asyncio.start_server(self._handle_http, host, port, limit=const.HTTP_HEAD_BYTES,
                                               reuse_address=True)

    async def _handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._http_active >= MAX_HTTP_CONNECTIONS:
            if not self._http_waiting:   # every slot is answering: the newcomer waits for none of them
                writer.close()
                return
            # the slot of the connection that has waited longest for its request head (idle or trickling) goes to
            # the newcomer, so idle sockets cannot keep scrapes out (its handler ends on the closed transport)
            oldest = next(iter(self._http_waiting))
            self._http_waiting.pop(oldest)
            oldest.transport.abort()
        self._http_active += 1
        self._http_waiting[writer] = None
        try:
            parts: list[bytes] = []
            try:
                head = await asyncio.wait_for(_read_head(reader), HTTP_TIMEOUT_S)
            except (asyncio.IncompleteReadError, ConnectionError):   # closed before the head ended: nobody to answer
                return
            except (asyncio.LimitOverrunError, ValueError):
                status, body, ctype = b"431 Request Header Fields Too Large", b"request head over 8 KiB\n", _TEXT
            except asyncio.TimeoutError:
                status, body, ctype = b"408 Request Timeout", b"request head not sent within 5 s\n", _TEXT
            else:
                parts = head.split(b"\n", 1)[0].split()
                try:
                    status, body, ctype = self._http_response(parts)
                except Exception:   # a fault in a page must not take the endpoint (or the node) down
                    log.exception("metrics endpoint: %r failed", bytes(parts[1][:80]) if len(parts) > 1 else b"")
                    status, body, ctype = b"500 Internal Server Error", b"internal error, see the log\n", _TEXT
            extra = b""
            if ctype.startswith(b"text/html"):
                extra = b"Content-Security-Policy: " + status_page.CSP + b"\r\nX-Content-Type-Options: nosniff\r\n"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nCache-Control: no-store\r\n" + extra
                         + b"Connection: close\r\n\r\n" + (body if parts[:1] != [b"HEAD"] else b""))
            await asyncio.wait_for(writer.drain(), HTTP_TIMEOUT_S)
            if status.startswith(b"431"):   # the head was not read to its end: the client may still be sending it
                await _linger(reader, writer)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self._http_waiting.pop(writer, None)
            self._http_active -= 1
            writer.close()

    def _http_response(self, parts: list[bytes]) -> tuple[bytes, bytes, bytes]:
        """(status line, body, content type) for a request line split on spaces."""
        usage = b"GET /metrics, / (status page) or /status.json?window=SECONDS\n"
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            return b"405 Method Not Allowed", usage, _TEXT
        path, _, query = parts[1].partition(b"?")
        if path == b"/metrics":
            return b"200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()
        if path == b"/":
            return b"200 OK", status_page.PAGE, b"text/html; charset=utf-8"
        if path != b"/status.json":
            return b"404 Not Found", usage, _TEXT
        try:
            window = status_page.parse_window(query.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            return b"400 Bad Request", f"{exc}\n".encode("ascii", "backslashreplace"), _TEXT
        body = json.dumps(status_page.status(self._service, self._sync, self.ring, window),
                          separators=(",", ":")).encode()
        return b"200 OK", body, b"application/json"

    async def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None

    def stats(self) -> dict:
        """The same figures as the endpoint: {family: value} or {family: [{labels..., value}]} (histograms:
        count, sum, and p50 / p99 estimated from the buckets, in s)."""
        out: dict = {}
        for fam in self.registry.collect():
            if fam.type == "histogram":
                per: dict = {}
                for smp in fam.samples:
                    key = smp.labels.get("method", "")
                    d = per.setdefault(key, {"buckets": []})
                    if smp.name.endswith("_count"):
                        d["count"] = smp.value
                    elif smp.name.endswith("_sum"):
                        d["sum"] = smp.value
                    elif smp.name.endswith("_bucket"):
                        d["buckets"].append((float(smp.labels["le"]), smp.value))
                for d in per.values():
                    d["p50_s"], d["p99_s"] = (_quantile(d["buckets"], q) for q in (0.5, 0.99))
                    del d["buckets"]
                out[fam.name] = per
                continue
            rows = [s for s in fam.samples if not s.name.endswith("_created")]
            if len(rows) == 1 and not rows[0].labels:
                out[rows[0].name] = rows[0].value
            elif rows:
                out[fam.name] = [dict(s.labels, value=s.value) for s in rows]
        return out


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (the Prometheus histogram_quantile idea, without
    interpolation)."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


class MetricsEndpoint:
    """Prometheus /metrics over HTTP on the event loop (``Metrics.serve_http``), a component of
    ``ops.daemon.Daemon``; off when ``port`` is 0."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        self.metrics, self.host, self.port = metrics, host, port

    async def start(self, server) -> None:
        if self.port:
            await self.metrics.serve_http(self.host, self.port)
            log.info("metrics on http://%s:%d/metrics, the status page on /", self.host, self.port)

    async def stop(self) -> None:
        await self.metrics.close()
