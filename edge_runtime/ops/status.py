"""The node's status page: ``GET /`` (HTML) and ``GET /status.json`` on the metrics port, beside ``/metrics``.

``RequestRing`` keeps the last minutes of requests in bounded memory: ``BUCKETS`` time buckets of ``BUCKET_S``
seconds (15 minutes), each holding, per method, a log-scale latency histogram (``SUB`` bins per octave from 1 µs to
2^26 µs, about 67 s; a reported quantile is within 4.5 % of the true sample's value) and an error count, and per
msgpack-rpc error code a count. ``add`` is on the request path (``ops/metrics.py`` ``Metrics.observe``): a clock
read, a dict lookup and two array increments; a method's histogram is allocated once per bucket it is seen in.
Memory: at most ``BUCKETS`` x (methods + 1) x (``BINS`` + 1) x 4 bytes (about 75 KiB per method ever called).
Everything else on the page (model, sync, sessions, cache, events/s, top items) is read from the service when the
page asks (``status``): an idle daemon does no status work.

The HTML is one static page with inline CSS and script and no external reference at all (nodes run offline; its
``Content-Security-Policy`` forbids loading anything but ``status.json`` from the same origin); it fetches
``status.json`` every ``REFRESH_MS`` and redraws itself.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import time
from array import array
from typing import Callable

import numpy as np

from .. import const, errors, scoring

BUCKET_S = const.STATUS_BUCKET_SECONDS
BUCKETS = const.STATUS_BUCKETS
SUB = const.STATUS_BINS_PER_OCTAVE
OCTAVES = const.STATUS_OCTAVES
BINS = OCTAVES * SUB + 1
TOP_US = float(2 ** OCTAVES)
MAX_CODES = const.STATUS_MAX_CODES
WINDOW_S = const.STATUS_WINDOW_SECONDS
REFRESH_MS = const.STATUS_REFRESH_MS
_ERRS = BINS           # index of a method's error count in its array
_NEVER = -(1 << 62)    # the bucket number of a slot never used (a clock may start near 0: not -1)

_log2 = math.log2

CODE_NAMES = {v: k.lower().replace("_", " ") for k, v in vars(errors).items()
              if k.isupper() and isinstance(v, int) and -32768 <= v <= -32000}


def _bin(us: float) -> int:
    """The histogram bin of a latency in µs (0 for < 1 µs and NaN, ``BINS - 1`` for >= ``TOP_US``)."""
    if us >= TOP_US:
        return BINS - 1
    return int(_log2(us) * SUB) if us > 1.0 else 0


def bin_value_us(b: int) -> float:
    """The value reported for bin ``b``, µs: the geometric middle of [2^(b/SUB), 2^((b+1)/SUB)); the top bin
    reports its lower edge (``TOP_US``)."""
    return TOP_US if b >= BINS - 1 else round(2.0 ** ((b + 0.5) / SUB), 1)


def quantile_us(hist: np.ndarray, q: float) -> float | None:
    """The ``q``-quantile (0 < q <= 1) of the latencies counted in ``hist`` ([BINS] counts), µs: the bin of the
    sample of rank ceil(q * n) (numpy's ``inverted_cdf``); None when ``hist`` is empty."""
    n = int(hist.sum())
    if n == 0:
        return None
    need = max(1, math.ceil(q * n - 1e-9))
    return bin_value_us(int(np.searchsorted(np.cumsum(hist), need)))


class RequestRing:
    """Requests of the last ``buckets`` x ``bucket_s`` seconds (see the module docstring).

    Args:
        bucket_s: seconds per bucket.
        buckets: buckets kept.
        clock: monotonic seconds (``time.monotonic``; tests pass their own).
        marks: called when a bucket takes its first request; what it returns (e.g. cumulative counters) is kept
            with the bucket, and ``mark(window_s)`` gives the oldest one inside a window (counters' deltas over it).

    Raises:
        ValueError: ``bucket_s`` <= 0 or ``buckets`` < 1.

    Not thread-safe: ``add`` and ``snapshot`` run on the daemon's event loop.
    """

    def __init__(self, bucket_s: float = BUCKET_S, buckets: int = BUCKETS,
                 clock: Callable[[], float] = time.monotonic, marks: Callable[[], object] | None = None):
        if bucket_s <= 0 or buckets < 1:
            raise ValueError(f"bucket_s must be > 0 and buckets >= 1, got {bucket_s}, {buckets}")
        self.bucket_s, self.buckets, self.clock, self._marks_fn = float(bucket_s), int(buckets), clock, marks
        self.started = clock()
        self._number = [_NEVER] * self.buckets             # the bucket number (clock // bucket_s) a slot holds
        self._hist: list[dict[str, array]] = [{} for _ in range(self.buckets)]
        self._codes: list[dict[int, int]] = [{} for _ in range(self.buckets)]
        self._marks: list[object] = [None] * self.buckets
        self._cur_hist, self._cur_codes = self._hist[0], self._codes[0]
        self._end = -math.inf                               # when the current bucket ends

    def _roll(self, now: float) -> None:
        number = int(now // self.bucket_s)
        slot = number % self.buckets
        if self._number[slot] != number:
            self._number[slot] = number
            self._hist[slot], self._codes[slot] = {}, {}
            self._marks[slot] = self._marks_fn() if self._marks_fn is not None else None
        self._cur_hist, self._cur_codes = self._hist[slot], self._codes[slot]
        self._end = (number + 1) * self.bucket_s

    def add(self, method: str, seconds: float, code: int | None) -> None:
        """One request: ``method`` (a bounded set of names: the caller folds unknown ones), its handler time in
        seconds, its error code (None: success)."""
        now = self.clock()
        if now >= self._end:
            self._roll(now)
        h = self._cur_hist.get(method)
        if h is None:
            h = self._cur_hist[method] = array("I", bytes(4 * (BINS + 1)))
        h[_bin(seconds * 1e6)] += 1
        if code is not None:
            h[_ERRS] += 1
            self.count_code(code, now)

    def count_code(self, code: int, now: float | None = None) -> None:
        """An error reply (or a connection-fatal error) with msgpack-rpc ``code``."""
        if now is None:
            now = self.clock()
            if now >= self._end:
                self._roll(now)
        codes = self._cur_codes
        if code not in codes and len(codes) >= MAX_CODES:
            code = 0
        codes[code] = codes.get(code, 0) + 1

    def _slots(self, window_s: float, now: float) -> tuple[list[int], int, float]:
        """The slots of the buckets that overlap the last ``window_s`` seconds (at most the whole ring), the newest
        bucket number, and the seconds they cover (from the oldest one's start, or the ring's; at least 1 s)."""
        newest = int(now // self.bucket_s)
        first = max(newest - self.buckets + 1, min(newest, int((now - window_s) // self.bucket_s)))
        slots = [s for s in range(self.buckets) if first <= self._number[s] <= newest]
        span = now - max(first * self.bucket_s, self.started)
        return slots, newest, max(1.0, span)

    def mark(self, window_s: float, now: float | None = None) -> object:
        """The ``marks()`` value taken at the first request of the oldest bucket inside the window (None: no
        bucket)."""
        now = self.clock() if now is None else now
        slots, _, _ = self._slots(window_s, now)
        if not slots:
            return None
        return self._marks[min(slots, key=lambda s: self._number[s])]

    def snapshot(self, window_s: float = WINDOW_S, now: float | None = None) -> dict:
        """The figures over the last ``window_s`` seconds (widened to whole buckets, so up to ``bucket_s`` more; at
        most the whole ring; never before the ring started).

        Returns:
            ``{window_s: seconds covered, methods: {method: {requests, per_s, p50_us, p99_us, errors}},
            total: {the same over every method}, errors: {code: count}, series: {bucket_s, per_s: [req/s per
            bucket, oldest first, the whole ring; None before the ring started], methods: {method: [...]}}}``;
            p50_us / p99_us are None without requests.
        """
        now = self.clock() if now is None else now
        slots, newest, span = self._slots(window_s, now)
        hists: dict[str, np.ndarray] = {}
        codes: dict[int, int] = {}
        for s in slots:
            for m, h in self._hist[s].items():
                a = np.frombuffer(h, dtype=np.uint32).astype(np.int64)
                if m in hists:
                    hists[m] += a
                else:
                    hists[m] = a
            for c, n in self._codes[s].items():
                codes[c] = codes.get(c, 0) + n
        total = np.zeros(BINS + 1, dtype=np.int64)
        methods = {}
        for m in sorted(hists):
            total += hists[m]
            methods[m] = self._figures(hists[m], span)
        return {"window_s": round(span, 3), "methods": methods, "total": self._figures(total, span),
                "errors": {str(c): n for c, n in sorted(codes.items())}, "series": self._series(newest, now)}

    @staticmethod
    def _figures(h: np.ndarray, span: float) -> dict:
        n = int(h[:BINS].sum())
        return {"requests": n, "per_s": round(n / span, 3), "errors": int(h[_ERRS]),
                "p50_us": quantile_us(h[:BINS], 0.5), "p99_us": quantile_us(h[:BINS], 0.99)}

    def _series(self, newest: int, now: float) -> dict:
        first, bs = newest - self.buckets + 1, self.bucket_s
        start_bucket = int(self.started // bs)
        per: dict[str, list] = {}
        for s in range(self.buckets):
            if not first <= self._number[s] <= newest:
                continue
            i = self._number[s] - first
            for m, h in self._hist[s].items():
                per.setdefault(m, [0] * self.buckets)[i] = int(sum(h) - h[_ERRS])
        # seconds each bucket covered: the first and the current one only in part
        lengths = [max(1.0, min((n + 1) * bs, now) - max(n * bs, self.started)) for n in range(first, newest + 1)]

        def rates(counts: list) -> list:
            return [None if first + i < start_bucket else round(c / lengths[i], 3) for i, c in enumerate(counts)]

        totals = [sum(col) for col in zip(*per.values())] if per else [0] * self.buckets
        return {"bucket_s": self.bucket_s, "per_s": rates(totals), "methods": {m: rates(c) for m, c in per.items()}}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None   # not Linux


def _ratio(hits: float, misses: float) -> float | None:
    looked = hits + misses
    return round(hits / looked, 4) if looked else None


def created_ts(manifest: dict) -> float | None:
    """A manifest's ``created_at`` (ISO 8601) as unix seconds; None when absent or not a date."""
    text = manifest.get("created_at")
    if not isinstance(text, str):
        return None
    try:
        return _dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def status(service, sync, ring: RequestRing, window_s: float = WINDOW_S) -> dict:
    """What ``/status.json`` answers: ``{now (unix s), uptime_s, scoring, pid, rss_bytes (None off Linux),
    model: {version, precision, items, created_at, age_s} or None, sync: {state, registry, registry_reachable,
    offline_since, last_success, errors, latest_seen} or None (no model sync), offline (bool), event_log: {state,
    rows, bytes, committed, refused} or None, upstream: {state, pending, shipped} or None, requests:
    RequestRing.snapshot(window_s), error_names: {code: name}, cache: {hit_rate_window, hit_rate, hits, misses,
    entries, entries_max}, sessions: {active, max, evicted, events_tracked}, analytics:
    events.analytics.Analytics.snapshot()}``. Rates are per second, latencies in µs, ages and times in seconds
    (unix time for ``now``, ``offline_since``, ``last_success``); hit rates in 0..1, None before any lookup.
    Raises nothing of its own: it only reads (the service's figures, the ring)."""
    now = time.time()
    m = service.model
    model = None
    if m is not None:
        created = created_ts(m.manifest)
        model = {"version": m.version, "precision": m.precision, "items": m.num_items,
                 "created_at": m.manifest.get("created_at"),
                 "age_s": round(max(0.0, now - created), 1) if created is not None else None}
    sy = None
    if sync is not None:
        st = sync.status
        sy = {k: st.get(k) for k in ("state", "registry", "registry_reachable", "offline_since", "last_success",
                                     "errors", "latest_seen")}
    ev = None
    if service.events is not None:
        st = service.events.status
        ev = {k: st.get(k) for k in ("state", "rows", "bytes", "committed", "refused")}
    up = None
    if getattr(service, "upstream", None) is not None:
        st = service.upstream.status
        up = {k: st.get(k) for k in ("state", "pending", "shipped")}
    cache, sessions = service.cache, service.sessions
    requests = ring.snapshot(window_s)
    mark = ring.mark(window_s)
    hit_window = _ratio(cache.hits - mark[0], cache.misses - mark[1]) if isinstance(mark, tuple) else None
    return {
        "now": round(now, 3), "uptime_s": round(now - service.started, 1), "scoring": scoring.IMPLEMENTATION,
        "pid": os.getpid(), "rss_bytes": _rss_bytes(),
        "model": model, "sync": sy, "offline": bool(sy is not None and sy["registry_reachable"] is False),
        "event_log": ev, "upstream": up, "requests": requests,
        "error_names": {c: CODE_NAMES.get(int(c), "other") for c in requests["errors"]},
        "cache": {"hit_rate_window": hit_window, "hit_rate": _ratio(cache.hits, cache.misses), "hits": cache.hits,
                  "misses": cache.misses, "entries": len(cache), "entries_max": cache.max_entries},
        "sessions": {"active": len(sessions), "max": sessions.max_sessions, "evicted": sessions.evicted,
                     "events_tracked": sessions.events_tracked},
        "analytics": service.analytics.snapshot(),
    }


def parse_window(query: str) -> float:
    """The ``window`` of a ``/status.json?window=SECONDS`` query string (``WINDOW_S`` when absent).

    Raises:
        ValueError: another parameter, or a window that is not a whole number of seconds in
            ``BUCKET_S``..``BUCKETS * BUCKET_S`` (the message says so).
    """
    if not query:
        return float(WINDOW_S)
    hi = int(BUCKETS * BUCKET_S)
    window = None
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if key != "window" or not sep or window is not None:
            raise ValueError(f"the only parameter is window=SECONDS (once), got {part[:40]!r}")
        if not (value.isdigit() and len(value) <= 6 and BUCKET_S <= int(value) <= hi):
            raise ValueError(f"window must be whole seconds in {int(BUCKET_S)}..{hi}, got {value[:40]!r}")
        window = float(value)
    return window


PAGE = ("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgerec node</title>
<style>
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;flex-wrap:wrap;gap:18px;align-items:baseline}
header h1{font-size:18px;margin:0}header .dim{color:#aab3c5}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:12px;padding:12px}
section{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
section.wide{grid-column:1/-1}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#5b6478;margin:0 0 8px}
table{border-collapse:collapse;width:100%}td,th{padding:3px 6px;text-align:right;white-space:nowrap}
th{color:#5b6478;font-weight:600;border-bottom:1px solid #e3e6ec}td:first-child,th:first-child{text-align:left}
tr+tr td{border-top:1px solid #f0f1f4}.big{font-size:22px;font-weight:600}.dim{color:#7a8396}
.kv{display:grid;grid-template-columns:auto 1fr;gap:2px 12px}.kv span:nth-child(odd){color:#5b6478}
.badge{display:inline-block;padding:0 8px;border-radius:10px;background:#dfe9f7;color:#17408b;font-weight:600}
.badge.bad{background:#fde2e1;color:#9b1c1c}.badge.good{background:#dcf5e3;color:#19692c}
#err{display:none;background:#fde2e1;color:#9b1c1c;padding:6px 18px}
button{border:1px solid #c6ccd8;background:#fff;border-radius:4px;padding:1px 8px;cursor:pointer}
button.on{background:#1d2330;color:#fff}
svg{width:100%;height:90px;background:#fafbfc;border:1px solid #e3e6ec;border-radius:4px}
ol{margin:0;padding-left:22px}li{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.cols{display:grid;grid-template-columns:repeat(3,1fr);gap:10px}
</style></head><body>
<header><h1>edgerec node</h1>
<span>model <b id="model-version">-</b> <span class="dim" id="model-detail"></span></span>
<span>age <b id="model-age">-</b></span><span>sync <span class="badge" id="sync-state">-</span></span>
<span class="dim">up <span id="uptime">-</span> &middot; scoring <span id="scoring">-</span> &middot;
updated <span id="updated">-</span> (<span id="refreshes">0</span>)</span></header>
<div id="err"></div>
<main>
<section class="wide"><h2>Requests over the last <span id="window">-</span>
<span style="float:right" id="windows"><button data-w="60">1 min</button> <button data-w="300">5 min</button>
<button data-w="900">15 min</button></span></h2>
<svg id="spark" viewBox="0 0 900 90" preserveAspectRatio="none"><polyline id="spark-all" fill="none"
stroke="#17408b" stroke-width="2" points=""/><polyline id="spark-recommend" fill="none" stroke="#2f9e44"
stroke-width="1.5" points=""/></svg>
<div class="dim">req/s per 10 s, last 15 min: <span style="color:#17408b">all</span>,
<span style="color:#2f9e44">recommend</span>; peak <span id="spark-max">-</span>/s</div>
<table id="methods"><thead><tr><th>method</th><th>req/s</th><th>requests</th><th>p50 µs</th><th>p99 µs</th>
<th>errors</th></tr></thead><tbody></tbody></table></section>
<section><h2>Errors by code</h2><table id="errors"><thead><tr><th>code</th><th>name</th><th>count</th></tr>
</thead><tbody></tbody></table><div class="dim" id="errors-none">none in the window</div></section>
<section><h2>Sync and events</h2><div class="kv">
<span>registry</span><span id="sync-registry">-</span><span>reachable</span><span id="sync-reachable">-</span>
<span>offline since</span><span id="sync-offline">-</span><span>last success</span><span id="sync-success">-</span>
<span>sync errors</span><span id="sync-errors">-</span><span>event log</span><span id="eventlog">-</span>
<span>shipping</span><span id="upstream">-</span></div></section>
<section><h2>Cache</h2><div><span class="big" id="cache-hit-window">-</span> hit rate in the window</div>
<div class="kv"><span>since start</span><span id="cache-hit">-</span><span>entries</span><span id="cache-entries">-
</span></div></section>
<section><h2>Sessions</h2><div><span class="big" id="sessions">-</span> active sessions</div><div class="kv">
<span>bound</span><span id="sessions-max">-</span><span>evicted</span><span id="sessions-evicted">-</span>
<span>shoppers 5 min</span><span id="shoppers-5m">-</span><span>shoppers 1 h</span><span id="shoppers-1h">-</span>
</div></section>
<section><h2>Events</h2><table id="events"><thead><tr><th>event</th><th>per s (last 60 s)</th></tr></thead>
<tbody></tbody></table><div class="kv"><span>applied since start</span><span id="events-tracked">-</span></div>
</section>
<section><h2>Node</h2><div class="kv">
<span>process</span><span id="pid">-</span><span>memory (RSS)</span><span id="rss">-</span>
<span>up</span><span id="uptime2">-</span><span>scoring</span><span id="scoring2">-</span>
<span>created</span><span id="model-created">-</span></div></section>
<section class="wide"><h2>Most active items, last hour</h2><div class="cols" id="top"></div></section>
</main>
<script>
"use strict";
var REFRESH = %REFRESH%, windowS = %WINDOW%, refreshes = 0, lastOk = 0, busy = false, timer = null;
var q = new URLSearchParams(location.search).get("window");
if (q) windowS = parseInt(q, 10) || windowS;
function $(id) { return document.getElementById(id); }
function set(id, v) { $(id).textContent = v; }
function num(v, d) {
  if (v === null || v === undefined) return "-";
  var s = Number(v).toFixed(d || 0), p = s.split(".");
  p[0] = p[0].replace(/\\B(?=(\\d{3})+(?!\\d))/g, ",");
  return p.join(".");
}
function pct(v) { return v === null || v === undefined ? "-" : (100 * v).toFixed(1) + " %"; }
function dur(s) {
  if (s === null || s === undefined) return "-";
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function ago(ts, now) { return ts ? dur(now - ts) + " ago" : "-"; }
function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function rows(tbody, list) {
  tbody.textContent = "";
  list.forEach(function (r) {
    var tr = el("tr");
    tr.setAttribute(r[0], r[1]);
    r[2].forEach(function (c) { tr.appendChild(el("td", c[0], c[1])); });
    tbody.appendChild(tr);
  });
}
function spark(id, series, top) {
  var pts = [], n = series.length;
  series.forEach(function (v, i) {
    if (v === null) return;
    pts.push((n > 1 ? i * 900 / (n - 1) : 0).toFixed(1) + "," + (86 - 82 * v / top).toFixed(1));
  });
  $(id).setAttribute("points", pts.join(" "));
}
function render(s) {
  var m = s.model, r = s.requests;
  set("model-version", m ? m.version : "no model");
  set("model-detail", m ? m.precision + ", " + num(m.items) + " items" : "");
  set("model-age", m ? dur(m.age_s) : "-");
  var sync = s.sync, st = $("sync-state");
  st.textContent = !sync ? "off (local bundle)" :
    sync.state + (s.offline && sync.state !== "offline" ? " (registry unreachable)" : "");
  st.className = "badge" + (s.offline ? " bad" : (sync && sync.state === "idle" ? " good" : ""));
  set("uptime", dur(s.uptime_s));
  set("scoring", s.scoring);
  set("uptime2", dur(s.uptime_s));
  set("scoring2", s.scoring);
  set("pid", "pid " + s.pid);
  set("rss", s.rss_bytes === null ? "-" : (s.rss_bytes / 1048576).toFixed(1) + " MiB");
  set("model-created", m && m.created_at ? m.created_at : "-");
  set("updated", new Date(s.now * 1000).toTimeString().slice(0, 8));
  set("window", dur(windowS) + (r.window_s < windowS - 1 ? " (up " + dur(r.window_s) + ")" : ""));
  set("sync-registry", sync ? (sync.registry || "not found yet") : "-");
  set("sync-reachable", sync ? String(sync.registry_reachable) : "-");
  set("sync-offline", sync ? ago(sync.offline_since, s.now) : "-");
  set("sync-success", sync ? ago(sync.last_success, s.now) : "-");
  set("sync-errors", sync ? num(sync.errors) : "-");
  var ev = s.event_log, up = s.upstream;
  set("eventlog", ev ? ev.state + ", " + num(ev.rows) + " rows, " + num(ev.committed) + " committed" : "off");
  set("upstream", up ? up.state + ", " + num(up.pending) + " pending, " + num(up.shipped) + " shipped" : "off");
  var ms = Object.keys(r.methods).sort(function (a, b) { return r.methods[b].requests - r.methods[a].requests; });
  var list = ms.map(function (k) {
    var f = r.methods[k];
    return ["data-method", k, [["m", k], ["rps", num(f.per_s, 1)], ["count", num(f.requests)],
      ["p50", num(f.p50_us)], ["p99", num(f.p99_us)], ["err", num(f.errors)]]];
  });
  var t = r.total;
  list.push(["data-method", "*", [["m", "all"], ["rps", num(t.per_s, 1)], ["count", num(t.requests)],
    ["p50", num(t.p50_us)], ["p99", num(t.p99_us)], ["err", num(t.errors)]]]);
  rows($("methods").tBodies[0], list);
  var codes = Object.keys(r.errors);
  rows($("errors").tBodies[0], codes.map(function (c) {
    return ["data-code", c, [["code", c], ["name", s.error_names[c]], ["count", num(r.errors[c])]]];
  }));
  $("errors-none").style.display = codes.length ? "none" : "";
  var top = Math.max.apply(null, [1].concat(r.series.per_s.filter(function (v) { return v !== null; })));
  spark("spark-all", r.series.per_s, top);
  spark("spark-recommend", r.series.methods.recommend || [], top);
  set("spark-max", num(top, 1));
  var c = s.cache;
  set("cache-hit-window", pct(c.hit_rate_window));
  set("cache-hit", pct(c.hit_rate) + " (" + num(c.hits) + " hits, " + num(c.misses) + " misses)");
  set("cache-entries", num(c.entries) + " / " + num(c.entries_max));
  var se = s.sessions, a = s.analytics;
  set("sessions", num(se.active));
  set("sessions-max", num(se.max));
  set("sessions-evicted", num(se.evicted));
  set("shoppers-5m", num(a.active_shoppers["5m"]));
  set("shoppers-1h", num(a.active_shoppers["1h"]));
  set("events-tracked", num(se.events_tracked));
  rows($("events").tBodies[0], Object.keys(a.events_per_second).map(function (e) {
    return ["data-event", e, [["event", e], ["rate", num(a.events_per_second[e], 2)]]];
  }));
  var box = $("top");
  box.textContent = "";
  Object.keys(a.top_items_1h).forEach(function (e) {
    var d = el("div"), ol = el("ol");
    ol.id = "top-" + e;
    d.appendChild(el("h2", "", e));
    a.top_items_1h[e].forEach(function (p) { ol.appendChild(el("li", "", p[0] + " (" + num(p[1]) + ")")); });
    if (!a.top_items_1h[e].length) d.appendChild(el("div", "dim", "none yet"));
    d.appendChild(ol);
    box.appendChild(d);
  });
  document.querySelectorAll("#windows button").forEach(function (b) {
    b.className = parseInt(b.getAttribute("data-w"), 10) === windowS ? "on" : "";
  });
}
function refresh() {
  if (busy) return;
  busy = true;
  clearTimeout(timer);
  fetch("status.json?window=" + windowS, {cache: "no-store"}).then(function (resp) {
    if (!resp.ok) return resp.text().then(function (t) { throw new Error(resp.status + ": " + t); });
    return resp.json();
  }).then(function (s) {
    render(s);
    refreshes += 1;
    lastOk = Date.now();
    set("refreshes", refreshes);
    $("err").style.display = "none";
  }).catch(function (e) {
    $("err").style.display = "block";
    $("err").textContent = "status unavailable: " + e.message +
      (lastOk ? " (figures from " + Math.round((Date.now() - lastOk) / 1000) + " s ago)" : "");
  }).then(function () { busy = false; timer = setTimeout(refresh, REFRESH); });
}
document.querySelectorAll("#windows button").forEach(function (b) {
  b.addEventListener("click", function () { windowS = parseInt(b.getAttribute("data-w"), 10); refresh(); });
});
refresh();
</script></body></html>
""").replace("%REFRESH%", str(REFRESH_MS)).replace("%WINDOW%", str(WINDOW_S)).encode("utf-8")

CSP = (b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
