"""The end-to-end section of ``bench_stream.py`` (``--e2e``): the whole loop as real processes on loopback.

* a registry with the collector (``edgerec registry --collect``) serving the pretrained bundle, signed;
* 2 nodes (``edgerec serve``) following it (model sync through a TCP relay each, so the network can be cut) and
  shipping their events to it (``[events] upstream = "registry"``);
* ``edgerec loop`` fine-tuning on the collected events every ``--e2e-interval`` s or ``--e2e-min-events`` events,
  publishing what passes its gate; the nodes hot-swap it;
* the stream's events after T0 replayed through ``track_batch`` in time order (each shopper on one node), at
  ``--e2e-rate`` events/s; during the first ``--e2e-events`` (the measured ones), node 1 is killed with SIGKILL
  and restarted, the registry (with the collector) is killed with SIGKILL and restarted, and node 2's link is cut
  for ``--e2e-cut`` s. The replay then goes on with the stream's next events (as a shop's traffic goes on) until
  every measured event is served or ``--e2e-drain`` s have passed: the quality gate judges a candidate on the newest
  events, so the last events of a stream that stopped would wait for traffic that never comes.

Measured: for every acknowledged event, the time from its acknowledgement at a node to the moment both nodes serve
a model that was trained on it (the loop records, per published version, the highest sequence number of each node
it learned from; the collector maps each event to its node's sequence number); p50 / p95 / max. And lost / duplicated
events: each replayed event carries a distinct time (its day plus an offset of seconds, so its day is kept), and the
collector must hold each acknowledged one exactly once.
"""
from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from edge_runtime import const
from edge_runtime.bundle.store import publish
from edge_runtime.client import Client
from edgerec.process import PACKAGE_ROOT, TcpRelay as Proxy, free_port, start_daemon, stop_daemon

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_stream.e2e")


class Replayer(threading.Thread):
    """Sends the events in order at ``rate`` events/s to their node; records (node, ts, ack time) per
    acknowledged event. A node that is down (killed) gets its events retried, same event ids, until it is back."""

    def __init__(self, events: list[dict], ports: list[int], rate: float, measured: int, batch: int = 5):
        super().__init__(daemon=True)
        self.events, self.ports, self.rate, self.batch = events, ports, rate, batch
        self.measured = {e["ts"] for e in events[:measured]}   # the events whose latency is reported
        self.n_measured = measured
        self.stop = threading.Event()
        self.acked: dict[int, tuple[int, float]] = {}   # ts -> (node index, ack time)
        self.sent = 0
        self.retries = 0
        self.done = threading.Event()
        self.progress = 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        clients: dict[int, Client] = {}
        pending: list[dict] = []
        i = 0
        while (i < len(self.events) or pending) and not self.stop.is_set():
            due = t0 + i / self.rate
            if i < len(self.events) and time.monotonic() < due and not pending:
                time.sleep(min(0.05, due - time.monotonic()))
                continue
            chunk = pending or self.events[i:i + self.batch]
            if not pending:
                i += len(chunk)
            pending = []
            by_node: dict[int, list[dict]] = {}
            for e in chunk:
                by_node.setdefault(e["node"], []).append(e)
            for node, evs in by_node.items():
                try:
                    c = clients.get(node) or Client("127.0.0.1", self.ports[node], timeout=10)
                    clients[node] = c
                    c.call("track_batch", events=[{k: e[k] for k in ("user", "item", "event", "ts", "event_id")}
                                                  for e in evs])
                    now = time.time()
                    for e in evs:
                        self.acked[e["ts"]] = (node, now)
                except (OSError, Exception):   # node down or refusing: retry these after a pause
                    c = clients.pop(node, None)
                    if c is not None:
                        c.close()
                    pending += evs
                    self.retries += 1
                    time.sleep(0.2)
            self.sent = i
            self.progress = min(1.0, i / self.n_measured)
        for c in clients.values():
            c.close()
        self.done.set()


def replay_events(stream, t_lo_day: int, n: int) -> list[dict]:
    """The first ``n`` events from ``t_lo_day`` on, in time order, each with a distinct time (its day + a per-day
    offset in seconds) and its shopper's node (by a hash of the id)."""
    rows = stream.rows(t_lo_day, int(stream.day.max()) + 1)[:n]
    out, per_day = [], {}
    for k, i in enumerate(rows):
        d = int(stream.day[i])
        off = per_day.get(d, 0)
        per_day[d] = off + 1
        user = stream.users[i]
        out.append({"user": f"shopper-{user}", "item": stream.items[i], "event": "purchase", "ts": d * 86400 + off,
                    "event_id": f"r{k}", "node": zlib.crc32(user.encode()) % 2})
    return out


def _collected(db: Path) -> list[tuple]:
    if not db.is_file():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT node, seq, ts FROM events").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "edgerec", *args], stdout=subprocess.DEVNULL, stderr=err,
                                cwd=PACKAGE_ROOT)


