"""The status page on the metrics port (``/`` and ``/status.json``, ``edge_runtime/ops/status.py``): the ring of
samples against numpy, its window and its bounds; the page and its JSON over HTTP from a real node (model sync
offline, event log and shipping on) under recommend / track load, bad requests answered with a 4xx; and the page
rendered by headless Chromium (Debian's ``chromium``; skipped without it unless ``EDGEREC_REQUIRE_CHROMIUM=1``),
whose figures appear and change while the load goes on."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pytest

from edge_runtime.bundle import signing
from edge_runtime.client import Client, RpcError
from edge_runtime.ops import status
from edge_runtime.ops.status import BINS, RequestRing, parse_window, quantile_us
from edgerec.process import free_port, start_daemon, stop_daemon

STEP = 2 ** (1 / (2 * status.SUB)) - 1   # the ring's quantile error bound (half a bin, relative)


class _Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------------------------------------- ring
def test_ring_quantiles_match_numpy_by_method():
    rng = np.random.default_rng(7)
    clock = _Clock()
    ring = RequestRing(clock=clock)
    lat = {"recommend": rng.lognormal(math.log(300e-6), 0.8, 20_000),   # seconds
           "track": rng.lognormal(math.log(60e-6), 0.4, 5_000)}
    order = [(m, s) for m, xs in lat.items() for s in xs]
    for i in rng.permutation(len(order)):
        clock.t += 0.01                                                  # 250 s of traffic, 25 buckets
        m, s = order[i]
        ring.add(m, float(s), -32602 if i % 100 == 0 else None)
    snap = ring.snapshot(900)
    for m, xs in lat.items():
        us = xs * 1e6
        f = snap["methods"][m]
        assert f["requests"] == len(xs)
        for q, key in ((0.5, "p50_us"), (0.99, "p99_us")):
            want = float(np.quantile(us, q, method="inverted_cdf"))
            assert abs(f[key] / want - 1) <= STEP + 1e-3, (m, q, f[key], want)
    every = np.concatenate([lat["recommend"], lat["track"]]) * 1e6
    assert abs(snap["total"]["p99_us"] / np.quantile(every, 0.99, method="inverted_cdf") - 1) <= STEP + 1e-3
    assert snap["total"]["requests"] == 25_000
    assert snap["total"]["errors"] == snap["errors"]["-32602"] == 250
    assert snap["window_s"] == pytest.approx(250, abs=0.1)              # since the ring started
    assert snap["total"]["per_s"] == pytest.approx(25_000 / 250, rel=1e-3)


def test_ring_quantile_of_known_samples_and_extremes():
    h = np.zeros(BINS, dtype=np.int64)
    assert quantile_us(h, 0.5) is None
    ring = RequestRing(clock=_Clock())
    for s in (0.0, float("nan"), -1.0, 1e-7, 5e-6, 1e9, float("inf")):   # never raises
        ring.add("recommend", s, None)
    f = ring.snapshot()["methods"]["recommend"]
    assert f["requests"] == 7
    assert f["p50_us"] <= 1.1                                           # 0, NaN, -1, 0.1 µs: the first bin
    assert f["p99_us"] == status.TOP_US                                  # 1e9 s and inf: the top bin
    ring = RequestRing(clock=_Clock())
    for us in (100, 200, 300, 400, 1000):
        ring.add("track", us / 1e6, None)
    f = ring.snapshot()["methods"]["track"]
    assert abs(f["p50_us"] / 300 - 1) <= STEP + 1e-3
    assert abs(f["p99_us"] / 1000 - 1) <= STEP + 1e-3


def test_ring_window_expiry_and_slot_reuse():
    clock = _Clock(0.0)
    ring = RequestRing(bucket_s=10, buckets=90, clock=clock)
    for _ in range(50):
        ring.add("recommend", 1e-3, None)
    ring.count_code(-32700)                                             # a connection-fatal error
    clock.t = 75.0
    for _ in range(7):
        ring.add("recommend", 2e-3, None)
    assert ring.snapshot(60)["methods"]["recommend"]["requests"] == 7   # 0..10 s is outside the last 60 s
    assert ring.snapshot(60)["errors"] == {}
    assert ring.snapshot(900)["methods"]["recommend"]["requests"] == 57
    assert ring.snapshot(900)["errors"] == {"-32700": 1}
    clock.t = 905.0                                                     # bucket 90 reuses slot 0
    ring.add("track", 1e-4, None)
    snap = ring.snapshot(900)
    assert snap["methods"]["recommend"]["requests"] == 7 and snap["methods"]["track"]["requests"] == 1
    assert snap["errors"] == {}
    series = snap["series"]["per_s"]
    assert len(series) == 90 and series[-1] == pytest.approx(1 / 5) and series[6] == pytest.approx(0.7)
    clock.t = 5000.0
    assert ring.snapshot(900)["total"]["requests"] == 0 and ring.snapshot(900)["methods"] == {}


def test_ring_marks_and_series_before_start():
    clock = _Clock(100.0)
    hits = [0]
    ring = RequestRing(clock=clock, marks=lambda: (hits[0],))
    ring.add("recommend", 1e-3, None)
    hits[0] = 5
    clock.t = 131.0
    ring.add("recommend", 1e-3, None)
    assert ring.mark(900) == (0,) and ring.mark(10) == (5,)
    assert ring.mark(10, now=10_000.0) is None
    series = ring.snapshot(900)["series"]["per_s"]
    assert series[:-4] == [None] * 86 and series[-4] == pytest.approx(0.1) and series[-1] == 1.0


def test_ring_memory_is_bounded():
    clock = _Clock(0.0)
    ring = RequestRing(bucket_s=10, buckets=6, clock=clock)
    methods = [f"m{i}" for i in range(5)]
    for i in range(200_000):
        clock.t = i * 0.01                                              # 2,000 s: the ring wraps 33 times
        ring.add(methods[i % 5], 1e-4 * (1 + i % 97), 1000 + i % 50)   # 50 distinct codes
    arrays = sum(len(h) for h in ring._hist)
    assert arrays <= 6 * 5
    assert all(len(h) == BINS + 1 for hs in ring._hist for h in hs.values())
    assert max(len(c) for c in ring._codes) <= status.MAX_CODES + 1     # the rest folded into code 0
    snap = ring.snapshot(60)
    assert snap["total"]["requests"] == 6000 and sum(snap["errors"].values()) == 6000
    assert "0" in snap["errors"]


def test_parse_window():
    assert parse_window("") == status.WINDOW_S
    assert parse_window("window=300") == 300.0
    for bad in ("window=5", "window=901", "window=abc", "window=", "window", "x=1", "window=60&window=60",
                "window=-60", "window=1e3", "window=60&x=1"):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)


# ---------------------------------------------------------------------------------------------- a node under load
class _Load:
    """recommend / track traffic from a thread (a few bad requests among it) until ``stop``; paced, so the page's
    figures have traffic to show without starving the browser of the 2 cores."""

    def __init__(self, port: int, items: list[str]):
        self.port, self.items, self.calls, self.failure = port, items, 0, None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with Client("127.0.0.1", self.port) as c:
                i = 0
                while not self._stop.is_set():
                    user = f"shopper-{i % 25}"
                    c.call("track", user=user, item=self.items[i % len(self.items)],
                           event="view" if i % 4 else "cart")
                    for _ in range(3):
                        c.call("recommend", user=user, k=10)
                    if i % 10 == 0:
                        try:
                            c.call("recommend", user=user, k="many")
                        except RpcError:
                            pass
                    i += 1
                    self.calls += 4
                    time.sleep(0.004)
        except Exception as exc:   # noqa: BLE001 - reported by the tests
            self.failure = exc

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_bundle, tiny_manifest, beauty_data):
    """A node serving a signed copy of the tiny bundle with model sync pointed at a registry that is not there
    (offline), the event log on and shipping to a collector that is not there either; a metrics port; load."""
    tmp = tmp_path_factory.mktemp("status")
    bundle = tmp / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    key, pub = signing.keygen(tmp / "signer")
    signing.sign_bundle(bundle, signing.load_private_key(key))
    port, mport = free_port(), free_port()
    proc = start_daemon(bundle, port, ["--state-dir", str(tmp / "state"), "--trusted-key", str(pub),
                                       "--registry", f"127.0.0.1:{free_port()}", "--upstream",
                                       f"127.0.0.1:{free_port()}", "--no-discovery", "--metrics-port", str(mport)],
                        log_path=tmp / "node.log")
    items = beauty_data.item_ids[:30]
    load = _Load(port, items)
    deadline = time.monotonic() + 20
    while load.calls < 200 and load.failure is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield {"port": port, "mport": mport, "version": tiny_manifest["model_version"], "items": items,
               "load": load, "proc": proc}
    finally:
        load.stop()
        assert stop_daemon(proc) == 0


def _get(mport: int, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{mport}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _raw(mport: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", mport), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_status_json_and_page_over_http(node):
    assert node["load"].failure is None, node["load"].failure
    code, headers, body = _get(node["mport"], "/status.json")
    assert code == 200 and headers["Content-Type"] == "application/json"
    s = json.loads(body)
    assert s["model"]["version"] == node["version"] and s["model"]["items"] > 0 and s["model"]["age_s"] >= 0
    assert s["sync"]["state"] == "offline" and s["sync"]["registry_reachable"] is False and s["offline"] is True
    assert s["event_log"]["state"] == "ok" and s["event_log"]["committed"] > 0
    assert s["upstream"]["state"] == "offline" and s["upstream"]["shipped"] == 0
    r = s["requests"]
    assert r["window_s"] <= 70.0                                        # 60 s widened to whole 10 s buckets
    assert s["pid"] == node["proc"].pid and s["rss_bytes"] > 10e6
    rec, trk = r["methods"]["recommend"], r["methods"]["track"]
    assert rec["requests"] > 100 and rec["per_s"] > 0 and trk["per_s"] > 0
    assert 0 < rec["p50_us"] <= rec["p99_us"] and 0 < trk["p50_us"] <= trk["p99_us"]
    assert rec["errors"] > 0 and r["errors"]["-32602"] == rec["errors"]
    assert s["error_names"]["-32602"] == "invalid params"
    assert r["series"]["per_s"][-1] > 0 and len(r["series"]["per_s"]) == status.BUCKETS
    assert 0 < s["cache"]["hit_rate_window"] < 1 and 0 < s["cache"]["hit_rate"] < 1
    assert 1 <= s["sessions"]["active"] <= 25 and s["sessions"]["events_tracked"] > 0
    a = s["analytics"]
    assert a["events_per_second"]["view"] > 0 and a["active_shoppers"]["5m"] >= 1
    assert a["top_items_1h"]["view"][0][0] in node["items"]
    assert json.loads(_get(node["mport"], "/status.json?window=900")[2])["requests"]["total"]["requests"] \
        >= r["total"]["requests"]

    code, headers, page = _get(node["mport"], "/")
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    html = page.decode()
    for external in ("http://", "https://", "//", "src=", "href=", "url(", "@import"):
        assert external not in html, external                        # no asset from anywhere else
    assert "<script>" in html and "<style>" in html and 'fetch("status.json' in html
    code, headers, empty = _get(node["mport"], "/", method="HEAD")
    assert code == 200 and empty == b"" and int(headers["Content-Length"]) == len(page)


def test_bad_requests_get_a_4xx_and_the_node_keeps_serving(node):
    mport = node["mport"]
    for path, want, says in (("/nope", 404, b"/status.json"), ("/status.json?window=abc", 400, b"window"),
                             ("/status.json?window=5", 400, b"10..900"), ("/status.json?x=1", 400, b"window"),
                             ("/status.json?window=60&window=60", 400, b"once")):
        code, _, body = _get(mport, path)
        assert code == want and says in body, (path, code, body)
    assert _get(mport, "/", method="POST")[0] == 405
    assert _raw(mport, b"\x00\x01\x02\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert _raw(mport, b"GET /status.json?window=\xff\xfe HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(mport, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    # a head far over the limit, still being sent when the 431 goes out: the client reads the 431, not a reset
    for _ in range(3):
        assert _raw(mport, b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 200_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    assert node["proc"].poll() is None
    assert _get(mport, "/status.json")[0] == 200 and b"edgerec_requests_total" in _get(mport, "/metrics")[2]


def test_idle_sockets_cannot_keep_scrapes_out_and_lf_heads_are_read(node):
    """Sockets holding every slot of the endpoint without sending a head are closed, oldest first, for new
    scrapes; a head whose lines end in a bare LF is answered like a CRLF one."""
    from edge_runtime import const

    mport = node["mport"]
    idle = [socket.create_connection(("127.0.0.1", mport), timeout=10) for _ in range(const.MAX_HTTP_CONNECTIONS + 4)]
    try:
        time.sleep(0.2)
        for _ in range(3):
            t0 = time.monotonic()
            code, _, body = _get(mport, "/metrics")
            assert code == 200 and b"edgerec_requests_total" in body
            assert time.monotonic() - t0 < 2.0     # not after the idle ones' 5 s head timeout
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""              # the oldest idle socket was closed for a newcomer
    finally:
        for sock in idle:
            sock.close()
    assert _raw(mport, b"GET /metrics HTTP/1.1\nHost: x\n\n").startswith(b"HTTP/1.1 200 ")


# ------------------------------------------------------------------------------------------------ headless Chromium
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("EDGEREC_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (EDGEREC_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")
    return exe


def render(exe: str, url: str, profile, *, budget_ms: int = 5000, screenshot=None) -> str:
    """The page at ``url`` as headless Chromium leaves it after ``budget_ms`` of virtual time (its own refreshes
    included): the serialized DOM, or with ``screenshot`` a PNG written there."""
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}", "--window-size=1280,1000"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    r = subprocess.run(args + [url], capture_output=True, text=True, timeout=45)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


class _Dom(HTMLParser):
    """Texts of a rendered page: by element id; by (row key, cell class) for table rows keyed by a data-*
    attribute; list items by their list's id."""

    def __init__(self, html: str):
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.cells: dict[tuple[str, str], str] = {}
        self.lists: dict[str, list[str]] = {}
        self._stack: list[list] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        key = next((v for k, v in attrs if k.startswith("data-")), None) if tag == "tr" else None
        self._stack.append([tag, a.get("id"), key, a.get("class"), []])

    def handle_data(self, data):
        if self._stack:
            self._stack[-1][4].append(data)

    def handle_endtag(self, tag):
        while self._stack:
            t, ident, _, cls, parts = frame = self._stack.pop()
            text = "".join(parts)
            if ident:
                self.by_id[ident] = text
            if t == "td":
                row = next((f[2] for f in reversed(self._stack) if f[0] == "tr"), None)
                self.cells[(row, cls)] = text
            if t == "li":
                ol = next((f[1] for f in reversed(self._stack) if f[0] == "ol"), None)
                self.lists.setdefault(ol, []).append(text)
            if self._stack:
                self._stack[-1][4].append(text)
            if frame[0] == tag:
                return


