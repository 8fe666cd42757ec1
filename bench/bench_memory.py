"""Memory budget of the daemon: RSS at idle and under load for catalogs of 10k, 100k and 1M items.

For each size it builds a bundle of that size (a SASRec encoder, d = 64, 1 block, random weights: memory does not
depend on the weights; exported to ONNX and int8-quantized exactly as ``edgerec train`` does; random int8 item
matrix; ids ``"i<n>"``; 3 attributes per item out of 1,000), starts ``edgerec serve`` on it and reads the daemon's
RSS (``/proc/<pid>/status`` VmRSS, and VmHWM for the peak):

* idle: after start-up (model loaded, warm-up request answered);
* load: ``--users`` shoppers each send ``--events`` ``track`` events (``track_batch``), then ``--requests``
  ``recommend`` calls (with and without category filters) from 8 concurrent connections;
* bounded: the same load with ``limits.max_sessions`` set to a tenth of the users, to show the bound holding RSS.

    python bench/bench_memory.py [--sizes 10000,100000,1000000] [--users 20000] [--events 20]
                                 [--out bench/results/memory.json]

Prints one table (MiB) and writes JSON. The bundles are cached under ``--workdir`` (default a temp dir).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.bundle import format as bundle_fmt  # noqa: E402
from edge_runtime.bundle.writer import stage_arrays, write_bundle  # noqa: E402
from edge_runtime.client import Client  # noqa: E402
from edgerec.process import free_port, start_daemon, stop_daemon  # noqa: E402

MIB = 1 << 20


def proc_mem(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def make_bundle(n: int, out: Path, dim: int = 64, max_len: int = 50, seed: int = 0) -> Path:
    """A serving bundle with ``n`` items (see the module docstring)."""
    if (out / bundle_fmt.MANIFEST).is_file():
        return out
    import torch

    from trainer.export import export_onnx, quantize_int8
    from trainer.model import SASRec

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=out.parent))
    model = SASRec(n, max_len=max_len, hidden=dim, blocks=1, heads=1, dropout=0.0).eval()
    export_onnx(model, staged / bundle_fmt.ENCODER_FP32, max_len)
    quantize_int8(staged / bundle_fmt.ENCODER_FP32, staged / bundle_fmt.ENCODER_INT8)
    (staged / bundle_fmt.ENCODER_FP32).unlink()   # the daemon serves int8; keep the bundle at its edge size
    items = model.item_embeddings().detach().numpy().astype(np.float32)
    codes = rng.integers(0, 1000, (n, 3))
    attributes = [[f"c{c}" for c in row] for row in codes.tolist()]   # 3 of 1,000 categories per item
    stage_arrays(staged, items, [f"i{r}" for r in range(n)], rng.zipf(1.3, n).astype(np.float32), attributes)
    manifest = {"model_version": f"synthetic-{n}", "created_at": "2026-01-01T00:00:00+00:00",
                "model": {"architecture": "SASRec", "num_items": n, "dim": dim, "max_len": max_len}}
    write_bundle(out, staged, manifest)
    return out


async def _load(port: int, users: int, events: int, requests: int, n: int, seed: int = 1) -> float:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    unpacker = msgpack.Unpacker(raw=False)

    async def call(msgid: int, method: str, params: dict) -> None:
        writer.write(msgpack.packb([0, msgid, method, [params]]))
        while True:
            for msg in unpacker:
                if msg[2] is not None:
                    raise RuntimeError(msg[2])
                return
            unpacker.feed(await reader.read(1 << 16))

    batch, msgid = [], 0
    for u in range(users):
        for it in rng.integers(0, n, events):
            batch.append({"user": f"user-{u:07d}-{'x' * 16}", "item": f"i{it}", "event": "view"})
        if len(batch) >= 5000:
            msgid += 1
            await call(msgid, "track_batch", {"events": batch})
            batch = []
    if batch:
        msgid += 1
        await call(msgid, "track_batch", {"events": batch})
    writer.close()

    async def client(k: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        up = msgpack.Unpacker(raw=False)
        for i in range(requests // 8):
            p = {"user": f"user-{(i * 8 + k) % users:07d}-{'x' * 16}", "k": 10}
            if i % 4 == 0:
                p["filters"] = {"category": [f"c{(i + k) % 1000}"]}
            w.write(msgpack.packb([0, i, "recommend", [p]]))
            while True:
                msg = next(up, None)
                if msg is not None:
                    break
                up.feed(await r.read(1 << 16))
        w.close()
    await asyncio.gather(*(client(k) for k in range(8)))
    return time.perf_counter() - t0


def run_case(bundle: Path, args, max_sessions: int | None, tag: str) -> dict:
    port = free_port()
    extra = ["--no-discovery"] + (["--max-sessions", str(max_sessions)] if max_sessions else [])
    proc = start_daemon(bundle, port, extra, log_path=Path(args.workdir) / f"daemon-{tag}.log", timeout=300)
    try:
        time.sleep(1.0)
        idle = proc_mem(proc.pid)
        n = json.loads((bundle / bundle_fmt.MANIFEST).read_text())["model"]["num_items"]
        secs = asyncio.run(_load(port, args.users, args.events, args.requests, n))
        loaded = proc_mem(proc.pid)
        with Client("127.0.0.1", port) as c:
            h = c.call("health")
    finally:
        stop_daemon(proc)
    return {"rss_idle": idle["VmRSS"], "rss_load": loaded["VmRSS"], "rss_peak": loaded["VmHWM"],
            "sessions": h["sessions"], "cache_entries": h["cache_entries"], "load_seconds": round(secs, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--events", type=int, default=20, help="events per user")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="bench/results/memory.json")
    args = ap.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="edgerec-mem-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        t0 = time.perf_counter()
        b = make_bundle(n, Path(args.workdir) / f"bundle-{n}")
        build_s = time.perf_counter() - t0
        size = sum(m["bytes"] for name, m in bundle_fmt.load_manifest(b, verify=False)["files"].items()
                   if name != bundle_fmt.ITEMS_F32)
        row = {"items": n, "bundle_bytes_served": size, "build_seconds": round(build_s, 1)}
        row["unbounded"] = run_case(b, args, None, f"{n}")
        row["bounded"] = run_case(b, args, max(1, args.users // 10), f"{n}-bounded")
        row["bounded"]["max_sessions"] = max(1, args.users // 10)
        rows.append(row)
        print(f"{n:>9,} items: bundle {size / MIB:7.1f} MiB | idle {row['unbounded']['rss_idle'] / MIB:7.1f} | "
              f"load {row['unbounded']['rss_load'] / MIB:7.1f} (peak {row['unbounded']['rss_peak'] / MIB:7.1f}, "
              f"{row['unbounded']['sessions']} sessions) | max_sessions {row['bounded']['max_sessions']}: "
              f"{row['bounded']['rss_load'] / MIB:7.1f} MiB ({row['bounded']['sessions']} sessions)", flush=True)
    per_session = [(r["unbounded"]["rss_load"] - r["bounded"]["rss_load"])
                   / max(1, r["unbounded"]["sessions"] - r["bounded"]["sessions"]) for r in rows]
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "users": args.users, "events_per_user": args.events, "requests": args.requests, "rows": rows,
           "bytes_per_session_estimate": [round(x) for x in per_session]}
    print("RSS per extra session (unbounded - bounded) / extra sessions: "
          + ", ".join(f"{x:.0f} B" for x in per_session) + f" ({args.events} events, 25-character user ids, "
          "cached results included)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
