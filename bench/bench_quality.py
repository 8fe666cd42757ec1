"""Recommendation quality per benchmark config, beside the published full-ranking numbers.

    python bench/bench_quality.py [bench/configs/beauty_s3rec.toml ...] [--epochs N] [--out bench/results/quality.json]

For each config (default: every bench/configs/*.toml whose data is present) it trains with ``edgerec train``'s code
path, which evaluates fp32 PyTorch, fp32 ONNX and int8 ONNX (int8 encoder + int8 item matrix, what the daemon
serves) through trainer.evaluate (leave-one-out, full ranking, history masked, max_len 50), then measures the
encoder's batch-1 latency (µs, fp32 vs int8, ONNX Runtime, 1 thread, real contexts) and sizes. It prints one table
with the config's ``[anchors]`` (numbers from ../shared/datasets/ANCHORS.md), saves JSON and a PNG of validation
NDCG@10 per epoch.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import numpy as np

from edge_runtime.bundle import format as fmt
from edge_runtime.serving.encoder import Encoder
from trainer import data as data_mod
from trainer.config import TrainConfig
from trainer.evaluate import loo_split
from trainer.pipeline import run

HERE = Path(__file__).resolve().parent


def encoder_latency_us(path: Path, contexts, repeats: int = 300) -> float:
    enc = Encoder(path, threads=1)
    rng = np.random.default_rng(0)
    picks = [contexts[i] for i in rng.choice(len(contexts), min(repeats, len(contexts)), replace=False)]
    for c in picks[:20]:
        enc(c[-50:].reshape(1, -1))
    times = []
    for c in picks:
        t0 = time.perf_counter()
        enc(c[-50:].reshape(1, -1))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


async def _served_ranks(port: int, histories: list[list[str]], targets: list[str], k: int = 20,
                        window: int = 64) -> np.ndarray:
    """0-based rank of each target in ``recommend`` replies over the socket (history, exclude_seen, k); 10**6 when
    absent. Pipelined: ``window`` requests in flight on one connection."""
    import asyncio

    import msgpack

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    unpacker = msgpack.Unpacker(raw=False)
    ranks = np.full(len(histories), 10 ** 6, dtype=np.int64)
    sent = done = 0
    while done < len(histories):
        while sent < len(histories) and sent - done < window:
            writer.write(msgpack.packb([0, sent, "recommend", [{"history": histories[sent], "k": k,
                                                                 "exclude_seen": True}]]))
            sent += 1
        await writer.drain()
        unpacker.feed(await reader.read(1 << 20))
        for msg in unpacker:
            if msg[2] is not None:
                raise RuntimeError(f"recommend failed: {msg[2]}")
            items = msg[3]["items"]
            if targets[msg[1]] in items:
                ranks[msg[1]] = items.index(targets[msg[1]])
            done += 1
    writer.close()
    return ranks


def served_metrics(bundle: Path, data, split) -> dict:
    """HR / NDCG @10 and @20 of the daemon itself: ``edgerec serve`` on the bundle, every test user's history sent
    to ``recommend`` over the socket, the held-out item looked for in the reply."""
    import asyncio

    from edgerec.process import free_port, start_daemon, stop_daemon
    from trainer.evaluate import metrics_from_ranks

    ids = data.item_ids
    histories = [[ids[t - 1] for t in ctx] for ctx in split.test_ctx]
    targets = [ids[t - 1] for t in split.test_target]
    port = free_port()
    proc = start_daemon(bundle, port, ["--no-discovery"], log_path=bundle.parent / f"{bundle.name}-daemon.log")
    try:
        t0 = time.perf_counter()
        ranks = asyncio.run(_served_ranks(port, histories, targets))
        secs = time.perf_counter() - t0
    finally:
        stop_daemon(proc)
    out = metrics_from_ranks(ranks, ks=(10, 20))
    out["seconds"] = round(secs, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="config files (default: bench/configs/*.toml)")
    ap.add_argument("--epochs", type=int, default=None, help="override the maximum epochs (a quick look)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: all cores)")
    ap.add_argument("--out", default="bench/results/quality.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    paths = args.configs or sorted(glob.glob(str(HERE / "configs" / "*.toml")))
    results = []
    for path in paths:
        with open(path, "rb") as f:
            anchors = tomllib.load(f).get("anchors", {})
        cfg = TrainConfig.from_toml(path, epochs=args.epochs, threads=args.threads)
        if cfg.data is not None and not Path(cfg.data).is_file():
            print(f"skip {path}: data {cfg.data} not present")
            continue
        name = Path(path).stem
        out_dir = Path(args.out).parent / "bundles" / name
        print(f"== {name}: training ({cfg.model}, {cfg.loss}, d={cfg.hidden}, {cfg.blocks} blocks)", flush=True)
        manifest = run(cfg, out_dir, progress=False, printer=lambda *a: None)
        data = data_mod.load(cfg.data, columns=cfg.columns, attributes=cfg.attributes)
        split = loo_split(data.sequences)
        contexts = split.test_ctx
        print(f"   served check: {len(contexts)} test users over the socket", flush=True)
        served = served_metrics(out_dir, data, split)
        m = manifest["metrics"]
        files = manifest["files"]
        results.append({
            "config": name, "path": str(path), "model_version": manifest["model_version"],
            "model": manifest["model"], "test": m["test"], "served_over_socket": served,
            "epochs": m["epochs"], "best_epoch": m["best_epoch"],
            "train_seconds": m["train_seconds"], "top10_overlap_vs_pytorch": m["top10_overlap_vs_pytorch"],
            "int8_ndcg10_relative_change": m["int8_ndcg10_relative_change"],
            "encoder_bytes": {"fp32": files[fmt.ENCODER_FP32]["bytes"], "int8": files[fmt.ENCODER_INT8]["bytes"]},
            "items_bytes": {"fp32": files[fmt.ITEMS_F32]["bytes"], "int8": files[fmt.ITEMS_I8]["bytes"]},
            "encoder_latency_us": {"fp32": encoder_latency_us(out_dir / fmt.ENCODER_FP32, contexts),
                                   "int8": encoder_latency_us(out_dir / fmt.ENCODER_INT8, contexts)},
            "valid_ndcg10_per_epoch": [h["valid_NDCG@10"] for h in m["history"]],
            "anchors": anchors,
        })
        print_table(results[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if results:
        plot(results, Path(args.out).with_suffix(".png"))
    print(f"saved {args.out}")
    return 0


def print_table(r: dict) -> None:
    t = r["test"]
    print(f"{'':<50}{'HR@10':>8}{'NDCG@10':>9}{'HR@20':>8}{'NDCG@20':>9}")
    rows = [(label, t[key]) for label, key in (("fp32 PyTorch", "pytorch_fp32"), ("fp32 ONNX", "onnx_fp32"),
                                               ("int8 ONNX + int8 items (offline)", "onnx_int8"))]
    rows.append(("daemon over the socket (int8)", r["served_over_socket"]))
    for label, v in rows:
        at20 = f"{v['HR@20']:8.4f}{v['NDCG@20']:9.4f}" if "HR@20" in v else ""
        print(f"  {r['config'] + ': ' + label:<48}{v['HR@10']:8.4f}{v['NDCG@10']:9.4f}{at20}")
    for label, (hr, ndcg) in r["anchors"].items():
        print(f"  {'published: ' + label:<48}{hr:8.4f}{ndcg:9.4f}")
    print(f"  epochs {r['epochs']} (best {r['best_epoch']}), training {r['train_seconds']:.0f} s; int8 vs fp32 "
          f"NDCG@10 {100 * r['int8_ndcg10_relative_change']:+.2f}%; top-10 overlap int8 "
          f"{r['top10_overlap_vs_pytorch']['onnx_int8']:.3f}")
    print(f"  encoder {r['encoder_bytes']['fp32'] / 1e6:.2f} MB fp32 / {r['encoder_bytes']['int8'] / 1e6:.2f} MB int8; "
          f"batch-1 latency {r['encoder_latency_us']['fp32']:.0f} µs fp32 / {r['encoder_latency_us']['int8']:.0f} µs "
          f"int8; item matrix {r['items_bytes']['fp32'] / 1e6:.1f} MB fp32 / {r['items_bytes']['int8'] / 1e6:.1f} MB "
          f"int8", flush=True)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(range(1, len(r["valid_ndcg10_per_epoch"]) + 1), r["valid_ndcg10_per_epoch"], label=r["config"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
