"""Where a request's time goes: socket round trips of ``recommend`` / ``track`` beside the encoder and scan alone.

Starts ``edgerec serve`` on a bundle (loopback, a free port), then drives it with 1 and with 8 concurrent
MessagePack-RPC clients (asyncio, one connection each, one request in flight per connection). ``recommend`` calls
carry real Beauty shoppers' histories (the leave-one-out test contexts of the embedded data), so the encoder sees
real session lengths. In the same run, in this process, it times the ONNX encoder call alone and the exact top-k
scan alone (int8 and fp32) on the same contexts. Bounded: ``--requests`` per case and ``--max-seconds`` per case.

    python bench/bench_latency.py --bundle DIR [--requests 2000] [--out bench/results/latency.json]

Prints p50 / p99 (µs) and requests/s per case and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import msgpack
import numpy as np

from edge_runtime import scoring
from edge_runtime.serving.memory import limit_blas_threads
from edge_runtime.serving.model import Model
from edgerec.process import free_port, start_daemon, stop_daemon


def load_contexts(model: Model, n: int, seed: int = 0) -> list[list[str]]:
    """Real shoppers' histories: the embedded Beauty test contexts (all but the last item), ids known to the model."""
    from importlib.resources import files
    path = files("trainer").joinpath("datasets/amazon_beauty_s3rec/Beauty.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(lines), min(n, len(lines)), replace=False)
    out = []
    for i in picked:
        items = [it for it in lines[i].split()[1:-1] if it in model.index]
        if items:
            out.append(items)
    return out


def pct(values_us: list[float]) -> dict:
    a = np.asarray(values_us)
    return {"n": int(len(a)), "p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "mean_us": float(a.mean())}


async def _client(port: int, requests: list[tuple[str, dict]], lat: list[float], deadline: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    unpacker = msgpack.Unpacker(raw=False)
    try:
        for msgid, (method, params) in enumerate(requests, 1):
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            writer.write(msgpack.packb([0, msgid, method, [params]]))
            reply = None
            while reply is None:
                for msg in unpacker:
                    reply = msg
                    break
                if reply is None:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("daemon closed the connection")
                    unpacker.feed(data)
            lat.append((time.perf_counter() - t0) * 1e6)
            if reply[2] is not None:
                raise RuntimeError(f"{method} failed: {reply[2]}")
    finally:
        writer.close()


async def drive(port: int, clients: int, requests: list[tuple[str, dict]], max_seconds: float) -> dict:
    lat: list[float] = []
    per = [requests[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, r, lat, t0 + max_seconds) for r in per))
    wall = time.perf_counter() - t0
    return {**pct(lat), "clients": clients, "requests_per_s": len(lat) / wall}


def time_calls(fn, args_list, repeat: int = 1) -> dict:
    lat = []
    for args in args_list:
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn(*args)
        lat.append((time.perf_counter() - t0) * 1e6 / repeat)
    return pct(lat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests", type=int, default=2000, help="requests per socket case")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time bound per socket case")
    ap.add_argument("--out", default="bench/results/latency.json")
    args = ap.parse_args(argv)
    limit_blas_threads(1)  # as the daemon does

    model = Model(args.bundle, precision="int8")
    model32 = Model(args.bundle, precision="fp32")
    contexts = load_contexts(model, args.requests)
    results: dict = {"bundle": args.bundle, "model_version": model.version, "num_items": model.num_items,
                     "dim": model.dim, "scoring": scoring.IMPLEMENTATION, "machine": platform.machine(),
                     "cpus": os.cpu_count(), "python": platform.python_version(),
                     "avg_context_len": float(np.mean([len(c) for c in contexts]))}

    # In-process: the encoder alone and the scan alone, on the same contexts.
    rows = [model.rows(c)[0] for c in contexts]
    for name, m in (("int8", model), ("fp32", model32)):
        results[f"encoder_{name}"] = time_calls(m.encode, [(r,) for r in rows])
        users = [m.encode(r) for r in rows]
        results[f"scan_{name}"] = time_calls(
            lambda u, r, m=m: scoring.topk(u, m.items, 10, item_scales=m.scales, exclude=np.asarray(r)),
            list(zip(users, rows)))

    port = free_port()
    proc = start_daemon(args.bundle, port)
    try:
        rec = [("recommend", {"history": c, "k": 10}) for c in contexts]
        trk = [("track", {"user": f"bench-{i % 500}", "item": c[-1], "event": "view"})
               for i, c in enumerate(contexts)]
        for clients in (1, 8):
            results[f"socket_recommend_c{clients}"] = asyncio.run(drive(port, clients, rec, args.max_seconds))
            results[f"socket_track_c{clients}"] = asyncio.run(drive(port, clients, trk, args.max_seconds))
    finally:
        code = stop_daemon(proc)
    results["daemon_exit"] = code

    print(f"bundle {model.version}: {model.num_items} items, d={model.dim}, scoring={scoring.IMPLEMENTATION}, "
          f"{os.cpu_count()} CPUs, avg context {results['avg_context_len']:.1f} items")
    print(f"{'case':<28}{'p50 µs':>10}{'p99 µs':>10}{'req/s':>10}")
    for key, r in results.items():
        if isinstance(r, dict) and "p50_us" in r:
            rps = f"{r['requests_per_s']:10.0f}" if "requests_per_s" in r else f"{'':>10}"
            print(f"{key:<28}{r['p50_us']:10.1f}{r['p99_us']:10.1f}{rps}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