def run_e2e(stream, args, work: Path, bundle: Path, checkpoint: Path) -> dict:
    """Run the section (module docstring) from the pretrained ``bundle`` and its ``checkpoint``; returns its JSON."""
    work = Path(work) / "e2e"
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    key = work / "sign"
    subprocess.run([sys.executable, "-m", "edgerec", "keygen", "--out", str(key)], check=True, cwd=PACKAGE_ROOT,
                   stdout=subprocess.DEVNULL)
    registry_dir, collect = work / "registry", work / "collect"
    first = publish(bundle, registry_dir, f"{key}.key")
    reg_port = free_port()
    reg_args = ["--bundles", str(registry_dir), "--collect", str(collect), "--no-discovery"]
    reg = start_daemon(None, reg_port, reg_args, command="registry", log_path=work / "registry.log")
    proxies = [Proxy(reg_port), Proxy(reg_port)]
    cfg = work / "node.toml"
    cfg.write_text("[events]\nship_interval_seconds = 0.5\nship_max_backoff = 5.0\n[sync]\npoll_seconds = 2.0\n"
                   "max_backoff = 5.0\n")
    ports = [free_port(), free_port()]

    def node_start(k: int) -> subprocess.Popen:
        extra = ["--state-dir", str(work / f"node-{k}"), "--trusted-key", f"{key}.pub", "--registry",
                 f"127.0.0.1:{proxies[k].port}", "--upstream", "registry", "--node-id", f"node-{k}",
                 "--no-discovery", "--config", str(cfg)]
        return start_daemon(None, ports[k], extra, log_path=work / f"node-{k}.log", ready=("ok",), timeout=120)

    nodes = [node_start(0), node_start(1)]
    loop_args = ["loop", "--checkpoint", str(checkpoint), "--collect", str(collect), "--registry",
                 str(registry_dir), "--key", f"{key}.key", "--workdir", str(work / "loop"),
                 "--interval", str(args.e2e_interval), "--min-events", str(args.e2e_min_events),
                 "--time-budget", str(args.e2e_time_budget)]
    if stream.attributes_path:
        loop_args += ["--attributes", stream.attributes_path]
    loop = _spawn(loop_args, work / "loop.log")
    tail = int(args.e2e_rate * args.e2e_drain)
    events = replay_events(stream, stream.bounds[0][0], args.e2e_events + tail)
    served: dict[str, list[float | None]] = {first: [time.time(), time.time()]}
    stop_poll = threading.Event()

    def poll() -> None:
        while not stop_poll.is_set():
            for k in (0, 1):
                try:
                    with Client("127.0.0.1", ports[k], timeout=2) as c:
                        v = c.call("health")["model_version"]
                except (OSError, Exception):
                    continue
                if v is not None:
                    served.setdefault(v, [None, None])
                    if served[v][k] is None:
                        served[v][k] = time.time()
            stop_poll.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rep = Replayer(events, ports, args.e2e_rate, args.e2e_events)
    faults: list[dict] = []
    t_start = time.time()
    rep.start()
    try:
        plan = [(0.3, "kill node 0"), (0.5, "kill registry"), (0.7, "cut node 1")]
        for at, what in plan:
            while rep.progress < at and rep.is_alive():
                time.sleep(0.2)
            t = time.time()
            if what == "kill node 0":
                nodes[0].send_signal(signal.SIGKILL)
                nodes[0].wait()
                time.sleep(2)
                nodes[0] = node_start(0)
            elif what == "kill registry":
                reg.send_signal(signal.SIGKILL)
                reg.wait()
                time.sleep(3)
                reg = start_daemon(None, reg_port, reg_args, command="registry", log_path=work / "registry2.log")
            else:
                proxies[1].cut()
                time.sleep(args.e2e_cut)
                proxies[1].heal()
            faults.append({"fault": what, "at_s": round(t - t_start, 1), "seconds": round(time.time() - t, 1)})
            log.info("e2e: %s at %.0f s", what, t - t_start)
        while rep.progress < 1.0 and rep.is_alive():
            time.sleep(0.2)
        t_replayed = time.time()
        log.info("e2e: replayed the %d measured events in %.0f s (%d retries); the stream goes on until a model "
                 "trained on them is served", args.e2e_events, t_replayed - t_start, rep.retries)
        # wait until every acknowledged event is collected and a model trained through it is served by both nodes
        deadline = time.time() + args.e2e_drain
        while time.time() < deadline:
            cov = coverage(work, collect, served, rep)
            if cov["pending"] == 0:
                break
            time.sleep(5)
        rep.stop.set()
        rep.join()
        settle = time.time() + 60   # the last batches of the tail still travel; then count
        while time.time() < settle and coverage(work, collect, served, rep)["lost"]:
            time.sleep(1)
    finally:
        rep.stop.set()
        stop_poll.set()
        loop.send_signal(signal.SIGTERM)
        try:
            loop.wait(600)
        except subprocess.TimeoutExpired:
            loop.kill()
        for n in nodes:
            if n.poll() is None:
                stop_daemon(n)
        if reg.poll() is None:
            stop_daemon(reg)
        for p in proxies:
            p.close()
    cov = coverage(work, collect, served, rep)
    updates = json.loads((work / "loop" / "loop.json").read_text()).get("updates", [])
    return {"events_measured": args.e2e_events, "events_replayed": rep.sent, "rate_per_s": args.e2e_rate,
            "replay_s": round(t_replayed - t_start, 1),
            "retries": rep.retries, "faults": faults, "lost": cov["lost"], "duplicated": cov["duplicated"],
            "acknowledged": len(rep.acked), "collected": cov["collected"], "not_served_by_end": cov["pending"],
            "event_to_served_s": cov["latency"], "versions_published": sum(1 for u in updates if u.get("published")),
            "rounds": [{k: u.get(k) for k in ("published", "version", "events", "new_items", "seconds", "error")}
                       | {"gate": (u.get("gate") or {}).get("reason")} for u in updates],
            "loop": {"interval_s": args.e2e_interval, "min_events": args.e2e_min_events,
                     "time_budget_s": args.e2e_time_budget}}


