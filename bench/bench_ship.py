"""What shipping events upstream costs a node, and how fast a backlog drains (``fleet/shipper.py`` -> the collector in
``edgerec registry --collect``, MessagePack-RPC on loopback).

1. ``recommend`` latency on a node whose event log is on, while a steady ``track`` load runs (``--rate`` events/s
   in batches of 10, on its own connection), with shipping off and with shipping on (the shipper then reads and sends
   the log's new rows all the time); alternated ``--rounds`` times, each case a fresh node; ratio on / off.
2. Catch-up: a node logs ``--backlog`` events while its collector is down, then the collector starts: seconds until
   all are acknowledged, events/s.

``python bench/bench_ship.py --bundle DIR``; JSON to bench/results/ship.json. Prints the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_events import cpu_name, recommend_latency  # noqa: E402

from edge_runtime import const  # noqa: E402
from edge_runtime.client import Client  # noqa: E402
from edgerec.process import free_port, start_daemon, stop_daemon  # noqa: E402


def _registry(work: Path, port: int):
    return start_daemon(None, port, ["--bundles", str(work / "bundles"), "--collect", str(work / "collect"),
                                     "--no-discovery"], command="registry", log_path=work / "registry.log")


def _node(bundle: Path, state: Path, upstream: int | None, cfg: Path):
    port = free_port()
    extra = ["--state-dir", str(state), "--no-discovery", "--config", str(cfg)]
    if upstream is not None:
        extra += ["--upstream", f"127.0.0.1:{upstream}"]
    return start_daemon(bundle, port, extra, log_path=state.with_suffix(".log"), timeout=300), port


def _steady_load(port: int, items: list[str], rate: float, stop: threading.Event, sent: list[int]) -> None:
    with Client("127.0.0.1", port) as c:
        t0, i = time.monotonic(), 0
        while not stop.is_set():
            due = t0 + i / rate
            if time.monotonic() < due:
                time.sleep(due - time.monotonic())
            c.call("track_batch", events=[{"user": f"load-{(i + j) % 997}", "item": items[(i + j) % len(items)],
                                           "event": "view"} for j in range(10)])
            i += 10
            sent[0] = i


def _collected(work: Path) -> int:
    db = work / "collect" / const.COLLECTOR_DB
    if not db.is_file():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT count(*) FROM events").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--rate", type=float, default=2000.0, help="tracked events/s during the latency cases")
    ap.add_argument("--requests", type=int, default=2000, help="recommend calls per case")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--out", default="bench/results/ship.json")
    args = ap.parse_args(argv)
    bundle = Path(args.bundle)
    items = json.loads((bundle / "item_ids.json").read_text())[:5000]
    out: dict = {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(), "cases": []}
    print(f"CPU: {out['cpu']} ({out['cpus']} CPUs)")
    with tempfile.TemporaryDirectory(prefix="bench-ship-") as tmp:
        work = Path(tmp)
        cfg = work / "node.toml"
        cfg.write_text("[events]\nship_interval_seconds = 0.5\nship_max_backoff = 1.0\n")
        reg_port = free_port()
        reg = _registry(work, reg_port)
        try:
            for rnd in range(args.rounds):
                for mode in ("off", "on"):
                    state = work / f"state-{mode}-{rnd}"
                    proc, port = _node(bundle, state, reg_port if mode == "on" else None, cfg)
                    stop, sent = threading.Event(), [0]
                    loader = threading.Thread(target=_steady_load, args=(port, items, args.rate, stop, sent),
                                              daemon=True)
                    before = _collected(work)
                    try:
                        loader.start()
                        time.sleep(1.0)
                        rec = recommend_latency(port, items, n=args.requests)
                        with Client("127.0.0.1", port) as c:
                            up = c.call("health").get("upstream")
                    finally:
                        stop.set()
                        loader.join()
                        stop_daemon(proc)
                    row = {"round": rnd, "shipping": mode, "tracked": sent[0], "recommend": rec,
                           "shipped": (up or {}).get("shipped", 0), "collected": _collected(work) - before}
                    out["cases"].append(row)
                    print(f"round {rnd} shipping {mode:<3}: recommend p50 {rec['p50_us']:.0f} µs p99 "
                          f"{rec['p99_us']:.0f} µs while tracking {args.rate:.0f} events/s; shipped {row['shipped']}")
        finally:
            stop_daemon(reg)
        on = [c["recommend"] for c in out["cases"] if c["shipping"] == "on"]
        off = [c["recommend"] for c in out["cases"] if c["shipping"] == "off"]
        med = lambda rows, k: sorted(r[k] for r in rows)[len(rows) // 2]  # noqa: E731
        out["ratio"] = {"p50_on_vs_off": med(on, "p50_us") / med(off, "p50_us"),
                        "p99_on_vs_off": med(on, "p99_us") / med(off, "p99_us")}
        print(f"recommend with shipping / without: p50 {out['ratio']['p50_on_vs_off']:.2f}x, p99 "
              f"{out['ratio']['p99_on_vs_off']:.2f}x")
        # catch-up after an outage
        state = work / "state-backlog"
        reg_port = free_port()
        proc, port = _node(bundle, state, reg_port, cfg)
        try:
            with Client("127.0.0.1", port) as c:
                for i in range(0, args.backlog, 1000):
                    c.call("track_batch", events=[{"user": f"b-{(i + j) % 5000}", "item": items[(i + j) % len(items)],
                                                   "event": "view"} for j in range(1000)])
            base = _collected(work)
            t0 = time.perf_counter()
            reg = _registry(work, reg_port)
            while _collected(work) - base < args.backlog and time.perf_counter() - t0 < 600:
                time.sleep(0.1)
            secs = time.perf_counter() - t0
            n = _collected(work) - base
            stop_daemon(reg)
        finally:
            stop_daemon(proc)
        out["catch_up"] = {"events": n, "seconds": round(secs, 2), "events_per_s": n / secs,
                           "batch": const.SHIP_BATCH_EVENTS}
        print(f"catch-up after an outage: {n} events in {secs:.1f} s = {n / secs:.0f} events/s (batches of "
              f"{const.SHIP_BATCH_EVENTS}, one fsynced commit each, collector start included)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{args.out} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
