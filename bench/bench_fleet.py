"""Fleet update under load: a registry and 3 edge daemons on loopback; a new version is published while a load
generator keeps a steady request rate on every node.

Everything is real: ``edgerec registry`` and three ``edgerec serve --state-dir`` processes that find the registry
and each other over zeroconf (bound to 127.0.0.1), Ed25519-signed bundles, chunked verified transfers, warm-up and
hot swap. The load generator (this process, asyncio, open loop: requests are sent on a fixed schedule whatever the
replies do) sends ``recommend`` calls with real Beauty histories at ``--rate`` requests/s per node.

Reported (printed and written as JSON, plus a PNG of latency and RSS over time):

* publish -> serving: seconds from the start of ``edgerec publish`` (another process) to each node's first reply
  from the new version;
* failed requests (errors, timeouts, refused connections) over the whole run: must be 0;
* p50 / p99 latency (µs) in steady state (before the publish) and during the swap (publish -> last node + 1 s);
* RSS per node (``/proc/<pid>/status``, sampled every 20 ms): steady median and peak during the swap, against
  steady + the new bundle's size (bytes);
* bytes served by the registry and by peers for the update.

    python bench/bench_fleet.py --bundle DIR [--rate 100] [--steady 6] [--after 6] [--out bench/results/fleet.json]

Bounded: the run stops ``--after`` s after the last node switched, or ``--max-seconds`` after the publish.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.bundle import load_manifest  # noqa: E402
from edge_runtime.bundle import signing  # noqa: E402
from edge_runtime.bundle.store import publish  # noqa: E402
from edge_runtime.client import Client  # noqa: E402
from edgerec.process import PACKAGE_ROOT, free_port, start_daemon, stop_daemon  # noqa: E402

NODES = 3


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pids: list[int], period: float = 0.02):
        super().__init__(daemon=True)
        self.pids, self.period = pids, period
        self.samples: list[tuple[float, list[int | None]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), [rss_bytes(p) for p in self.pids]))
            time.sleep(self.period)


def contexts(n: int = 2000) -> list[list[str]]:
    from importlib.resources import files
    lines = files("trainer").joinpath("datasets/amazon_beauty_s3rec/Beauty.txt").read_text().splitlines()
    rng = np.random.default_rng(0)
    return [lines[i].split()[1:-1] or lines[i].split()[1:2] for i in rng.choice(len(lines), n, replace=False)]


async def node_load(port: int, rate: float, ctxs: list, stop: asyncio.Event, log: list, node: int) -> None:
    """Open-loop load on one node over one pipelined connection: a request every 1/rate s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    unpacker = msgpack.Unpacker(raw=False)
    sent: dict[int, float] = {}

    async def read() -> None:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            unpacker.feed(data)
            for msg in unpacker:
                t0 = sent.pop(msg[1], None)
                if t0 is None:
                    continue
                ok = msg[2] is None
                log.append((t0, (time.monotonic() - t0) * 1e6, node, msg[3]["model_version"] if ok else None,
                            None if ok else str(msg[2])))

    reader_task = asyncio.ensure_future(read())
    period, nxt, msgid = 1.0 / rate, time.monotonic(), 0
    while not stop.is_set():
        msgid += 1
        ctx = ctxs[msgid % len(ctxs)]
        sent[msgid] = time.monotonic()
        writer.write(msgpack.packb([0, msgid, "recommend", [{"history": ctx[-50:], "k": 10}]]))
        nxt += period
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    deadline = time.monotonic() + 5
    while sent and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for t0 in sent.values():   # never answered: failures
        log.append((t0, float("nan"), node, None, "no reply"))
    reader_task.cancel()
    writer.close()


