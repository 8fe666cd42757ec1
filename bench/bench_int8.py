"""int8 accuracy of a bundle's encoder by quantization scheme, on the same float32 encoder, in one run.

    python bench/bench_int8.py --bundle DIR [--data PATH] [--users N] [--out bench/results/int8.json]

Starting from the bundle's float32 ONNX encoder (``encoder.onnx``), it builds

* ``ort-default``: ONNX Runtime dynamic quantization with optimum's default operator list (what a user gets from
  ``AutoQuantizationConfig.avx2(is_static=False)``): MatMuls int8 and the item-embedding ``Gather`` table uint8
  with one scale for the whole table;
* ``edgerec``: ``trainer.export.quantize_int8`` (the table int8 with per-row scales, MatMuls float32: batch-exact),
  what ``edgerec train`` ships;
* ``edgerec-dynamic``: the same table with the MatMuls int8 by dynamic quantization (``int8_matmuls = "dynamic"``);

and evaluates fp32 / each int8 encoder with the float32 and with the int8 item matrix through trainer.evaluate
(leave-one-out, full ranking, history masked; an int8 encoder gets one user per call, as served), reporting
HR@10 / NDCG@10, the change of NDCG@10 relative to fp32, file sizes (bytes) and batch-1 encoder latency (µs,
1 thread, median over 300 real contexts, as bench_quality). ``--data`` is the bundle's interaction log (default: the embedded Beauty
data).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_quality import encoder_latency_us  # noqa: E402  (bench/ is the script's directory)
from edge_runtime.bundle import format as fmt  # noqa: E402
from edge_runtime.serving.encoder import Encoder  # noqa: E402
from trainer import data as data_mod  # noqa: E402
from trainer.evaluate import evaluate, loo_split  # noqa: E402
from trainer.export import quantize_int8  # noqa: E402
from trainer.scorers import onnx_score_fn  # noqa: E402


def ort_default_int8(src: Path, dst: Path) -> None:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    logging.getLogger("optimum.onnxruntime.quantization").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        ORTQuantizer.from_pretrained(src.parent, file_name=src.name).quantize(
            save_dir=tmp, quantization_config=AutoQuantizationConfig.avx2(is_static=False, per_channel=False))
        shutil.move(str(next(Path(tmp).glob("*.onnx"))), dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--users", type=int, default=None, help="evaluate the first N test users (default: all)")
    ap.add_argument("--out", default="bench/results/int8.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    b = Path(args.bundle)
    manifest = json.loads((b / "manifest.json").read_text())
    max_len = int(manifest["model"]["max_len"])
    data = data_mod.load(args.data)
    split = loo_split(data.sequences)
    ctx, tgt = split.test_ctx[:args.users], split.test_target[:args.users]
    items = np.load(b / fmt.ITEMS_F32)
    q, scales = np.load(b / fmt.ITEMS_I8), np.load(b / fmt.ITEMS_SCALE)
    if items.shape[0] != data.num_items:
        raise SystemExit(f"the bundle has {items.shape[0]} items, the data {data.num_items}: pass its --data")
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    try:
        encoders = {"fp32": b / fmt.ENCODER_FP32}
        ort_default_int8(b / fmt.ENCODER_FP32, work / "ort-default.onnx")
        encoders["ort-default"] = work / "ort-default.onnx"
        quantize_int8(b / fmt.ENCODER_FP32, work / "edgerec.onnx")
        encoders["edgerec"] = work / "edgerec.onnx"
        quantize_int8(b / fmt.ENCODER_FP32, work / "edgerec-dynamic.onnx", matmuls="dynamic")
        encoders["edgerec-dynamic"] = work / "edgerec-dynamic.onnx"
        rows = []
        for name, path in encoders.items():
            lat = encoder_latency_us(path, ctx)
            enc = Encoder(path)
            one = name != "fp32"   # int8: each user encoded alone, as the daemon does (see onnx_score_fn)
            for item_kind, fn in (("fp32 items", onnx_score_fn(enc, items, per_user=one)),
                                  ("int8 items", onnx_score_fn(enc, q, scales, per_user=one))):
                m = evaluate(fn, ctx, tgt, max_len)
                rows.append({"encoder": name, "items": item_kind, "HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"],
                             "bytes": path.stat().st_size, "latency_us": lat, "users": m["users"]})
        base = rows[0]["NDCG@10"]
        for r in rows:
            r["ndcg10_vs_fp32"] = (r["NDCG@10"] - base) / base if base else 0.0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"int8 schemes on {b} ({rows[0]['users']} test users, {data.num_items} items)")
    print(f"  {'encoder':<16} {'items':<11} {'HR@10':>7} {'NDCG@10':>8} {'vs fp32':>8} {'MB':>6} {'µs b=1':>7}")
    for r in rows:
        print(f"  {r['encoder']:<16} {r['items']:<11} {r['HR@10']:>7.4f} {r['NDCG@10']:>8.4f} "
              f"{100 * r['ndcg10_vs_fp32']:>+7.2f}% {r['bytes'] / 1e6:>6.2f} {r['latency_us']:>7.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": str(b), "data": args.data, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