def coverage(work: Path, collect: Path, served: dict, rep: Replayer) -> dict:
    """Lost / duplicated counts and the event -> served-by-both latencies so far."""
    rows = _collected(collect / const.COLLECTOR_DB)
    seq_of: dict[int, tuple[str, int]] = {}
    dup = 0
    for node, seq, ts in rows:
        t = int(ts)
        if t in seq_of:
            dup += 1
        seq_of[t] = (node, seq)
    lost = sum(1 for t in list(rep.acked) if t not in seq_of)
    try:
        updates = json.loads((work / "loop" / "loop.json").read_text()).get("updates", [])
    except (OSError, ValueError):
        updates = []
    pubs = [(u["published_at"], u["version"], u.get("through", {})) for u in updates if u.get("published")]
    both = {v: max(ts) for v, ts in served.items() if None not in ts}
    lat, pending = [], 0
    for t, (node_k, acked_at) in list(rep.acked.items()):
        if t not in rep.measured:
            continue
        where = seq_of.get(t)
        got = None
        if where is not None:
            node, seq = where
            for _, version, through in pubs:
                if through.get(node, 0) >= seq and version in both:
                    got = both[version] if got is None else min(got, both[version])
        if got is None:
            pending += 1
        else:
            lat.append(max(0.0, got - acked_at))
    a = np.asarray(lat) if lat else np.zeros(0)
    q = (lambda p: round(float(np.percentile(a, p)), 1)) if len(a) else (lambda p: None)
    return {"collected": len(rows), "lost": lost, "duplicated": dup, "pending": pending,
            "latency": {"events": int(len(a)), "p50": q(50), "p95": q(95), "max": q(100)}}


def add_arguments(ap) -> None:
    """The ``--e2e-*`` options (shared with ``bench_stream.py``)."""
    ap.add_argument("--e2e-events", type=int, default=6000, help="events replayed (default %(default)s)")
    ap.add_argument("--e2e-rate", type=float, default=15.0, help="events/s replayed (default %(default)s)")
    ap.add_argument("--e2e-interval", type=float, default=60.0, help="loop interval, s (default %(default)s)")
    ap.add_argument("--e2e-min-events", type=int, default=1500,
                    help="loop round after this many new events (default %(default)s)")
    ap.add_argument("--e2e-time-budget", type=float, default=20.0,
                    help="fine-tune training seconds per round (default %(default)s)")
    ap.add_argument("--e2e-cut", type=float, default=20.0, help="seconds node 2's link is cut (default %(default)s)")
    ap.add_argument("--e2e-drain", type=float, default=600.0,
                    help="s to wait after the replay for the last events to be served (default %(default)s)")


def main(argv=None) -> int:
    import argparse

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_stream

    ap = argparse.ArgumentParser(description="bench_stream's end-to-end section alone, from a pretrained bundle")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "amazon_beauty_s3rec_time" /
                                          "Beauty_time.txt"))
    ap.add_argument("--attributes", default=str(bench_stream.DEFAULT_ATTRIBUTES)
                    if bench_stream.DEFAULT_ATTRIBUTES.is_file() else None)
    ap.add_argument("--t0", default="2014-03-07")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--bundle", required=True, help="the pretrained bundle (its checkpoint: BUNDLE.ckpt)")
    ap.add_argument("--workdir", default="bench/results/stream-work")
    ap.add_argument("--out", default="bench/results/stream-e2e.json")
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    stream = bench_stream.load_stream(Path(args.data), args.t0, args.windows,
                                      Path(args.attributes) if args.attributes else None)
    bundle = Path(args.bundle)
    res = run_e2e(stream, args, Path(args.workdir), bundle, bundle.with_name(bundle.name + ".ckpt"))
    res["cpu"] = bench_stream.cpu_name()
    Path(args.out).write_text(json.dumps(res, indent=2))
    lat = res["event_to_served_s"]
    print(f"e2e: {res['acknowledged']} events acknowledged, {res['collected']} collected, lost {res['lost']}, "
          f"duplicated {res['duplicated']}; event -> served by both nodes: p50 {lat['p50']} s, p95 {lat['p95']} s, "
          f"max {lat['max']} s over {lat['events']} events ({res['not_served_by_end']} not served by the end); "
          f"{res['versions_published']} versions published; faults {[f['fault'] for f in res['faults']]}")
    print(f"{args.out} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