def _num(text: str) -> float:
    return float(text.replace(",", "").replace("%", "").strip())


def test_status_page_in_headless_chromium_under_load(node, tmp_path):
    exe = _chromium()
    url = f"http://127.0.0.1:{node['mport']}/?window=900"
    t0 = time.monotonic()
    first = _Dom(render(exe, url, tmp_path / "profile"))
    time.sleep(1.5)
    second = _Dom(render(exe, url, tmp_path / "profile"))
    took = time.monotonic() - t0
    assert node["load"].failure is None, node["load"].failure
    for dom in (first, second):
        assert dom.by_id["model-version"] == node["version"]
        assert int(dom.by_id["refreshes"]) >= 2                         # it refreshed itself within the load
        assert dom.by_id["sync-state"] == "offline" and dom.by_id["sync-reachable"] == "false"
        assert _num(dom.cells[("recommend", "rps")]) > 0 and _num(dom.cells[("track", "rps")]) > 0
        p50, p99 = _num(dom.cells[("recommend", "p50")]), _num(dom.cells[("recommend", "p99")])
        assert 0 < p50 <= p99
        assert _num(dom.cells[("-32602", "count")]) > 0 and dom.cells[("-32602", "name")] == "invalid params"
        assert 0 < _num(dom.by_id["cache-hit-window"]) < 100
        assert 1 <= _num(dom.by_id["sessions"]) <= 25
        assert _num(dom.cells[("view", "rate")]) > 0
        assert dom.lists["top-view"] and dom.lists["top-view"][0].split(" (")[0] in node["items"]
        assert dom.by_id["spark-max"] != "-" and dom.by_id["err"] == ""
        assert "offline" in dom.by_id["upstream"] and dom.by_id["eventlog"].startswith("ok")
    # the figures move with the load: the 15-minute window only grows while the node is younger than that
    assert _num(second.cells[("recommend", "count")]) > _num(first.cells[("recommend", "count")])
    assert _num(second.by_id["events-tracked"]) > _num(first.by_id["events-tracked"])
    assert second.by_id["updated"] != first.by_id["updated"]
    assert took < 50, took