def pct(lat: list[float]) -> dict:
    a = np.asarray([x for x in lat if np.isfinite(x)])
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "p50_us": round(float(np.percentile(a, 50)), 1),
            "p99_us": round(float(np.percentile(a, 99)), 1), "max_us": round(float(a.max()), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="the bundle to publish (as v1, then again as v2)")
    ap.add_argument("--bundle2", default=None, help="publish this bundle as v2 instead of re-publishing --bundle")
    ap.add_argument("--rate", type=float, default=100.0, help="requests/s per node")
    ap.add_argument("--steady", type=float, default=6.0, help="seconds of steady load before the publish")
    ap.add_argument("--after", type=float, default=6.0, help="seconds of load after the last node switched")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="give up this long after the publish")
    ap.add_argument("--out", default="bench/results/fleet.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgerec-fleet-"))
    signing.keygen(work / "trainer")
    reg_dir = work / "registry"
    publish(args.bundle, reg_dir, work / "trainer.key", version="v1")
    rport, ports = free_port(), [free_port() for _ in range(NODES)]
    procs = [start_daemon(None, rport, ["--bundles", str(reg_dir)], command="registry",
                          log_path=work / "registry.log")]
    for i, port in enumerate(ports):
        procs.append(start_daemon(None, port, ["--state-dir", str(work / f"node{i}"), "--trusted-key",
                                               str(work / "trainer.pub"), "--node-id", f"node{i}",
                                               "--poll-seconds", "600"],
                                  log_path=work / f"node{i}.log", ready=("ok", "no_model")))
    try:
        def versions() -> list:
            out = []
            for port in ports:
                with Client("127.0.0.1", port) as c:
                    out.append(c.call("health")["model_version"])
            return out
        deadline = time.monotonic() + 60
        while versions() != ["v1"] * NODES and time.monotonic() < deadline:
            time.sleep(0.2)
        if versions() != ["v1"] * NODES:
            raise RuntimeError(f"nodes did not all reach v1: {versions()} (logs in {work})")
        with Client("127.0.0.1", rport) as c:
            reg_bytes0 = c.call("health")["bytes_served"]
        peer_bytes0 = 0
        for port in ports:
            with Client("127.0.0.1", port) as c:
                peer_bytes0 += c.call("health")["sync"]["bytes_served_to_peers"]
        ctxs = contexts()
        sampler = RssSampler([p.pid for p in procs[1:]])
        sampler.start()
        log: list = []
        marks: dict = {}

        async def run() -> None:
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(node_load(p, args.rate, ctxs, stop, log, i)) for i, p in enumerate(ports)]
            await asyncio.sleep(args.steady)
            v2src = args.bundle2 or args.bundle
            # published by another process, as a trainer would (and so the load generator's loop stays free)
            marks["publish"] = time.monotonic()
            pub = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgerec", "publish", str(v2src), "--registry", str(reg_dir), "--key",
                str(work / "trainer.key"), "--version", "v2", cwd=PACKAGE_ROOT,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            if await pub.wait() != 0:
                raise RuntimeError("edgerec publish failed")
            marks["published"] = time.monotonic()
            switched: dict[int, float] = {}
            while len(switched) < NODES and time.monotonic() - marks["publish"] < args.max_seconds:
                for t0, _, node, ver, _err in log[-500:]:
                    if ver == "v2" and node not in switched:
                        switched[node] = min(t0, switched.get(node, t0))
                await asyncio.sleep(0.05)
            for t0, _, node, ver, _err in log:
                if ver == "v2":
                    switched[node] = min(t0, switched.get(node, t0))
            marks["switched"] = switched
            await asyncio.sleep(args.after)
            stop.set()
            await asyncio.gather(*tasks)

        asyncio.run(run())
        sampler.stop.set()
        sampler.join()
        with Client("127.0.0.1", rport) as c:
            reg_bytes = c.call("health")["bytes_served"] - reg_bytes0
        peer_bytes = -peer_bytes0
        healths = []
        for port in ports:
            with Client("127.0.0.1", port) as c:
                h = c.call("health")
                healths.append(h)
                peer_bytes += h["sync"]["bytes_served_to_peers"]
    finally:
        for p in procs:
            if p.poll() is None:
                stop_daemon(p)

    t_pub = marks["publish"]
    switched = marks["switched"]
    if len(switched) < NODES:
        print(f"FAIL: only {len(switched)} of {NODES} nodes switched to v2 (logs in {work})")
    swap_end = (max(switched.values()) if switched else t_pub + args.max_seconds) + 1.0
    failed = [r for r in log if r[4] is not None]
    steady = [r[1] for r in log if r[0] < t_pub]
    during = [r[1] for r in log if t_pub <= r[0] <= swap_end]
    rss_steady, rss_peak = [], []
    for i in range(NODES):
        st = [s[1][i] for s in sampler.samples if s[0] < t_pub and s[1][i]]
        sw = [s[1][i] for s in sampler.samples if t_pub <= s[0] <= swap_end and s[1][i]]
        rss_steady.append(int(np.median(st)))
        rss_peak.append(int(max(sw)))
    new_bytes = sum(m["bytes"] for m in load_manifest(reg_dir / "v2")["files"].values())
    res = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "nodes": NODES, "rate_per_node": args.rate,
        "publish_to_serving_s": {f"node{i}": round(switched[i] - t_pub, 3) for i in sorted(switched)},
        "publish_to_all_serving_s": round(max(switched.values()) - t_pub, 3) if len(switched) == NODES else None,
        "requests": len(log), "failed": len(failed), "failures": [f[4] for f in failed[:10]],
        "steady": pct(steady), "during_swap": pct(during),
        "rss_steady_bytes": rss_steady, "rss_peak_swap_bytes": rss_peak, "new_bundle_bytes": new_bytes,
        "registry_bytes": reg_bytes, "peer_bytes": peer_bytes,
        "sources": [h["sync"]["bytes_from"] for h in healths],
    }
    p99_ratio = res["during_swap"]["p99_us"] / res["steady"]["p99_us"]
    res["checks"] = {
        "zero_failed": len(failed) == 0,
        "p99_swap_le_2x_steady": p99_ratio <= 2.0,
        "rss_peak_le_steady_plus_bundle": all(p <= s + new_bytes for p, s in zip(rss_peak, rss_steady)),
        "all_nodes_switched": len(switched) == NODES,
    }
    print(f"fleet: {NODES} nodes x {args.rate:.0f} req/s; {len(log)} requests, {len(failed)} failed")
    print("publish -> serving: " + ", ".join(f"{k} {v:.2f} s" for k, v in res["publish_to_serving_s"].items()))
    print(f"latency steady  p50 {res['steady']['p50_us']:.0f} µs  p99 {res['steady']['p99_us']:.0f} µs")
    print(f"latency in swap p50 {res['during_swap']['p50_us']:.0f} µs  p99 {res['during_swap']['p99_us']:.0f} µs"
          f"  ({p99_ratio:.2f}x steady p99; limit 2x)")
    for i in range(NODES):
        print(f"node{i} RSS steady {rss_steady[i] / 2**20:.1f} MiB, peak in swap {rss_peak[i] / 2**20:.1f} MiB "
              f"(+{(rss_peak[i] - rss_steady[i]) / 2**20:.1f}; limit +{new_bytes / 2**20:.1f} MiB = bundle)")
    print(f"update bytes: registry {reg_bytes / 2**20:.2f} MiB, peers {peer_bytes / 2**20:.2f} MiB")
    print("checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in res["checks"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        t = np.array([r[0] - t_pub for r in log])
        a1.scatter(t, [r[1] / 1000 for r in log], s=2, c=[r[2] for r in log], cmap="viridis")
        a1.set_ylabel("recommend latency (ms)")
        a1.set_yscale("log")
        for t_node in switched.values():
            a1.axvline(t_node - t_pub, color="red", lw=0.8)
        a1.axvline(0, color="black", lw=0.8, ls="--")
        ts = np.array([s[0] - t_pub for s in sampler.samples])
        for i in range(NODES):
            a2.plot(ts, [(s[1][i] or 0) / 2**20 for s in sampler.samples], label=f"node{i}")
        a2.set_ylabel("RSS (MiB)")
        a2.set_xlabel("seconds since publish (dashed); red: node serves v2")
        a2.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {out} (+ .png)")
    return 0 if all(res["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
